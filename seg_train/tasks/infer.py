"""`seg-train mode=infer`: class-id PNGs and overlays for a file, a directory or a glob."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from seg_train import runtime
from seg_train.config_checks import is_matting_data
from seg_train.files import write_atomic
from seg_train.inference.crf import CRFRunner
from seg_train.inference.images import find_images, load_rgb
from seg_train.inference.predictor import Predictor
from seg_train.tasks import infer_files
from seg_train.tasks.checkpoint import load_model, open_checkpoint
from seg_train.tasks.instantiate import predictor_from_config
from seg_train.tasks.interrupts import between_items
from seg_train.tasks.postprocess import crf_runner
from seg_train.viz import full_palette, overlay, save_id_png

log = logging.getLogger(__name__)


# <stem>.png (class ids), <stem>_overlay.jpg, and with infer.save_probs <stem>_prob.npy.
MASK_SUFFIXES = (".png", "_overlay.jpg")
PROBS_SUFFIX = "_prob.npy"


def write_outputs(
    paths: infer_files.Outputs,
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
    suffixes = (*MASK_SUFFIXES, PROBS_SUFFIX if cfg.infer.save_probs else None)
    resume = bool(cfg.infer.get("resume", False))
    outputs, todo = infer_files.start(images, out_dir, suffixes, cfg.infer.overwrite, resume)
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
        raise infer_files.stopped(images, outputs, out_dir) from None
    _print_class_shares(cfg.data.class_names, pixel_counts)
    log.info("Wrote %d predictions to %s", len(todo), out_dir)


def _write_all(
    stream, outputs: list[infer_files.Outputs], palette, pixel_counts, cfg: DictConfig
) -> None:
    """Writes each prediction of `stream` to its outputs, with a progress bar."""
    columns = (
        TextColumn("Predicting"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[rate]}"),
    )
    # Ctrl-C: stops between two images.
    with Progress(*columns) as progress, between_items() as safe_point:
        task = progress.add_task("infer", total=len(outputs), rate="")
        for (image, ids, probs), paths in zip(stream, outputs):
            write_outputs(paths, image, ids, probs, palette, cfg.infer.overlay_alpha)
            pixel_counts += np.bincount(ids.ravel(), minlength=cfg.data.num_classes)
            progress.advance(task)
            speed = progress.tasks[0].speed
            progress.update(task, rate=f"{speed:.1f} images/s" if speed else "")
            safe_point()


def _print_class_shares(class_names, pixel_counts: np.ndarray) -> None:
    total = max(int(pixel_counts.sum()), 1)
    shares = ", ".join(
        f"{name} {100 * count / total:.1f}%"
        for name, count in zip(class_names, pixel_counts)
        if count
    )
    Console().print(f"Predicted pixel shares: {shares}")
