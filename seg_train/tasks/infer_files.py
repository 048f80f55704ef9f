"""The files `mode=infer` writes, for segmentation and matting alike: planned per input image
before anything is written, each written whole (`files.write_atomic`), and which images an
interrupted run still has to predict (`infer.resume`)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from seg_train.errors import UserError

log = logging.getLogger(__name__)

# One image's output paths, in the order of the suffixes that named them; None where an
# optional output (e.g. the probabilities without infer.save_probs) is not written.
Outputs = tuple[Path | None, ...]


def plan_outputs(
    images: list[Path],
    out_dir: Path,
    suffixes: Sequence[str | None],
    overwrite: bool,
    resume: bool = False,
) -> list[Outputs]:
    """Returns each image's output paths, `out_dir / (stem + suffix)` per suffix.

    Refuses name clashes, writing into an input directory and (unless `overwrite` or `resume`)
    replacing existing files, before anything is written. With `resume`, existing outputs are
    an interrupted run's finished work: `pending` tells which images still need predicting.

    Args:
        images: The input images.
        out_dir: The output folder (`infer.output_dir`).
        suffixes: The outputs' name endings after the stem, e.g. ".png"; None for an output
            this run does not write.
        overwrite: `infer.overwrite`.
        resume: `infer.resume`.
    """
    if resume and overwrite:
        raise UserError(
            "infer.resume=true keeps finished outputs and infer.overwrite=true replaces them; "
            "pass only one of them"
        )
    stems = [p.stem for p in images]
    clashes = sorted({s for s in stems if stems.count(s) > 1})
    if clashes:
        raise UserError(
            f"several inputs share the name '{clashes[0]}', so their outputs would "
            "overwrite each other; predict them in separate runs"
        )
    input_dirs = {p.resolve().parent for p in images}
    if out_dir.resolve() in input_dirs:
        raise UserError(
            f"infer.output_dir {out_dir} is an input directory; choose another "
            "folder so inputs are never overwritten"
        )
    outputs = [
        tuple(None if suffix is None else out_dir / f"{stem}{suffix}" for suffix in suffixes)
        for stem in stems
    ]
    blocker = next((p for p in (out_dir, *out_dir.parents) if p.exists()), None)
    if blocker is not None and (not blocker.is_dir() or not os.access(blocker, os.W_OK)):
        raise UserError(
            f"infer.output_dir {out_dir} cannot be created or written ({blocker} is "
            "not a writable directory); choose another infer.output_dir"
        )
    if not (overwrite or resume):
        existing = [p for paths in outputs for p in paths if p is not None and p.exists()]
        if existing:
            raise UserError(
                f"{existing[0]} already exists ({len(existing)} outputs would be "
                "replaced); pass infer.resume=true to continue an interrupted run, "
                "infer.overwrite=true to replace them, or another infer.output_dir"
            )
    return outputs


def pending(images: list[Path], outputs: list[Outputs]) -> list[tuple[Path, Outputs]]:
    """The images whose outputs are not all there (outputs appear whole, by renames)."""
    return [
        (image, paths)
        for image, paths in zip(images, outputs)
        if not all(p.is_file() for p in paths if p is not None)
    ]


def start(
    images: list[Path],
    out_dir: Path,
    suffixes: Sequence[str | None],
    overwrite: bool,
    resume: bool,
) -> tuple[list[Outputs], list[tuple[Path, Outputs]]]:
    """Plans the outputs, clears dead runs' temporaries and logs what a resume skips.

    Returns:
        (every image's outputs, the (image, outputs) still to predict).
    """
    outputs = plan_outputs(images, out_dir, suffixes, overwrite, resume)
    if out_dir.is_dir():
        remove_stale_temporaries(out_dir)
    todo = pending(images, outputs)
    if resume:
        log.info(
            "infer.resume: %d of %d images already have their outputs in %s; predicting %d",
            len(images) - len(todo),
            len(images),
            out_dir,
            len(todo),
        )
    return outputs, todo


def stopped(images: list[Path], outputs: list[Outputs], out_dir: Path) -> KeyboardInterrupt:
    """The one-line Ctrl-C message: how far the run got and the command to continue."""
    done = len(images) - len(pending(images, outputs))
    return KeyboardInterrupt(
        f"mode=infer stopped after {done} of {len(images)} images (outputs in {out_dir}, "
        "each one whole); continue with the same command plus infer.resume=true "
        f"infer.output_dir={out_dir}"
    )


def remove_stale_temporaries(out_dir: Path) -> None:
    """Removes the half-written outputs of killed infer processes (`.tmp-PID-NAME` files)."""
    for path in out_dir.glob(".tmp-*-*"):
        pid = path.name.split("-")[1]
        if pid.isdigit() and not _process_alive(int(pid)):
            path.unlink(missing_ok=True)
            log.info("Removed %s, left half-written by an interrupted run", path)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
