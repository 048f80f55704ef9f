"""data.label_map and data.mask_threshold: masks remapped as decoded, on both decode paths."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from seg_train.data import pipeline
from seg_train.errors import UserError
from seg_train.tasks.check import check_dataset
from seg_train.tasks.sources import build_source
from seg_train.training.fit import check_label_sample
from tests.fixture_writers import blocky_labels, photo
from tests.helpers import TINY_DATASET_RUN, cli_command, cli_env, compose_config

BINARY = ["data=folder", "data.num_classes=2", "data.class_names=[bg,fg]"]


def write_folder(root: Path, masks: dict[str, np.ndarray], images: dict[str, np.ndarray]) -> Path:
    """The folder layout: images/<stem>.jpg, masks/<stem>.png (8-bit grey), splits/*.txt."""
    for sub in ("images", "masks", "splits"):
        (root / sub).mkdir(parents=True)
    for stem, mask in masks.items():
        Image.fromarray(images[stem]).save(root / "images" / f"{stem}.jpg", quality=95)
        Image.fromarray(mask, mode="L").save(root / "masks" / f"{stem}.png")
    stems = sorted(masks)
    (root / "splits" / "train.txt").write_text("\n".join(stems[:-4]) + "\n")
    (root / "splits" / "val.txt").write_text("\n".join(stems[-4:]) + "\n")
    return root


def decode_both_ways(source, split: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The masks of a split through the pipeline (graph path) and through `decode` (Pillow)."""
    graph = [m for _, m in pipeline.decoded_dataset(source, split).as_numpy_iterator()]
    pillow = [
        source.decode(n.decode(), i, m).mask
        for n, i, m in source.records(split).as_numpy_iterator()
    ]
    return graph, pillow


def test_decode_applies_threshold_then_map_by_hand(tmp_path):
    # A soft mask with every value 0..255 once (16x16), and its image.
    soft = np.arange(256, dtype=np.uint8).reshape(16, 16)
    stems = [f"s{i}" for i in range(5)]
    images = {s: np.full((16, 16, 3), 100, np.uint8) for s in stems}
    root = write_folder(tmp_path / "soft", dict.fromkeys(stems, soft), images)

    # Threshold 100: values 101..255 -> 1, 0..100 -> 0; then {0: 255} ignores the background.
    cfg = compose_config(
        [*BINARY, f"data.root={root}", "data.mask_threshold=100", "data.label_map={0:255}"]
    )
    graph, pillow = decode_both_ways(build_source(cfg.data), "val")
    expected = np.where(soft.astype(int) > 100, 1, 255).astype(np.uint8)  # by hand
    for mask in [*graph, *pillow]:
        np.testing.assert_array_equal(mask, expected)

    # A map alone on a 3-class mask: 2 <-> 0 swapped, 255 kept (ignore), 1 unchanged.
    ids = np.array([[0, 1, 2, 255], [2, 2, 0, 1]], np.uint8)
    three = write_folder(
        tmp_path / "three",
        dict.fromkeys(stems, ids),
        {s: np.zeros((2, 4, 3), np.uint8) for s in stems},
    )
    cfg = compose_config(
        [
            "data=folder",
            "data.num_classes=3",
            "data.class_names=[a,b,c]",
            f"data.root={three}",
            "data.label_map={0:2,2:0}",
        ]
    )
    graph, pillow = decode_both_ways(build_source(cfg.data), "val")
    for mask in [*graph, *pillow]:
        np.testing.assert_array_equal(mask, [[2, 1, 0, 255], [0, 0, 2, 1]])


def binary_dataset(root: Path, foreground: int, seed: int = 0) -> Path:
    """16 train + 4 val pairs of blocky 0/`foreground` masks; same images for any foreground."""
    rng = np.random.default_rng(seed)
    masks, images = {}, {}
    for i in range(20):
        labels = blocky_labels(rng, [0, 0, 1], shape=(32, 32), block=8)
        images[f"p{i:02d}"] = photo(rng, labels * 3)
        masks[f"p{i:02d}"] = (labels * foreground).astype(np.uint8)
    return write_folder(root, masks, images)


def test_check_offers_the_override_and_no_class_weights(tmp_path):
    root = binary_dataset(tmp_path / "b255", 255)
    cfg = compose_config([*BINARY, f"data.root={root}"])
    report = check_dataset(build_source(cfg.data), cfg.data, ["train"], workers=1)
    assert report["num_errors"] == 16
    assert "'data.label_map={255:1}'" in report["errors"][0]["problem"]
    assert report["class_weights"] is None  # nothing suggested for data called broken

    cfg = compose_config([*BINARY, f"data.root={root}", "data.label_map={255:1}"])
    report = check_dataset(build_source(cfg.data), cfg.data, ["train"], workers=1)
    assert report["errors"] == [] and set(report["label_histogram"]) == {"0", "1"}
    # Median-frequency balancing (Eigen & Fergus 2015) by hand from the mask files: f_c = pixels
    # of c / pixels of the images holding c; weight_c = median(f) / f_c.
    stems = (root / "splits" / "train.txt").read_text().split()
    masks = [np.asarray(Image.open(root / "masks" / f"{stem}.png")) // 255 for stem in stems]
    freq = []
    for c in (0, 1):
        holding = [m for m in masks if (m == c).any()]
        freq.append(sum(int((m == c).sum()) for m in holding) / sum(m.size for m in holding))
    median = (freq[0] + freq[1]) / 2
    assert report["class_weights"] == pytest.approx(
        {"bg": median / freq[0], "fg": median / freq[1]}, abs=1e-6
    )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.label_map={300:1}", "data.label_map must map mask values 0..255"),
        ("data.label_map={255:7}", "data.label_map maps 255 to 7, which is neither a class id"),
        ("data.mask_threshold=255", "data.mask_threshold must be null or an integer in 0..254"),
        ("data.mask_threshold=abc", "data.mask_threshold must be null or an integer in 0..254"),
        ("data.label_map=[1,2]", "data.label_map must be a mapping"),
    ],
)
def test_bad_remaps_are_named(tmp_path, override, message):
    root = binary_dataset(tmp_path / "b", 1)
    cfg = compose_config([*BINARY, f"data.root={root}", override])
    with pytest.raises(UserError, match=message):
        build_source(cfg.data)


def test_training_refuses_0_255_masks_naming_the_override():
    mask = np.zeros((8, 8), np.uint8)
    mask[2:6, 2:6] = 255
    dataset = tf.data.Dataset.from_tensors((np.zeros((8, 8, 3), np.uint8), mask))
    cfg = compose_config([*BINARY, "data.root=/data/em"])
    with pytest.raises(UserError, match=re.escape("add 'data.label_map={255:1}' to train")):
        check_label_sample(dataset, cfg.data.ignore_label, cfg.data.root)


@pytest.mark.slow
def test_training_on_0_255_with_label_map_matches_pre_converted(tmp_path, cache_dir):
    """The EM-membrane case of issue 17: the same run as on masks converted beforehand."""
    converted = binary_dataset(tmp_path / "b01", 1)
    raw = binary_dataset(tmp_path / "b0255", 255)
    args = [*BINARY, *TINY_DATASET_RUN, "trainer.epochs=2", "seed=3"]
    runs = {
        "mapped": [*args, f"data.root={raw}", "data.label_map={255:1}"],
        "reference": [*args, f"data.root={converted}"],
    }
    # Both at once: each spends most of its time starting up and tracing.
    started = {
        name: subprocess.Popen(
            [*cli_command(run), f"hydra.run.dir={tmp_path / name}"],
            cwd=tmp_path,
            env=cli_env(cache_dir),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, run in runs.items()
    }
    metrics = {}
    for name, process in started.items():
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr[-3000:]
        metrics[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    mapped, reference = metrics["mapped"], metrics["reference"]
    print(
        f"val mIoU: label_map {mapped['mean_iou']:.4f}, pre-converted "
        f"{reference['mean_iou']:.4f}; foreground IoU {mapped['per_class_iou']}"
    )
    # The same decoded labels and seed: the same run, up to float non-associativity.
    assert mapped["mean_iou"] == pytest.approx(reference["mean_iou"], abs=0.01)
    assert mapped["per_class_iou"] == pytest.approx(reference["per_class_iou"], abs=0.01)
