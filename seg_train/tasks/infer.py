"""`seg-train mode=infer`: class-id PNGs and overlays for a file, a directory or a glob."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from seg_train import runtime
from seg_train.config_checks import is_matting_data
from seg_train.errors import UserError
from seg_train.files import write_atomic
from seg_train.inference.crf import CRFRunner
from seg_train.inference.images import find_images, load_rgb
from seg_train.inference.predictor import Predictor
from seg_train.tasks.checkpoint import load_model, open_checkpoint
from seg_train.tasks.instantiate import predictor_from_config
from seg_train.tasks.postprocess import crf_runner
from seg_train.viz import full_palette, overlay, save_id_png

log = logging.getLogger(__name__)


Outputs = tuple[Path, Path, Path | None]


def plan_outputs(
    images: list[Path],
    out_dir: Path,
    overwrite: bool,
    with_probs: bool = False,
    resume: bool = False,
) -> list[Outputs]:
    """Returns (mask PNG, overlay JPEG, probabilities .npy or None) paths per image.

    Refuses name clashes, writing into an input directory and (unless `overwrite` or `resume`)
    replacing existing files, before anything is written. With `resume`, existing outputs are
    an interrupted run's finished work: `pending` tells which images still need predicting.
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
        (
            out_dir / f"{s}.png",
            out_dir / f"{s}_overlay.jpg",
            out_dir / f"{s}_prob.npy" if with_probs else None,
        )
        for s in stems
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


def write_outputs(
    paths: Outputs,
    image: np.ndarray,
    ids: np.ndarray,
    probs: np.ndarray | None,
    palette: np.ndarray,
    alpha: float,
) -> None:
    """Writes one image's outputs under temporary names, then renames them into place.

    The mask PNG is renamed last: a run interrupted (or out of disk space) at any moment never
    leaves a partial file under an output's name, and `infer.resume` counts an image as done
    only when all its outputs are there.
    """
    mask_png, overlay_jpg, probs_npy = paths
    writers = [
        (
            overlay_jpg,
            lambda f: Image.fromarray(overlay(image, ids, palette, alpha)).save(f, quality=90),
        ),
        (mask_png, lambda f: save_id_png(f, ids, palette)),
    ]
    if probs_npy is not None:
        writers.insert(0, (probs_npy, lambda f: np.save(f, probs.astype(np.float16))))
    for final, write in writers:
        write_atomic(final, write)


def predictions(
    paths: list[Path], predictor: Predictor, crf: CRFRunner | None, with_probs: bool
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """Yields (image, class ids, probabilities or None) per path, in order."""
    if crf is None:
        for path in paths:
            image = load_rgb(path)
            if with_probs:
                probs = predictor.probabilities(image)
                yield image, probs.argmax(-1).astype(np.uint8), probs
            else:
                yield image, predictor.labels(image), None
        return
    items = ((image, predictor.probabilities(image), image) for image in map(load_rgb, paths))
    for marginals, image in crf.map(items):
        yield image, marginals.argmax(-1).astype(np.uint8), marginals


def run(cfg: DictConfig) -> None:
    """Predicts every image of `cfg.infer.input` with `cfg.ckpt_path`."""
    checkpoint = open_checkpoint(cfg)
    images = find_images(str(cfg.infer.input), cfg.infer.recursive)
    out_dir = Path(cfg.infer.output_dir or Path(cfg.paths.output_dir) / "predictions")
    if is_matting_data(cfg.data):  # alpha, cut-out and overlay PNGs instead of ids
        from seg_train.tasks.matting import infer as infer_alpha

        runtime.seed_everything(cfg.seed)
        return infer_alpha(cfg, checkpoint, images, out_dir)
    resume = bool(cfg.infer.get("resume", False))
    outputs = plan_outputs(images, out_dir, cfg.infer.overwrite, cfg.infer.save_probs, resume)
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
    runtime.seed_everything(cfg.seed)
    model = load_model(checkpoint, cfg.data.num_classes)
    stream = predictions(
        [image for image, _ in todo],
        predictor_from_config(model, cfg),
        crf_runner(cfg),
        cfg.infer.save_probs,
    )
    palette = full_palette(cfg.data.palette)
    pixel_counts = np.zeros(cfg.data.num_classes, dtype=np.int64)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        _write_all(stream, [paths for _, paths in todo], palette, pixel_counts, cfg)
    except KeyboardInterrupt:
        done = len(images) - len(pending(images, outputs))
        raise KeyboardInterrupt(
            f"mode=infer stopped after {done} of {len(images)} images (outputs in {out_dir}, "
            "each one whole); continue with the same command plus infer.resume=true "
            f"infer.output_dir={out_dir}"
        ) from None
    _print_class_shares(cfg.data.class_names, pixel_counts)
    log.info("Wrote %d predictions to %s", len(todo), out_dir)


def _write_all(stream, outputs: list[Outputs], palette, pixel_counts, cfg: DictConfig) -> None:
    """Writes each prediction of `stream` to its outputs, with a progress bar."""
    columns = (
        TextColumn("Predicting"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[rate]}"),
    )
    with Progress(*columns) as progress:
        task = progress.add_task("infer", total=len(outputs), rate="")
        for (image, ids, probs), paths in zip(stream, outputs):
            write_outputs(paths, image, ids, probs, palette, cfg.infer.overlay_alpha)
            pixel_counts += np.bincount(ids.ravel(), minlength=cfg.data.num_classes)
            progress.advance(task)
            speed = progress.tasks[0].speed
            progress.update(task, rate=f"{speed:.1f} images/s" if speed else "")


def _print_class_shares(class_names, pixel_counts: np.ndarray) -> None:
    total = max(int(pixel_counts.sum()), 1)
    shares = ", ".join(
        f"{name} {100 * count / total:.1f}%"
        for name, count in zip(class_names, pixel_counts)
        if count
    )
    Console().print(f"Predicted pixel shares: {shares}")
