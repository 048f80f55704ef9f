"""`seg-train mode=export`: SavedModel and TFLite exports, their parity check, no overwriting."""

from __future__ import annotations

import json
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from seg_train.config_checks import check_config
from seg_train.errors import UserError
from seg_train.inference import serving
from seg_train.inference.predictor import Predictor
from seg_train.inference.serving import (
    check_parity,
    pixel_agreement,
    publish,
    refuse_existing,
    write_saved_model,
)
from seg_train.models.unet import build_unet
from tests.helpers import TINY_TRAIN, compose_config, error_lines, run_cli

NUM_CLASSES = 4


def _fixed_only_model() -> keras.Model:
    """A model that only takes 32x32 inputs (its reshape fixes the size), like a Dense head."""
    inputs = keras.Input((32, 32, 3), name="image")
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(NUM_CLASSES, 3, padding="same")(x)
    x = keras.layers.Reshape((32 * 32, NUM_CLASSES))(x)
    outputs = keras.layers.Reshape((32, 32, NUM_CLASSES))(x)
    return keras.Model(inputs, outputs)


@pytest.mark.parametrize("kind", ["dynamic_twin", "fixed_only"])
def test_saved_model_equals_predictor_labels(tmp_path, kind):
    keras.utils.set_random_seed(0)
    if kind == "dynamic_twin":
        model = build_unet(NUM_CLASSES, (32, 32, 3), base_filters=4, depth=3, batch_norm=True)
    else:
        model = _fixed_only_model()
    predictor = Predictor(model, size_divisor=32)
    # Both whole-mode branches are covered: padding for the twin, resizing for the other.
    assert predictor.resize_to_fixed == (kind == "fixed_only")
    write_saved_model(predictor, tmp_path / "sm", with_probabilities=True)
    serve = tf.saved_model.load(str(tmp_path / "sm")).signatures["serving_default"]

    rng = np.random.default_rng(0)
    for height, width in ((32, 32), (37, 51), (20, 70)):
        batch = rng.integers(0, 256, (2, height, width, 3), dtype=np.uint8)
        outputs = serve(images=tf.constant(batch))
        ids, probs = outputs["class_ids"].numpy(), outputs["probabilities"].numpy()
        assert ids.dtype == np.uint8 and ids.shape == (2, height, width)
        assert probs.dtype == np.float32 and probs.shape == (2, height, width, NUM_CLASSES)
        for image, image_ids, image_probs in zip(batch, ids, probs):
            np.testing.assert_array_equal(image_ids, predictor.labels(image))
            np.testing.assert_allclose(image_probs, predictor.probabilities(image), atol=1e-5)


def test_publish_replaces_an_export_only_when_asked(tmp_path):
    out = tmp_path / "export"
    first = tmp_path / "staging1"
    first.mkdir()
    (first / "model.tflite").write_text("one")
    publish(first, out, overwrite=False)
    assert (out / "model.tflite").read_text() == "one" and not first.exists()

    second = tmp_path / "staging2"
    second.mkdir()
    (second / "model.tflite").write_text("two")
    with pytest.raises(UserError, match="export.overwrite=true"):
        publish(second, out, overwrite=False)
    assert (out / "model.tflite").read_text() == "one"
    publish(second, out, overwrite=True)
    assert (out / "model.tflite").read_text() == "two"
    # No leftovers of the swap next to the export.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    # An empty directory is not an export: it may be filled without overwrite=true.
    empty = tmp_path / "empty"
    empty.mkdir()
    refuse_existing(empty, overwrite=False)


def test_parity_below_threshold_is_reported_as_failed(monkeypatch):
    keras.utils.set_random_seed(0)
    predictor = Predictor(build_unet(NUM_CLASSES, (32, 32, 3), base_filters=4, depth=3))
    images = [np.zeros((32, 32, 3), np.uint8), np.full((32, 32, 3), 200, np.uint8)]
    right = [predictor.labels(image) for image in images]
    wrong = [right[0], (right[1] + 1) % NUM_CLASSES]  # every pixel of the 2nd image differs

    def fake_fresh_process(artefact, fmt, images):
        return wrong

    monkeypatch.setattr(serving, "run_in_fresh_process", fake_fresh_process)
    report = check_parity(None, "saved_model", predictor, images, threshold=0.999)
    assert report["agreement"] == 0.5 and not report["passed"]
    assert report["min_image_agreement"] == 0.0
    report = check_parity(None, "saved_model", predictor, images, threshold=0.5)
    assert report["passed"]


