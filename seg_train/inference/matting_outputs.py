"""What matting inference writes per image: the alpha, the cut-out and an overlay.

<stem>_alpha.png    8-bit alpha (0..255) at the image's original size
<stem>_cutout.png   RGBA: the image with the predicted alpha as its alpha channel
<stem>_overlay.png  the image with the alpha shown as a tinted layer
<stem>_alpha.npy    with infer.save_probs: the alpha as float16 [H, W] in [0, 1], unrounded
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from seg_train.files import write_atomic

# The three image outputs' name endings after the input's stem, in the order written; the
# unrounded alpha (infer.save_probs) is ALPHA_ARRAY_SUFFIX.
IMAGE_SUFFIXES = ("_overlay.png", "_cutout.png", "_alpha.png")
ALPHA_ARRAY_SUFFIX = "_alpha.npy"
# The portrait palette's person colour.
OVERLAY_COLOUR = (192, 128, 128)


def alpha_to_uint8(alpha: np.ndarray) -> np.ndarray:
    """[H, W] alpha in [0, 1] -> uint8 0..255, rounded (values outside [0, 1] clipped)."""
    return np.round(np.clip(alpha, 0.0, 1.0) * 255.0).astype(np.uint8)


def cutout(image: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """uint8 RGBA [H, W, 4]: the RGB image unchanged, the alpha as its fourth channel."""
    return np.concatenate([image.astype(np.uint8), alpha_to_uint8(alpha)[..., None]], axis=-1)


def overlay(
    image: np.ndarray,
    alpha: np.ndarray,
    colour: Sequence[int] = OVERLAY_COLOUR,
    opacity: float = 0.5,
) -> np.ndarray:
    """uint8 RGB: the image blended towards `colour` in proportion to alpha * opacity."""
    weight = (np.clip(alpha, 0.0, 1.0) * opacity)[..., None]
    blended = image.astype(np.float64) * (1 - weight) + np.asarray(colour, np.float64) * weight
    return np.round(blended).astype(np.uint8)


def write_alpha_outputs(paths: Sequence[Path | None], image: np.ndarray, alpha: np.ndarray) -> None:
    """Writes one image's overlay, cut-out, alpha PNG and (where its path is not None) the
    float16 alpha array, each under a temporary name renamed into place, so a file that
    exists is whole.

    Args:
        paths: (overlay PNG, cut-out PNG, alpha PNG, alpha .npy or None), as IMAGE_SUFFIXES
            and ALPHA_ARRAY_SUFFIX name them.
        image: uint8 RGB [H, W, 3] at its original size.
        alpha: Predicted alpha [H, W] in [0, 1] at the same size.
    """
    if alpha.shape != image.shape[:2]:
        raise ValueError(f"alpha {alpha.shape} must match the image {image.shape[:2]}")
    overlay_png, cutout_png, alpha_png, alpha_npy = paths
    if alpha_npy is not None:
        write_atomic(alpha_npy, lambda f: np.save(f, np.clip(alpha, 0, 1).astype(np.float16)))
    write_atomic(overlay_png, lambda f: Image.fromarray(overlay(image, alpha)).save(f))
    write_atomic(cutout_png, lambda f: Image.fromarray(cutout(image, alpha)).save(f))
    write_atomic(alpha_png, lambda f: Image.fromarray(alpha_to_uint8(alpha)).save(f))


def save_alpha_outputs(
    image: np.ndarray, alpha: np.ndarray, out_dir: Path | str, stem: str
) -> list[Path]:
    """Writes `<stem>_alpha.png`, `<stem>_cutout.png` and `<stem>_overlay.png` into `out_dir`
    (created if missing).

    Returns:
        The written paths: alpha, cut-out, overlay.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    overlay_png, cutout_png, alpha_png = (out_dir / f"{stem}{s}" for s in IMAGE_SUFFIXES)
    write_alpha_outputs((overlay_png, cutout_png, alpha_png, None), image, alpha)
    return [alpha_png, cutout_png, overlay_png]
