"""The confusion-matrix metrics against hand-computed cases."""

import math

import numpy as np
import pytest

from seg_train.errors import UserError
from seg_train.inference.metrics import ConfusionMatrix

NAMES = ["bg", "a", "b", "c"]


def test_hand_computed_case_with_ignored_and_absent_classes():
    truth = np.array([[0, 0, 1, 1], [0, 255, 1, 2], [255, 255, 2, 2]])
    pred = np.array([[0, 1, 1, 1], [0, 3, 0, 2], [1, 2, 2, 0]])
    matrix = ConfusionMatrix(num_classes=4, ignore_label=255)
    matrix.update(truth, pred)
    # Valid pixels (truth != 255): 9. Correct: (0,0)x2, (1,1)x2, (2,2)x2 -> 6.
    expected = np.zeros((4, 4), int)
    expected[0, 0], expected[0, 1] = 2, 1
    expected[1, 1], expected[1, 0] = 2, 1
    expected[2, 2], expected[2, 0] = 2, 1
    np.testing.assert_array_equal(matrix.matrix, expected)
    report = matrix.summary(NAMES)
    # IoU_bg = 2 / (3 + 4 - 2) = 0.4; IoU_a = 2 / (3 + 3 - 2) = 0.5; IoU_b = 2 / (3 + 2 - 2)
    assert report["per_class_iou"]["bg"] == pytest.approx(2 / 5)
    assert report["per_class_iou"]["a"] == pytest.approx(2 / 4)
    assert report["per_class_iou"]["b"] == pytest.approx(2 / 3)
    # Class c is in neither truth nor prediction (the 3 was predicted on an ignored pixel).
    assert report["per_class_iou"]["c"] is None
    assert report["mean_iou"] == pytest.approx((2 / 5 + 2 / 4 + 2 / 3) / 3)
    assert report["pixel_accuracy"] == pytest.approx(6 / 9)
    assert report["per_class_accuracy"]["a"] == pytest.approx(2 / 3)
    assert report["mean_accuracy"] == pytest.approx(2 / 3)
    assert report["num_pixels"] == 9


def test_class_only_predicted_counts_as_zero_iou_but_has_no_accuracy():
    matrix = ConfusionMatrix(num_classes=3)
    matrix.update(np.array([0, 0, 1, 1]), np.array([0, 2, 1, 1]))
    report = matrix.summary(["x", "y", "z"])
    assert report["per_class_iou"]["z"] == 0.0  # predicted once, never true: IoU 0, not None
    assert report["per_class_accuracy"]["z"] is None  # never in the truth
    assert report["mean_iou"] == pytest.approx((1 / 2 + 1 + 0) / 3)


def test_streaming_over_images_equals_one_big_update():
    rng = np.random.default_rng(0)
    truths = [rng.integers(0, 4, size=(5, 7)) for _ in range(6)]
    preds = [rng.integers(0, 4, size=(5, 7)) for _ in range(6)]
    streamed = ConfusionMatrix(4)
    for t, p in zip(truths, preds):
        streamed.update(t, p)
    whole = ConfusionMatrix(4)
    whole.update(np.concatenate(truths), np.concatenate(preds))
    np.testing.assert_array_equal(streamed.matrix, whole.matrix)


def test_all_ignored_gives_undefined_metrics():
    matrix = ConfusionMatrix(2)
    matrix.update(np.full((3, 3), 255), np.zeros((3, 3), int))
    report = matrix.summary(["a", "b"])
    assert report["mean_iou"] is None and report["pixel_accuracy"] is None
    assert all(v is None for v in report["per_class_iou"].values())


def test_label_out_of_range_names_the_value():
    matrix = ConfusionMatrix(3)
    with pytest.raises(UserError, match="label 7.*num_classes is 3"):
        matrix.update(np.array([0, 7]), np.array([0, 1]))


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError):
        ConfusionMatrix(2).update(np.zeros((2, 2)), np.zeros((2, 3)))


def test_perfect_prediction_is_one():
    truth = np.array([[0, 1], [2, 255]])
    matrix = ConfusionMatrix(3)
    matrix.update(truth, np.where(truth == 255, 0, truth))
    report = matrix.summary(["a", "b", "c"])
    assert math.isclose(report["mean_iou"], 1.0) and math.isclose(report["pixel_accuracy"], 1.0)


def mmseg_reference(pairs, num_classes, ignore_index=255):
    """mmsegmentation's intersect_and_union + total_area_to_metrics, re-done with histograms."""
    inter = np.zeros(num_classes)
    area_pred = np.zeros(num_classes)
    area_label = np.zeros(num_classes)
    bins = np.arange(num_classes + 1)
    for label, pred in pairs:
        keep = label != ignore_index
        label, pred = label[keep], pred[keep]
        inter += np.histogram(pred[pred == label], bins=bins)[0]
        area_pred += np.histogram(pred, bins=bins)[0]
        area_label += np.histogram(label, bins=bins)[0]
    union = area_pred + area_label - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = inter / union
        acc = inter / area_label
        dice = 2 * inter / (area_pred + area_label)
    freq = area_label / area_label.sum() if area_label.sum() else np.zeros(num_classes)
    defined = ~np.isnan(iou)
    return {
        "mean_iou": np.nanmean(iou) if defined.any() else None,
        "pixel_accuracy": inter.sum() / area_label.sum() if area_label.sum() else None,
        "mean_accuracy": np.nanmean(acc) if (~np.isnan(acc)).any() else None,
        "mean_dice": np.nanmean(dice) if (~np.isnan(dice)).any() else None,
        "fw_iou": (freq[defined] * iou[defined]).sum() if area_label.sum() else None,
        "iou": iou,
    }


@pytest.mark.parametrize("seed", range(5))
def test_matches_independent_mmseg_implementation(seed):
    rng = np.random.default_rng(seed)
    num_classes = int(rng.integers(2, 7))
    pairs = []
    for _ in range(int(rng.integers(1, 5))):
        shape = tuple(rng.integers(1, 30, size=2))
        # Leave out the last class entirely (absent in truth and prediction) in some seeds.
        top = num_classes - (seed % 2)
        label = rng.integers(0, top, size=shape)
        label[rng.random(shape) < 0.1] = 255
        pred = np.where(rng.random(shape) < 0.6, label, rng.integers(0, top, size=shape))
        pred[pred == 255] = 0
        pairs.append((label, pred))
    pairs.append((np.full((4, 4), 255), np.zeros((4, 4), int)))  # an all-ignored image
    matrix = ConfusionMatrix(num_classes)
    for label, pred in pairs:
        matrix.update(label, pred)
    report = matrix.summary([str(i) for i in range(num_classes)])
    reference = mmseg_reference(pairs, num_classes)
    for key in ("mean_iou", "pixel_accuracy", "mean_accuracy", "mean_dice", "fw_iou"):
        assert report[key] == pytest.approx(reference[key]), key
    for index, value in enumerate(reference["iou"]):
        got = report["per_class_iou"][str(index)]
        assert (got is None) if np.isnan(value) else got == pytest.approx(value)