def test_pixel_agreement_counts_wrong_shapes_as_disagreement():
    reference = [np.zeros((2, 5), np.uint8), np.ones((4, 4), np.uint8)]
    exported = [np.array([[0, 0, 0, 0, 1], [0, 0, 0, 0, 0]], np.uint8), np.ones((3, 4), np.uint8)]
    report = pixel_agreement(exported, reference)
    assert report["num_pixels"] == 26 and report["agreeing_pixels"] == 9
    assert report["min_image_agreement"] == 0.0 and report["num_images"] == 2


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ([], "mode=export needs a checkpoint"),
        (["ckpt_path=/no/such/run"], "does not exist"),
        (["ckpt_path=.", "export.format=onnx"], "export.format must be one of"),
        (["ckpt_path=.", "export.parity_threshold=99.9"], "export.parity_threshold"),
        (["ckpt_path=.", "export.parity_images=-1"], "export.parity_images"),
    ],
)
def test_export_config_mistakes_are_user_errors(overrides, message):
    with pytest.raises(UserError, match=re.escape(message)):
        check_config(compose_config(["mode=export", *overrides]))


# ----- through the CLI -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, cache_dir):
    """One tiny training run (32 px U-Net, 8 val images) exported by the tests below."""
    work = tmp_path_factory.mktemp("export")
    run_dir = work / "train"
    result = run_cli([*TINY_TRAIN, f"hydra.run.dir={run_dir}"], cache_dir, cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def _printed_parity(stdout: str, fmt: str) -> float:
    match = re.search(rf"Export parity \({fmt}\): ([\d.]+)% of ([\d,]+) pixels", stdout)
    assert match, stdout[-2000:]
    return float(match.group(1))


@pytest.mark.slow
def test_saved_model_export_round_trips(trained_run, cache_dir, tmp_path):
    args = ["mode=export", f"ckpt_path={trained_run}", f"hydra.run.dir={tmp_path / 'x'}"]
    result = run_cli(args, cache_dir, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    export = tmp_path / "x" / "export"
    assert (export / "saved_model" / "saved_model.pb").is_file()
    parity = json.loads((export / "parity.json").read_text())
    assert parity["passed"] and parity["agreement"] >= 0.999
    assert parity["num_images"] == 8 and parity["num_pixels"] == 8 * 32 * 32
    assert _printed_parity(result.stdout, "saved_model") >= 99.9
    metadata = json.loads((export / "metadata.json").read_text())
    assert metadata["class_names"] == ["background", "disc", "square", "triangle"]

    # The serving signature takes any size: an odd-sized uint8 batch.
    serve = tf.saved_model.load(str(export / "saved_model")).signatures["serving_default"]
    batch = np.random.default_rng(1).integers(0, 256, (2, 45, 61, 3), dtype=np.uint8)
    outputs = serve(images=tf.constant(batch))
    assert set(outputs) == {"class_ids"}  # export.with_probabilities=false
    ids = outputs["class_ids"].numpy()
    assert ids.dtype == np.uint8 and ids.shape == (2, 45, 61)
    assert ids.max() < NUM_CLASSES


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*tf.lite.Interpreter is deprecated:UserWarning")
def test_tflite_export_records_parity(trained_run, cache_dir, tmp_path):
    out = tmp_path / "mobile"
    args = [
        "mode=export",
        f"ckpt_path={trained_run / 'checkpoints' / 'best.keras'}",
        "export.format=tflite",
        "export.with_probabilities=true",
        f"export.output_dir={out}",
        f"hydra.run.dir={tmp_path / 'x'}",
    ]
    result = run_cli(args, cache_dir, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    parity = json.loads((out / "parity.json").read_text())
    assert parity["passed"] and parity["input_size"] == [32, 32]
    assert _printed_parity(result.stdout, "tflite") >= 99.9

    interpreter = tf.lite.Interpreter(model_path=str(out / "model.tflite"))
    runner = interpreter.get_signature_runner("serving_default")
    spec = runner.get_input_details()["images"]
    assert list(spec["shape"]) == [1, 32, 32, 3] and spec["dtype"] == np.uint8
    outputs = runner(images=np.full((1, 32, 32, 3), 128, np.uint8))
    assert outputs["class_ids"].shape == (1, 32, 32) and outputs["class_ids"].dtype == np.uint8
    assert outputs["probabilities"].shape == (1, 32, 32, NUM_CLASSES)


@pytest.mark.slow
def test_export_refuses_to_overwrite(trained_run, cache_dir, tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "keep.txt").write_text("an earlier export")
    args = [
        "mode=export",
        f"ckpt_path={trained_run}",
        f"export.output_dir={out}",
        f"hydra.run.dir={tmp_path / 'x'}",
    ]
    result = run_cli(args, cache_dir, cwd=tmp_path)
    assert result.returncode == 2
    lines = error_lines(result)
    assert len(lines) == 1 and "already holds an export" in lines[0], lines
    assert "export.overwrite=true" in lines[0]
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
