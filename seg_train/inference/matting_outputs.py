"""What matting inference writes per image: the alpha, the cut-out and an overlay.

<stem>_alpha.png    8-bit alpha (0..255) at the image's original size
<stem>_cutout.png   RGBA: the image with the predicted alpha as its alpha channel
<stem>_overlay.png  the image with the alpha shown as a tinted layer
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

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


def save_alpha_outputs(
    image: np.ndarray, alpha: np.ndarray, out_dir: Path | str, stem: str
) -> list[Path]:
    """Writes `<stem>_alpha.png`, `<stem>_cutout.png` and `<stem>_overlay.png`.

    Args:
        image: uint8 RGB [H, W, 3] at its original size.
        alpha: Predicted alpha [H, W] in [0, 1] at the same size.
        out_dir: Output folder (created if missing).
        stem: The input file's stem.

    Returns:
        The written paths, in that order.
    """
    if alpha.shape != image.shape[:2]:
        raise ValueError(f"alpha {alpha.shape} must match the image {image.shape[:2]}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}_{kind}.png" for kind in ("alpha", "cutout", "overlay")]
    Image.fromarray(alpha_to_uint8(alpha), mode="L").save(paths[0])
    Image.fromarray(cutout(image, alpha), mode="RGBA").save(paths[1])
    Image.fromarray(overlay(image, alpha), mode="RGB").save(paths[2])
    return paths
