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
    class_names: Sequence[str] | None = None,
) -> np.ndarray:
    """image | truth overlay | prediction overlay, side by side (truth may be None).

    With `class_names`, the panel gets a title above each column and, below, a legend of the
    classes present in the truth or the prediction (swatch in the palette colour, then the
    name; "ignore" for the ignore label), so a PNG read on its own says what it shows.
    """
    tiles = [image.astype(np.uint8)]
    if truth is not None:
        tiles.append(overlay(image, truth, palette, alpha))
    tiles.append(overlay(image, prediction, palette, alpha))
    panel = np.concatenate(tiles, axis=1)
    if class_names is None:
        return panel
    titles = ["image", "truth", "prediction"] if truth is not None else ["image", "prediction"]
    present = np.unique(
        prediction if truth is None else np.concatenate([np.unique(truth), np.unique(prediction)])
    )
    legend = [
        (palette[int(i)], "ignore" if i == 255 else _class_name(class_names, int(i)))
        for i in present
    ]
    return _titled(panel, len(tiles), titles, legend)


# Columns narrower than this are enlarged (nearest neighbour) so their titles fit.
MIN_COLUMN_WIDTH = 128
LABEL_SIZE = 14


def _class_name(names: Sequence[str], index: int) -> str:
    return str(names[index]) if index < len(names) else f"class {index}"


def _titled(
    panel: np.ndarray, columns: int, titles: Sequence[str], legend: Sequence[tuple]
) -> np.ndarray:
    """`panel` with a white title strip above its `columns` and a wrapped legend below."""
    from PIL import ImageDraw, ImageFont

    factor = -(-MIN_COLUMN_WIDTH // (panel.shape[1] // columns))  # ceil; 1 for real photos
    if factor > 1:
        panel = panel.repeat(factor, axis=0).repeat(factor, axis=1)
    height, width = panel.shape[:2]
    column = width // columns
    try:
        font = ImageFont.load_default(size=LABEL_SIZE)
    except (ImportError, OSError, TypeError):  # Pillow without FreeType: the bitmap font
        font = ImageFont.load_default()
    line = LABEL_SIZE + 8
    swatch = LABEL_SIZE - 2
    # Lay the legend out first: entries wrap onto as many lines as the panel width needs.
    entries, x, rows = [], 4, 1
    for colour, name in legend:
        entry = swatch + 4 + int(font.getlength(name)) + 12
        if x + entry > width and x > 4:
            x, rows = 4, rows + 1
        entries.append((x, rows - 1, colour, name))
        x += entry
    canvas = Image.new("RGB", (width, line + height + rows * line), "white")
    canvas.paste(Image.fromarray(panel), (0, line))
    draw = ImageDraw.Draw(canvas)
    for index, title in enumerate(titles):
        text = int(font.getlength(title))
        draw.text((index * column + (column - text) // 2, 4), title, fill="black", font=font)
    for x, row, colour, name in entries:
        top = line + height + row * line + 4
        draw.rectangle(
            (x, top, x + swatch, top + swatch), fill=tuple(int(c) for c in colour), outline="black"
        )
        draw.text((x + swatch + 4, top - 2), name, fill="black", font=font)
    return np.asarray(canvas)


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
    names += [
        k.removeprefix("val_")
        for k in keys
        if k.startswith("val_") and k.removeprefix("val_") not in names
    ]
    if not names:
        return
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    epochs = [int(r["epoch"]) + 1 for r in rows]
    for ax, name in zip(axes[0], names):
        for key, label in ((name, "train"), (f"val_{name}", "val")):
            values = [
                (e, v) for e, r in zip(epochs, rows) if (v := _number(r.get(key))) is not None
            ]
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
