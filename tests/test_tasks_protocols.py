"""Data and evaluation protocols: data.transform, data.pad_value, trainer.val_protocol and the
fixed-size fallback of prediction (issue 14, items 1 and 7).

Expected values come from Pillow, NumPy or hand computations written out here, never from the
functions under test.
"""

from __future__ import annotations

import csv
import json
import logging

import keras
import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from seg_train.config_checks import check_config
from seg_train.data import pipeline
from seg_train.errors import UserError
from seg_train.inference.predictor import Predictor
from seg_train.tasks.evaluate import evaluate_model
from seg_train.tasks.instantiate import predictor_from_config
from tests.fixture_writers import write_folder_dataset
from tests.helpers import TINY_TRAIN, compose_config, run_cli, small_pipeline_options

# Four quadrant colours and mask ids: top-left, top-right, bottom-left, bottom-right.
QUADRANT_COLOURS = [(250, 10, 10), (10, 250, 10), (10, 10, 250), (250, 250, 250)]
QUADRANT_IDS = [1, 2, 3, 4]


def quadrant_pair(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """An image and mask whose four quadrants have distinct colours and ids."""
    image = np.zeros((height, width, 3), np.uint8)
    mask = np.zeros((height, width), np.uint8)
    half_h, half_w = height // 2, width // 2
    quadrants = [
        (slice(0, half_h), slice(0, half_w)),
        (slice(0, half_h), slice(half_w, None)),
        (slice(half_h, None), slice(0, half_w)),
        (slice(half_h, None), slice(half_w, None)),
    ]
    for (rows, cols), colour, label in zip(quadrants, QUADRANT_COLOURS, QUADRANT_IDS):
        image[rows, cols] = colour
        mask[rows, cols] = label
    return image, mask


def samples(source, data, seed=0, batches=4):
    """(image, mask) training samples as numpy arrays."""
    out = []
    for images, masks in pipeline.train_dataset(source, data, seed, repeat=True).take(batches):
        out += list(zip(images.numpy(), masks.numpy()))
    return out


# ----- data.transform=resize ---------------------------------------------------------------------
def test_resize_sample_shows_the_whole_image_at_its_corners(tmp_path):
    image, mask = quadrant_pair(30, 50)
    source = write_folder_dataset(tmp_path, [mask], [image])
    # scale_range [1, 1]: a crop could only ever show one or two quadrants of a 30x50 image.
    data = small_pipeline_options(
        transform="resize", crop_size=[12, 20], scale_range=[1.0, 1.0], batch_size=1, hflip=True
    )
    seen_flipped = set()
    for sample, sample_mask in samples(source, data, batches=12):
        assert sample.shape == (12, 20, 3) and sample.dtype == np.float32
        corners = [(0, 0), (0, -1), (-1, 0), (-1, -1)]
        ids = [int(sample_mask[c]) for c in corners]
        flipped = ids == [2, 1, 4, 3]
        assert ids == QUADRANT_IDS or flipped, ids
        seen_flipped.add(flipped)
        # Each corner pixel sits inside its flat quadrant, so bilinear gives the colour exactly.
        expected = [QUADRANT_COLOURS[i - 1] for i in ids]
        assert [tuple(sample[c].tolist()) for c in corners] == expected
    assert seen_flipped == {True, False}  # data.hflip still applies after the resize


def test_resize_mask_is_the_nearest_resize_of_the_whole_mask(tmp_path):
    rng = np.random.default_rng(0)
    mask = rng.integers(0, 6, (37, 23)).astype(np.uint8)
    mask[rng.random(mask.shape) < 0.1] = 255
    source = write_folder_dataset(tmp_path, [mask])
    data = small_pipeline_options(
        transform="resize", crop_size=[16, 10], batch_size=1, hflip=True, flip_pairs=[]
    )
    # Pillow's NEAREST samples the source pixel under each target pixel's centre.
    expected = np.asarray(Image.fromarray(mask).resize((10, 16), Image.NEAREST))
    # The same by hand: row i <- floor((i + 0.5) * 37 / 16), column j <- floor((j + 0.5) * 23 / 10).
    rows = np.floor((np.arange(16) + 0.5) * 37 / 16).astype(int)
    cols = np.floor((np.arange(10) + 0.5) * 23 / 10).astype(int)
    np.testing.assert_array_equal(expected, mask[rows][:, cols])
    for _, sample_mask in samples(source, data, batches=6):
        assert np.array_equal(sample_mask, expected) or np.array_equal(
            sample_mask, expected[:, ::-1]
        )


def test_resize_flip_swaps_the_flip_pairs(tmp_path):
    image, mask = quadrant_pair(20, 20)
    source = write_folder_dataset(tmp_path, [mask], [image])
    data = small_pipeline_options(
        transform="resize", crop_size=[10, 10], batch_size=1, hflip=True, flip_pairs=[[1, 2]]
    )
    seen = set()
    for _, sample_mask in samples(source, data, batches=12):
        top_left, top_right = int(sample_mask[0, 0]), int(sample_mask[0, -1])
        bottom_left, bottom_right = int(sample_mask[-1, 0]), int(sample_mask[-1, -1])
        # Unflipped: 1 2 / 3 4. Mirrored: 2 1 / 4 3, then the pair (1, 2) swapped: 1 2 / 4 3.
        corners = (top_left, top_right, bottom_left, bottom_right)
        assert corners in {(1, 2, 3, 4), (1, 2, 4, 3)}, corners
        seen.add(corners)
    assert len(seen) == 2


# ----- data.pad_value ---------------------------------------------------------------------------
def test_crop_padding_is_filled_with_pad_value(tmp_path):
    source = write_folder_dataset(tmp_path, [np.ones((8, 8), int)], [np.full((8, 8, 3), 200)])
    data = small_pipeline_options(
        crop_size=[16, 16],
        scale_range=[1.0, 1.0],
        hflip=False,
        batch_size=1,
        pad_value=[10, 20, 30.5],
    )
    ((sample, sample_mask),) = samples(source, data, batches=1)
    # An 8x8 image in a 16x16 crop: 64 image pixels, 192 padding pixels (labels ignore).
    assert (sample_mask == 1).sum() == 64 and (sample_mask == 255).sum() == 192
    np.testing.assert_array_equal(sample[sample_mask == 255], np.tile([10.0, 20.0, 30.5], (192, 1)))
    np.testing.assert_array_equal(sample[sample_mask == 1], np.full((64, 3), 200.0))


def mean_colour_model() -> keras.Model:
    """Logits at every pixel = the mean colour of the whole (padded) input: padding shows."""
    inputs = keras.Input((None, None, 3))
    means = keras.ops.mean(inputs, axis=(1, 2), keepdims=True)
    return keras.Model(inputs, means + keras.ops.zeros_like(inputs))


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_eval_padding_is_filled_with_pad_value(mode):
    cfg = compose_config(
        [
            "data.pad_value=[10,20,30]",
            f"eval.mode={mode}",
            "eval.crop_size=[32,32]",
            "eval.size_divisor=32",
        ]
    )
    predictor = predictor_from_config(mean_colour_model(), cfg)
    image = np.full((20, 20, 3), 100, np.uint8)
    logits = predictor.logits(image)
    # 20x20 padded to 32x32: (400 * 100 + 624 * fill) / 1024 per channel.
    expected = [(400 * 100 + 624 * fill) / 1024 for fill in (10, 20, 30)]
    np.testing.assert_allclose(logits[0, 0], expected, rtol=1e-6)
    assert logits.shape == (20, 20, 3)


@pytest.mark.parametrize(
    "override, key",
    [
        ("data.transform=squash", "data.transform"),
        ("data.pad_value=[1,2]", "data.pad_value"),
        ("data.pad_value=[0,0,300]", "data.pad_value"),
        ("data.pad_value=7", "data.pad_value"),
        ("trainer.val_protocol=crop", "trainer.val_protocol"),
    ],
)
def test_bad_protocol_keys_are_one_line_user_errors(override, key):
    with pytest.raises(UserError, match=key) as error:
        check_config(compose_config([override]))
    assert "\n" not in str(error.value)


def test_mean_colour_pad_value_is_accepted():
    check_config(
        compose_config(
            [
                "data.pad_value=[123.68,116.78,103.94]",
                "data.transform=resize",
                "trainer.val_protocol=resized",
            ]
        )
    )


# ----- item 7: no silent protocol change ---------------------------------------------------------
def fixed_only_model(num_classes: int = 3) -> keras.Model:
    """A model that only runs at 16x16: its reshapes fix the size (like a Dense head)."""
    inputs = keras.Input((16, 16, 3), name="image")
    x = keras.layers.Conv2D(num_classes, 1)(keras.layers.Rescaling(1 / 255)(inputs))
    x = keras.layers.Reshape((16 * 16, num_classes))(x)
    return keras.Model(inputs, keras.layers.Reshape((16, 16, num_classes))(x), name="fixed")


def test_fixed_size_fallback_is_a_warning_naming_the_change(caplog):
    with caplog.at_level(logging.WARNING, logger="seg_train.inference.predictor"):
        predictor = Predictor(fixed_only_model())
    assert predictor.protocol_change and "16x16" in predictor.protocol_change
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "resized to 16x16" in warnings[0].getMessage()
    assert "\n" not in warnings[0].getMessage()
    # A size-agnostic model changes nothing and says nothing.
    assert Predictor(mean_colour_model()).protocol_change is None


def test_fixed_size_fallback_is_recorded_in_metrics_json(tmp_path):
    rng = np.random.default_rng(1)
    masks = [rng.integers(0, 3, (24, 20)) for _ in range(2)]
    write_folder_dataset(tmp_path / "data", masks)
    cfg = compose_config(
        [
            "data=folder",
            f"data.root={tmp_path / 'data'}",
            "data.num_classes=3",
            "data.class_names=[a,b,c]",
            "eval.num_samples=0",
        ]
    )
    out = tmp_path / "eval"
    out.mkdir()
    report = evaluate_model(fixed_only_model(), cfg, "val", out, tmp_path / "model.keras")
    written = json.loads((out / "metrics.json").read_text())
    assert written["protocol_change"] == report["protocol_change"]
    assert "resized to 16x16" in written["protocol_change"]
    assert written["protocol"]["resolution"] == "resized to [16, 16]"


# ----- trainer.val_protocol ----------------------------------------------------------------------
def test_multi_output_view_monitors_fused_only_when_fit_validates(tmp_path):
    inputs = keras.Input((8, 8, 3))
    logits = keras.layers.Conv2D(2, 1)(inputs)
    model = keras.Model(inputs, logits)
    view = keras.Model(inputs, {"fused": logits, "scale_1": logits})
    cfg = compose_config()
    OmegaConf.set_struct(cfg, False)
    cfg.callbacks = {
        "model_checkpoint": {
            "_target_": "seg_train.training.callbacks.AtomicModelCheckpoint",
            "filepath": str(tmp_path / "best.keras"),
            "monitor": "val_mean_iou",
            "mode": "max",
            "save_best_only": True,
        }
    }
    from seg_train.tasks.instantiate import build_callbacks
    from seg_train.training.multiscale import TrainingView

    training_view = TrainingView(model, view, ("fused", "scale_1"))
    (resized,) = build_callbacks(cfg, None, training_view, "resized")
    (original,) = build_callbacks(cfg, None, training_view, "original")
    assert resized.monitor == "val_fused_mean_iou"
    assert original.monitor == "val_mean_iou"  # written by the original-resolution callback


@pytest.mark.slow
def test_selection_metric_equals_the_final_report_and_mode_eval(cache_dir, tmp_path):
    """best.keras is chosen on the number metrics.json and mode=eval print for it."""
    run_dir = tmp_path / "train"
    result = run_cli(
        [*TINY_TRAIN, "trainer.epochs=3", "data.transform=resize", f"hydra.run.dir={run_dir}"],
        cache_dir,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with open(run_dir / "history.csv", newline="") as f:
        history = [float(row["val_mean_iou"]) for row in csv.DictReader(f)]
    assert len(history) == 3
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # ModelCheckpoint keeps the first epoch reaching the maximum; its value is the report's.
    assert abs(max(history) - metrics["mean_iou"]) < 1e-6
    assert metrics["selection"]["protocol"] == "original"
    assert metrics["selection"]["metric"] == "val_mean_iou"
    assert abs(metrics["selection"]["value"] - metrics["mean_iou"]) < 1e-6
    assert "trainer.val_protocol=original" in result.stderr + result.stdout

    evaluated = run_cli(
        ["mode=eval", f"ckpt_path={run_dir}", f"hydra.run.dir={tmp_path / 'e'}"],
        cache_dir,
        cwd=tmp_path,
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    again = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert abs(again["mean_iou"] - max(history)) < 1e-6
    assert (run_dir / "training_curves.png").is_file()


def test_saved_model_pads_with_pad_value(tmp_path):
    import tensorflow as tf

    from seg_train.inference.serving import write_saved_model

    predictor = Predictor(mean_colour_model(), size_divisor=32, pad_value=[10, 20, 30])
    write_saved_model(predictor, tmp_path / "sm", with_probabilities=True)
    serve = tf.saved_model.load(str(tmp_path / "sm")).signatures["serving_default"]
    probs = serve(images=tf.fill([1, 20, 20, 3], tf.constant(100, tf.uint8)))["probabilities"]
    # As in the Predictor test: 20x20 padded to 32x32, logits = the padded image's mean colour.
    logits = np.array([(400 * 100 + 624 * fill) / 1024 for fill in (10, 20, 30)])
    expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    np.testing.assert_allclose(probs.numpy()[0, 0, 0], expected, rtol=1e-4, atol=1e-7)


def test_an_epoch_without_validation_keeps_the_best_checkpoint(tmp_path):
    """trainer.validation_freq > 1: epochs without val_mean_iou must not replace best.keras."""
    from seg_train.training.callbacks import AtomicModelCheckpoint

    model = fixed_only_model()
    path = tmp_path / "best.keras"
    checkpoint = AtomicModelCheckpoint(
        str(path), monitor="val_mean_iou", mode="max", save_best_only=True
    )
    checkpoint.set_model(model)
    checkpoint.on_epoch_end(0, {"loss": 1.0, "val_mean_iou": 0.5})
    saved = path.read_bytes()
    model.set_weights([w + 1 for w in model.get_weights()])  # a save would now differ
    checkpoint.on_epoch_end(1, {"loss": 0.9})  # not validated
    assert path.read_bytes() == saved
    checkpoint.on_epoch_end(2, {"loss": 0.8, "val_mean_iou": 0.4})  # validated, worse
    assert path.read_bytes() == saved and checkpoint.best == 0.5


def test_eval_of_a_run_dir_uses_the_runs_own_eval_protocol(tmp_path):
    # A run trained on resized whole images was reported with eval.mode=resize and a CRF;
    # `mode=eval ckpt_path=RUN` must score it the same way unless told otherwise.
    from hydra.core.hydra_config import HydraConfig

    from seg_train.tasks import checkpoint

    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    saved = compose_config(["experiment=pets_unet_mobilenetv2", "postprocess=crf"])
    (run / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(saved))
    cfg = compose_config(["mode=eval"])
    # The command line this "process" was given (adopt_run_config re-applies its overrides).
    HydraConfig.instance().set_config(cfg)
    assert cfg.eval.mode == "whole" and cfg.postprocess.get("iterations") is None
    checkpoint.adopt_run_config(cfg, run)
    assert cfg.eval.mode == "resize" and list(cfg.eval.crop_size) == [128, 128]
    assert cfg.postprocess.iterations == 10
