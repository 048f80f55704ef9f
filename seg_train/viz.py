"""Colours, overlays, class-id PNGs and plots (Pillow and matplotlib; no TensorFlow)."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

# Colour of the ignore label (255) in colourised masks: PASCAL VOC's boundary colour.
IGNORE_COLOUR = (224, 224, 192)


def voc_palette(num_colours: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map (bit-interleaved class ids), uint8 [num_colours, 3]."""
    palette = np.zeros((num_colours, 3), dtype=np.uint8)
    for index in range(num_colours):
        value, colour = index, [0, 0, 0]
        for shift in range(7, -1, -1):
            for channel in range(3):
                colour[channel] |= ((value >> channel) & 1) << shift
            value >>= 3
        palette[index] = colour
    return palette


def full_palette(palette: Sequence[Sequence[int]] | None) -> np.ndarray:
    """A 256-entry uint8 palette: the dataset's colours first, VOC colours after, 255 = ignore."""
    table = voc_palette()
    if palette is not None:
        table[: len(palette)] = np.asarray(palette, dtype=np.uint8)
    table[255] = IGNORE_COLOUR
    return table


def colorize(ids: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Maps a uint8 id map [H, W] to RGB [H, W, 3] with a 256-entry palette."""
    return palette[ids]


def overlay(
    image: np.ndarray, ids: np.ndarray, palette: np.ndarray, alpha: float = 0.5
) -> np.ndarray:
    """Blends the colourised ids over an RGB image; `alpha` is the mask's weight."""
    blended = (1 - alpha) * image.astype(np.float32) + alpha * colorize(ids, palette)
    return np.clip(blended, 0, 255).astype(np.uint8)


def save_id_png(path: Path, ids: np.ndarray, palette: np.ndarray) -> None:
    """Writes a palette-indexed PNG whose pixel values are the class ids."""
    image = Image.fromarray(ids.astype(np.uint8))  # mode "L"
    image.putpalette(palette.astype(np.uint8).tobytes())  # turns it into mode "P", same values
    image.save(path)


def sample_panel(
    image: np.ndarray,
    truth: np.ndarray | None,
    prediction: np.ndarray,
    palette: np.ndarray,
    alpha: float = 0.5,
) -> np.ndarray:
    """image | truth overlay | prediction overlay, side by side (truth may be None)."""
    tiles = [image.astype(np.uint8)]
    if truth is not None:
        tiles.append(overlay(image, truth, palette, alpha))
    tiles.append(overlay(image, prediction, palette, alpha))
    return np.concatenate(tiles, axis=1)


def plot_history(history_csv: Path, out_png: Path) -> None:
    """Plots every metric of a Keras CSVLogger file, train and val together, one panel each.

    A val metric without a train counterpart (e.g. `val_pixel_accuracy` of the
    original-resolution validation) gets a panel of its own; epochs without a value ("NA",
    as CSVLogger writes epochs that were not validated) are left out.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(history_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    keys = [k for k in rows[0] if k not in ("epoch", "learning_rate")]
    names = [k for k in keys if not k.startswith("val_")]
    names += [k.removeprefix("val_") for k in keys
              if k.startswith("val_") and k.removeprefix("val_") not in names]
    if not names:
        return
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    epochs = [int(r["epoch"]) + 1 for r in rows]
    for ax, name in zip(axes[0], names):
        for key, label in ((name, "train"), (f"val_{name}", "val")):
            values = [(e, v) for e, r in zip(epochs, rows) if (v := _number(r.get(key)))
                      is not None]
            if values:
                ax.plot(*zip(*values), marker="o", label=label)
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def _number(text: str | None) -> float | None:
    """A CSV cell as a finite float, None when empty, "NA" or not finite."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if np.isfinite(value) else None


def plot_confusion(matrix: np.ndarray, class_names: Sequence[str], out_png: Path) -> None:
    """Saves the row-normalised confusion matrix (rows = truth) with class names on the axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = matrix.sum(1, keepdims=True)
    normalised = np.divide(matrix, rows, out=np.zeros(matrix.shape, float), where=rows > 0)
    size = max(4.0, 0.45 * len(class_names) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    shown = ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    ticks = range(len(class_names))
    ax.set_xticks(ticks, class_names, rotation=90)
    ax.set_yticks(ticks, class_names)
    ax.set_xlabel("prediction")
    ax.set_ylabel("truth")
    if len(class_names) <= 25:
        for i in ticks:
            for j in ticks:
                if normalised[i, j] >= 0.005:
                    colour = "white" if normalised[i, j] > 0.5 else "black"
                    ax.text(
                        j,
                        i,
                        f"{normalised[i, j]:.2f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color=colour,
                    )
    fig.colorbar(shown, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
