"""The dense-CRF wrapper against pydensecrf called directly, serial vs parallel."""

import numpy as np
import pydensecrf.densecrf as dcrf
from pydensecrf.utils import unary_from_softmax

from seg_train.postprocess.crf import CRFParams, CRFRunner, dense_crf


def make_case(seed, height=24, width=31, classes=3):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    logits = rng.normal(size=(height, width, classes)).astype(np.float32)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    return image, probs


def test_wrapper_equals_pydensecrf_called_directly():
    image, probs = make_case(0)
    params = CRFParams(
        iterations=5,
        gaussian_sxy=3,
        gaussian_compat=2,
        bilateral_sxy=20,
        bilateral_srgb=7,
        bilateral_compat=6,
    )
    height, width, classes = probs.shape
    crf = dcrf.DenseCRF2D(width, height, classes)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs.transpose(2, 0, 1))))
    crf.addPairwiseGaussian(sxy=3, compat=2)
    crf.addPairwiseBilateral(sxy=20, srgb=7, rgbim=np.ascontiguousarray(image), compat=6)
    expected = np.array(crf.inference(5)).reshape(classes, height, width).transpose(1, 2, 0)
    np.testing.assert_allclose(dense_crf(image, probs, params), expected, atol=1e-5)


def test_crf_smooths_noisy_labels_towards_image_regions():
    # Left half dark, right half bright; probabilities mostly right but noisy.
    image = np.zeros((20, 20, 3), np.uint8)
    image[:, 10:] = 255
    rng = np.random.default_rng(1)
    truth = (np.arange(20)[None, :] >= 10).repeat(20, 0).astype(int)
    probs = np.where(np.eye(2)[truth] == 1, 0.6, 0.4)
    flip = rng.random((20, 20)) < 0.2
    probs[flip] = probs[flip][:, ::-1]
    refined = dense_crf(image, probs.astype(np.float32), CRFParams()).argmax(-1)
    assert (probs.argmax(-1) != truth).mean() > 0.1
    assert (refined != truth).mean() < 0.02


def test_parallel_equals_serial_and_keeps_order():
    cases = [make_case(seed, height=16 + seed, width=20) for seed in range(5)]
    items = [(image, probs, index) for index, (image, probs) in enumerate(cases)]
    serial = list(CRFRunner(CRFParams(iterations=3), workers=1).map(items))
    parallel = list(CRFRunner(CRFParams(iterations=3), workers=2).map(items))
    assert [tag for _, tag in parallel] == list(range(5))
    for (a, _), (b, _) in zip(serial, parallel):
        np.testing.assert_array_equal(a, b)
