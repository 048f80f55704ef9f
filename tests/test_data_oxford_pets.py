"""Oxford-IIIT Pet through TFDS (mocked) and through the raw release layout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from seg_train.data import decode, oxford_pets, pipeline
from seg_train.data.oxford_pets import OxfordPetsRaw, OxfordPetsTFDS, make_source
from seg_train.data.readers import DataError
from seg_train.errors import UserError
from tests.fixture_writers import (
    H,
    W,
    mock_pets,
    pet_names,
    pets_tfds_examples,
    write_pets_raw,
)
from tests.helpers import (
    REPO,
    TINY_DATASET_RUN,
    compose_config,
    error_lines,
    run_cli,
    train_through_cli,
)

TRAIN = pet_names(6)
TEST = pet_names(3, offset=50)


@pytest.fixture
def pets_root(tmp_path):
    root = tmp_path / "oxford-iiit-pet"
    return root, write_pets_raw(root, TRAIN, TEST)


@pytest.fixture
def manual_dir(tmp_path):
    """A TFDS manual dir holding the release archives (placeholders: TFDS is mocked)."""
    path = tmp_path / "manual"
    path.mkdir()
    for name in ("images.tar.gz", "annotations.tar.gz"):
        (path / name).write_bytes(b"placeholder")
    return path


def test_trimap_mapping_follows_the_tutorial():
    trimap = np.array([[1, 2, 3]], dtype=np.uint8)
    np.testing.assert_array_equal(oxford_pets.trimap_to_labels(trimap), [[0, 1, 2]])
    np.testing.assert_array_equal(
        oxford_pets.trimap_to_labels(trimap, border_as_ignore=True), [[0, 1, 255]]
    )
    with pytest.raises(DataError, match=r"trimap holds value\(s\) \[0, 7\]"):
        oxford_pets.trimap_to_labels(np.array([[0, 1, 7]], dtype=np.uint8))


def test_raw_layout_decodes_trimaps_exactly(pets_root):
    root, trimaps = pets_root
    source = OxfordPetsRaw(str(root), num_classes=3)
    assert source.splits == ("train", "val", "test")
    decoded = list(pipeline.decoded_dataset(source, "val").as_numpy_iterator())  # val = test
    assert len(decoded) == len(TEST)
    for name, (image, mask) in zip(TEST, decoded):
        assert image.shape == (H, W, 3)
        np.testing.assert_array_equal(mask, trimaps[name] - 1)
    ignoring = OxfordPetsRaw(str(root), border_as_ignore=True, num_classes=2)
    _, mask = next(pipeline.decoded_dataset(ignoring, "val").as_numpy_iterator())
    expected = np.where(trimaps[TEST[0]] == 3, 255, trimaps[TEST[0]] - 1)
    np.testing.assert_array_equal(mask, expected)


def test_raw_splits_take_tfds_slicing(pets_root):
    root, _ = pets_root
    source = OxfordPetsRaw(str(root), splits={"train": "train[:4]", "val": "train[4:]+test[:1]"})
    assert [e.image_path.split("/")[-1] for e in source.examples("val")] == [
        f"{TRAIN[4]}.jpg",
        f"{TRAIN[5]}.jpg",
        f"{TEST[0]}.jpg",
    ]
    assert source.num_examples("train") == 4
    with pytest.raises(UserError, match="names \\['trainval'\\]"):
        OxfordPetsRaw(str(root), splits={"train": "trainval", "val": "test"}).records("train")


def test_config_matches_the_module_and_class_count_is_checked(pets_root):
    cfg = compose_config(["data=oxford_pets"])
    assert tuple(cfg.data.class_names) == oxford_pets.CLASS_NAMES
    assert [list(c) for c in cfg.data.palette] == oxford_pets.PALETTE
    assert cfg.data.format == "tfds" and dict(cfg.data.splits) == oxford_pets.DEFAULT_SPLITS
    root, _ = pets_root
    with pytest.raises(UserError, match="also set data.num_classes=2"):
        OxfordPetsRaw(str(root), border_as_ignore=True, num_classes=3)
    with pytest.raises(UserError, match="contradicts data=oxford_pets"):
        OxfordPetsRaw(str(root), num_classes=21)


def test_bad_trimap_and_missing_root_are_named(pets_root, tmp_path):
    root, trimaps = pets_root
    bad = trimaps[TEST[1]].copy()
    bad[0, 0] = 0
    Image.fromarray(bad, mode="L").save(root / "annotations" / "trimaps" / f"{TEST[1]}.png")
    with (
        pytest.raises(UserError, match=f"{TEST[1]}.png: trimap holds value"),
        decode.data_errors_as_user_errors(),
    ):
        list(pipeline.decoded_dataset(OxfordPetsRaw(str(root)), "val"))
    with pytest.raises(UserError) as info:
        make_source("raw", root=str(tmp_path))
    assert "annotations/{trimaps/<name>.png, trainval.txt, test.txt}" in str(info.value)
    assert f"did you mean data.root={root}" in str(info.value)
    with pytest.raises(UserError, match="needs data.root"):
        make_source("raw", root=None)


def test_tfds_records_decode_exactly(manual_dir):
    examples = {"train": pets_tfds_examples(4, seed=0), "test": pets_tfds_examples(3, seed=1)}
    with mock_pets(examples):
        source = OxfordPetsTFDS(manual_dir=str(manual_dir), num_classes=3)
        assert source.num_examples("train") == 4 and source.num_examples("test") == 3
        decoded = list(pipeline.decoded_dataset(source, "val").as_numpy_iterator())
        names = [n.decode() for n, _, _ in source.records("val").as_numpy_iterator()]
    assert names == [e["file_name"] for e in examples["test"]]
    for example, (image, mask) in zip(examples["test"], decoded):
        assert image.shape == (H, W, 3)
        np.testing.assert_array_equal(mask, example["segmentation_mask"][..., 0] - 1)


def test_tfds_offline_says_how_to_prepare_the_data(tmp_path, monkeypatch):
    data_dir = tmp_path / "tfds"
    with pytest.raises(UserError) as info:
        OxfordPetsTFDS(data_dir=str(data_dir), download=False)
    message = str(info.value)
    for fragment in (
        "not prepared",
        "data.tfds.data_dir",
        "images.tar.gz",
        "data.tfds.manual_dir",
        "data.format=raw",
    ):
        assert fragment in message
    assert "\n" not in message
    # Offline, TFDS would retry each download for minutes; the check fails at once instead.
    monkeypatch.setattr(oxford_pets, "_reachable", lambda host: False)
    with pytest.raises(UserError, match="thor.robots.ox.ac.uk cannot be reached"):
        OxfordPetsTFDS(data_dir=str(data_dir), download=True)


@pytest.mark.slow
def test_training_on_raw_pets_through_the_cli(pets_root, tmp_path, cache_dir):
    root, _ = pets_root
    metrics = train_through_cli(
        ["data=oxford_pets", "data.format=raw", f"data.root={root}"],
        tmp_path / "run",
        cache_dir,
        tmp_path,
    )
    assert metrics["num_images"] == len(TEST)
    assert set(metrics["per_class_iou"]) == {"pet", "background", "border"}


@pytest.mark.slow
def test_training_on_mocked_tfds_through_the_cli(tmp_path, cache_dir, manual_dir):
    """The real CLI in a subprocess whose TFDS is mocked (it has no network to download)."""
    run_dir = tmp_path / "run"
    runner = textwrap.dedent(f"""
        import sys
        from seg_train import cli
        from tests.fixture_writers import mock_pets, pets_tfds_examples
        examples = {{"train": pets_tfds_examples(6, 0), "test": pets_tfds_examples(3, 1)}}
        sys.argv = ["seg-train", "data=oxford_pets", "data.tfds.manual_dir={manual_dir}",
                    *{TINY_DATASET_RUN!r}, "hydra.run.dir={run_dir}"]
        with mock_pets(examples):
            cli.main()
    """)
    result = subprocess.run(
        [sys.executable, "-c", runner],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**_env(), "SEG_TRAIN_CACHE_DIR": str(cache_dir)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["num_images"] == 3 and metrics["dataset"] == "oxford_pets"


@pytest.mark.slow
def test_tfds_offline_through_the_cli_is_one_line(tmp_path, cache_dir):
    result = run_cli(
        [
            "data=oxford_pets",
            f"data.tfds.data_dir={tmp_path / 'tfds'}",
            "data.tfds.download=false",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cache_dir,
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    (line,) = error_lines(result)
    assert "not prepared" in line and "data.format=raw" in line


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
