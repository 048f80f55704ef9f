"""The dense CRF: seed 002's defaults and its dense_crf (on pydensecrf), serial vs parallel."""

import signal
import subprocess
import sys

import numpy as np
import pydensecrf.densecrf as dcrf

from seg_train.inference.crf import CRFParams, CRFRunner, dense_crf
from seg_train.tasks.postprocess import crf_runner
from tests.helpers import compose_config


def make_case(seed, height=24, width=31, classes=3):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    logits = rng.normal(size=(height, width, classes)).astype(np.float32)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    return image, probs


# Seed 002 (seeds/002_5319f1dc62a162e8.txt, DrSleep's crf branch deeplab_resnet/utils.py):
#   def dense_crf(probs, img=None, n_iters=10, sxy_gaussian=(1, 1), compat_gaussian=4,
#                 kernel_gaussian=DIAG_KERNEL, normalisation_gaussian=NORMALIZE_SYMMETRIC,
#                 sxy_bilateral=(49, 49), compat_bilateral=5, srgb_bilateral=(13, 13, 13),
#                 kernel_bilateral=DIAG_KERNEL, normalisation_bilateral=NORMALIZE_SYMMETRIC)
# (1, 1) / (49, 49) are the x and y standard deviations in pixels, (13, 13, 13) the R, G, B ones
# of the bilateral kernel; the compat numbers are Potts weights.
SEED_002 = {
    "iterations": 10,
    "gaussian_sxy": 1,
    "gaussian_compat": 4,
    "bilateral_sxy": 49,
    "bilateral_srgb": 13,
    "bilateral_compat": 5,
}


def seed_002_dense_crf(probs, img):
    """The seed's `dense_crf`, written as it is there (one image, no batch axis)."""
    h, w, n_classes = probs.shape
    probs = probs.transpose(2, 0, 1).copy(order="C")
    # The seed calls DenseCRF2D(h, w, n); pydensecrf's order is (width, height), so the seed's
    # call only agrees with ours on square images - the test below uses one.
    d = dcrf.DenseCRF2D(h, w, n_classes)
    d.setUnaryEnergy(np.ascontiguousarray((-np.log(probs)).reshape((n_classes, -1))))
    d.addPairwiseGaussian(
        sxy=(1, 1), compat=4, kernel=dcrf.DIAG_KERNEL, normalization=dcrf.NORMALIZE_SYMMETRIC
    )
    d.addPairwiseBilateral(
        sxy=(49, 49),
        compat=5,
        kernel=dcrf.DIAG_KERNEL,
        normalization=dcrf.NORMALIZE_SYMMETRIC,
        srgb=(13, 13, 13),
        rgbim=np.ascontiguousarray(img),
    )
    q = d.inference(10)
    return np.array(q, dtype=np.float32).reshape((n_classes, h, w)).transpose(1, 2, 0)


def test_defaults_are_seed_002s():
    composed = compose_config(["postprocess=crf"])
    cfg = composed.postprocess
    assert {
        "iterations": cfg.iterations,
        "gaussian_sxy": cfg.gaussian.sxy,
        "gaussian_compat": cfg.gaussian.compat,
        "bilateral_sxy": cfg.bilateral.sxy,
        "bilateral_srgb": cfg.bilateral.srgb,
        "bilateral_compat": cfg.bilateral.compat,
    } == SEED_002
    defaults = CRFParams()
    assert {k: getattr(defaults, k) for k in SEED_002} == SEED_002
    assert crf_runner(composed).params == CRFParams(**SEED_002)
    assert crf_runner(compose_config(["postprocess=none"])) is None


def test_default_crf_equals_seed_002s_dense_crf():
    # Square, so the seed's (h, w) argument order does not matter; probabilities >= ~1e-3, so
    # pydensecrf's unary_from_softmax clipping at 1e-5 (ours) does not either.
    image, probs = make_case(0, height=23, width=23)
    params = crf_runner(compose_config(["postprocess=crf", "postprocess.workers=1"])).params
    np.testing.assert_allclose(
        dense_crf(image, probs, params), seed_002_dense_crf(probs, image), atol=1e-5
    )


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


# A parent that maps three images over two CRF workers and, while the first worker is still
# starting (re-importing this script, made slow here as on a loaded machine), sends Ctrl-C to
# its whole process group, as a terminal does.
CTRL_C_AT_WORKER_START_UP = """
import os, signal, sys, time
import numpy as np
from seg_train.inference.crf import CRFParams, CRFRunner

if __name__ == "__mp_main__":
    time.sleep(3)  # a worker re-imports this file before it runs anything of ours

def items():
    image = np.zeros((8, 8, 3), np.uint8)
    probs = np.full((8, 8, 2), 0.5, np.float32)
    for index in range(3):
        if index == 1:
            time.sleep(1)
            os.killpg(0, signal.SIGINT)
        yield image, probs, index

if __name__ == "__main__":
    try:
        for _ in CRFRunner(CRFParams(iterations=1), workers=2).map(items()):
            pass
    except KeyboardInterrupt:
        sys.exit("parent: interrupted")
"""


def test_ctrl_c_while_a_worker_starts_reaches_only_the_parent(tmp_path):
    script = tmp_path / "crf_ctrl_c.py"
    script.write_text(CTRL_C_AT_WORKER_START_UP)
    result = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        start_new_session=True,  # its own process group, so the Ctrl-C reaches only its tree
        # A shell's background jobs ignore SIGINT; a terminal's foreground job does not.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines() == ["parent: interrupted"], result.stderr
