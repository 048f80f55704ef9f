"""`seg-train mode=infer`: class-id PNGs and overlays for a file, a directory or a glob."""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from PIL import Image, UnidentifiedImageError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from seg_train import checkpoints, runtime
from seg_train.config_checks import check_config
from seg_train.data.base import displayed
from seg_train.data.folder import IMAGE_SUFFIXES
from seg_train.errors import UserError
from seg_train.postprocess.crf import CRFRunner, runner_from_config
from seg_train.predict import Predictor, predictor_from_config
from seg_train.viz import full_palette, overlay, save_id_png

log = logging.getLogger(__name__)


def find_images(pattern: str, recursive: bool = False) -> list[Path]:
    """Lists the images named by a file path, a directory or a glob, sorted."""
    path = Path(pattern).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        candidates = path.rglob("*") if recursive else path.glob("*")
    else:
        candidates = (Path(p) for p in glob.glob(str(path), recursive=True))
    images = sorted(p for p in candidates if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise UserError(
            f"infer.input {pattern} matches no image ({', '.join(IMAGE_SUFFIXES)}); "
            "pass an image file, a directory of images or a quoted glob"
        )
    return images


def load_rgb(path: Path) -> np.ndarray:
    """Reads any Pillow-readable image as uint8 RGB (grayscale and RGBA converted), turned as
    its EXIF orientation says, as training saw it (outputs follow the displayed image)."""
    try:
        with Image.open(path) as image:
            return np.asarray(displayed(image, str(path)).convert("RGB"))
    except (UnidentifiedImageError, OSError) as exc:
        raise UserError(f"cannot read image {path} ({exc}); remove it from infer.input") from exc


def plan_outputs(
    images: list[Path], out_dir: Path, overwrite: bool, with_probs: bool = False
) -> list[tuple[Path, Path, Path | None]]:
    """Returns (mask PNG, overlay JPEG, probabilities .npy or None) paths per image.

    Refuses name clashes, writing into an input directory and (unless `overwrite`) replacing
    existing files, before anything is written.
    """
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
    if not overwrite:
        existing = [p for paths in outputs for p in paths if p is not None and p.exists()]
        if existing:
            raise UserError(
                f"{existing[0]} already exists ({len(existing)} outputs would be "
                "replaced); pass infer.overwrite=true or another infer.output_dir"
            )
    return outputs


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
    checkpoint, run_dir = checkpoints.resolve_checkpoint(cfg.ckpt_path)
    checkpoints.adopt_run_config(cfg, run_dir)
    check_config(cfg)
    images = find_images(str(cfg.infer.input), cfg.infer.recursive)
    out_dir = Path(cfg.infer.output_dir or Path(cfg.paths.output_dir) / "predictions")
    outputs = plan_outputs(images, out_dir, cfg.infer.overwrite, cfg.infer.save_probs)
    runtime.seed_everything(cfg.seed)
    model = checkpoints.load_model(checkpoint, cfg.data.num_classes)
    stream = predictions(
        images,
        predictor_from_config(model, cfg),
        runner_from_config(cfg.postprocess),
        cfg.infer.save_probs,
    )
    palette = full_palette(cfg.data.palette)
    pixel_counts = np.zeros(cfg.data.num_classes, dtype=np.int64)
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = (
        TextColumn("Predicting"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[rate]}"),
    )
    with Progress(*columns) as progress:
        task = progress.add_task("infer", total=len(images), rate="")
        for (image, ids, probs), (mask_png, overlay_jpg, probs_npy) in zip(stream, outputs):
            save_id_png(mask_png, ids, palette)
            blended = overlay(image, ids, palette, cfg.infer.overlay_alpha)
            Image.fromarray(blended).save(overlay_jpg, quality=90)
            if probs_npy is not None:
                np.save(probs_npy, probs.astype(np.float16))
            pixel_counts += np.bincount(ids.ravel(), minlength=cfg.data.num_classes)
            progress.advance(task)
            speed = progress.tasks[0].speed
            progress.update(task, rate=f"{speed:.1f} images/s" if speed else "")
    _print_class_shares(cfg.data.class_names, pixel_counts)
    log.info("Wrote %d predictions to %s", len(images), out_dir)


def _print_class_shares(class_names, pixel_counts: np.ndarray) -> None:
    total = max(int(pixel_counts.sum()), 1)
    shares = ", ".join(
        f"{name} {100 * count / total:.1f}%"
        for name, count in zip(class_names, pixel_counts)
        if count
    )
    Console().print(f"Predicted pixel shares: {shares}")
