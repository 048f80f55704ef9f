"""The embedded default dataset: procedurally generated scenes, written once in the folder layout.

Each 128x128 scene shows 2-5 objects of three classes on a textured background. A class is
told apart by shape *and* appearance: discs are red/orange with stripes, squares green with a
checkerboard, triangles blue with a smooth gradient; the background is low-saturation with a
random sinusoidal texture. As in PASCAL VOC, a thin band on object borders is labelled 255
(ignore). The set is generated deterministically from `seed` into a temporary folder that is
renamed into place, so concurrent runs never see a half-written dataset.
"""

from __future__ import annotations

import colorsys
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from seg_train.data.folder import FolderSource

IGNORE_LABEL = 255
BACKGROUND, DISC, SQUARE, TRIANGLE = 0, 1, 2, 3
# Hue range (degrees) of each object class.
HUES = {DISC: (0, 35), SQUARE: (95, 150), TRIANGLE: (200, 250)}


def _class_colour(cls: int, rng: np.random.Generator) -> np.ndarray:
    hue = rng.uniform(*HUES[cls]) / 360.0
    rgb = colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.55, 1.0))
    return np.array(rgb, dtype=np.float32) * 255.0


def _shape_region(
    cls: int, xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, radius: float, angle: float
) -> np.ndarray:
    dx, dy = xx - cx, yy - cy
    if cls == DISC:
        return dx**2 + dy**2 <= radius**2
    # Rotate into the shape's own frame.
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    if cls == SQUARE:
        half = radius * 0.85
        return (np.abs(u) <= half) & (np.abs(v) <= half)
    # Equilateral triangle with circumradius `radius`: inside all three edge half-planes.
    inside = np.ones_like(u, dtype=bool)
    for k in range(3):
        theta = angle + np.pi / 2 + k * 2 * np.pi / 3
        inside &= (dx * np.cos(theta) + dy * np.sin(theta)) <= radius / 2
    return inside


def _texture(cls: int, xx: np.ndarray, yy: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if cls == DISC:  # stripes
        period = rng.uniform(4, 7)
        return 0.75 + 0.25 * (np.sin(2 * np.pi * (xx + yy) / period) > 0)
    if cls == SQUARE:  # checkerboard
        cell = int(rng.integers(3, 6))
        return 0.7 + 0.3 * (((xx // cell) + (yy // cell)) % 2)
    gradient = (xx + rng.uniform(-1, 1) * yy) / xx.shape[1]  # smooth shading
    return 0.75 + 0.25 * gradient


def _ignore_borders(mask: np.ndarray) -> np.ndarray:
    """Labels 255 every pixel whose 4-neighbourhood holds another class (a 2-pixel band)."""
    border = np.zeros(mask.shape, dtype=bool)
    vertical = mask[1:, :] != mask[:-1, :]
    horizontal = mask[:, 1:] != mask[:, :-1]
    border[1:, :] |= vertical
    border[:-1, :] |= vertical
    border[:, 1:] |= horizontal
    border[:, :-1] |= horizontal
    out = mask.copy()
    out[border] = IGNORE_LABEL
    return out


def generate_scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Draws one scene.

    Returns:
        (uint8 RGB image [size, size, 3], uint8 mask [size, size] with ids 0..3 and 255).
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    base = colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0.0, 0.25), rng.uniform(0.3, 0.75))
    angle = rng.uniform(0, np.pi)
    wave = np.sin(rng.uniform(0.1, 0.5) * (xx * np.cos(angle) + yy * np.sin(angle)))
    image = np.array(base, np.float32) * 255.0 + 30.0 * wave[..., None]
    mask = np.zeros((size, size), dtype=np.uint8)
    for _ in range(int(rng.integers(2, 6))):
        cls = int(rng.integers(1, 4))
        radius = rng.uniform(0.08, 0.2) * size
        cx, cy = rng.uniform(0, size, 2)
        region = _shape_region(cls, xx, yy, cx, cy, radius, rng.uniform(0, 2 * np.pi))
        colour = _class_colour(cls, rng) * _texture(cls, xx, yy, rng)[..., None]
        image[region] = colour[region]
        mask[region] = cls
    image += rng.normal(0.0, 6.0, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), _ignore_borders(mask)


def write_dataset(root: Path, num_train: int, num_val: int, image_size: int, seed: int) -> None:
    """Generates the dataset into `root` (folder layout), atomically: all or nothing."""
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = root.parent / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    for sub in ("images", "masks", "splits"):
        (staging / sub).mkdir(parents=True)
    splits = {"train": range(num_train), "val": range(num_train, num_train + num_val)}
    for split, indices in splits.items():
        stems = []
        for index in indices:
            # One generator per scene: scene i is the same whatever the split sizes.
            image, mask = generate_scene(np.random.default_rng([seed, index]), image_size)
            stem = f"{split}_{index:05d}"
            Image.fromarray(image).save(staging / "images" / f"{stem}.png")
            Image.fromarray(mask).save(staging / "masks" / f"{stem}.png")
            stems.append(stem)
        (staging / "splits" / f"{split}.txt").write_text("\n".join(stems) + "\n")
    try:
        staging.rename(root)
    except OSError:
        # Another process finished first; its copy is identical.
        shutil.rmtree(staging, ignore_errors=True)
        if not root.is_dir():
            raise


class SyntheticSource(FolderSource):
    """The synthetic dataset, generated into `root` on first use and then read as a folder.

    Args:
        root: Cache folder for this configuration of the dataset.
        num_train: Number of training scenes.
        num_val: Number of validation scenes.
        image_size: Side of the square scenes in pixels.
        seed: Seed of the generator; scene i depends only on (seed, i).
        num_classes: `data.num_classes`, for the label range check (None = no check).
        ignore_label: `data.ignore_label`.
        on_error: `data.on_error`: raise or skip on broken examples.
    """

    name = "synthetic"
    dataset_num_classes = 4

    def __init__(
        self,
        root: str,
        num_train: int = 320,
        num_val: int = 64,
        image_size: int = 128,
        seed: int = 0,
        num_classes: int | None = None,
        ignore_label: int = IGNORE_LABEL,
        on_error: str = "raise",
    ):
        root_path = Path(root).expanduser()
        if not (root_path / "splits" / "val.txt").is_file():
            print(
                f"Generating the synthetic dataset ({num_train} train + {num_val} val images) "
                f"in {root_path} ...",
                flush=True,
            )
            write_dataset(root_path, num_train, num_val, image_size, seed)
        super().__init__(
            root, num_classes=num_classes, ignore_label=ignore_label, on_error=on_error
        )
