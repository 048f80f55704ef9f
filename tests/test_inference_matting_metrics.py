"""The matting errors against hand-computed values and an independent NumPy implementation.

The independent implementation below is written from the definitions of Rhemann et al.
(CVPR 2009) and the benchmark's MATLAB reference (`gaussgradient.m`, `compute_*_loss.m`):
an explicit kernel with loops, an explicit replicate-padded convolution and a flood fill; it
shares no code with `seg_train.inference.matting_metrics` (which uses scipy.ndimage).
"""

import math
from collections import deque

import numpy as np
import pytest

from seg_train.inference import matting_metrics as metrics

# --------------------------------------------------------------------------------------------
# Independent reference
# --------------------------------------------------------------------------------------------


def _ref_gauss(x, sigma):
    return math.exp(-(x**2) / (2 * sigma**2)) / (sigma * math.sqrt(2 * math.pi))


def _ref_dgauss(x, sigma):
    return -x * _ref_gauss(x, sigma) / sigma**2


def _ref_gaussgradient(image, sigma=1.4):
    """gaussgradient.m: unit-L2 kernel gauss(i) * dgauss(j), imfilter(.., 'replicate', 'conv')."""
    half = math.ceil(sigma * math.sqrt(-2 * math.log(math.sqrt(2 * math.pi) * sigma * 1e-2)))
    size = 2 * half + 1
    hx = np.zeros((size, size))
    for i in range(size):
        for j in range(size):
            hx[i, j] = _ref_gauss(i - half, sigma) * _ref_dgauss(j - half, sigma)
    hx /= math.sqrt((hx**2).sum())
    hy = hx.T
    padded = np.pad(image, half, mode="edge")
    height, width = image.shape
    gx = np.zeros_like(image)
    gy = np.zeros_like(image)
    for y in range(height):
        for x in range(width):
            # Convolution: the kernel flipped over the window centred on (y, x).
            window = padded[y : y + size, x : x + size][::-1, ::-1]
            gx[y, x] = (hx * window).sum()
            gy[y, x] = (hy * window).sum()
    return gx, gy


def _ref_grad(pred, gt, region):
    px, py = _ref_gaussgradient(pred)
    gx, gy = _ref_gaussgradient(gt)
    error = (np.sqrt(px**2 + py**2) - np.sqrt(gx**2 + gy**2)) ** 2
    return error[region].sum() / 1000


def _ref_largest_component(mask, eight):
    """Flood fill; returns the largest component (first found wins ties, as MATLAB's max)."""
    height, width = mask.shape
    seen = np.zeros_like(mask)
    best = np.zeros_like(mask)
    steps = [(-1, 0), (1, 0), (0, -1), (0, 1)]
    if eight:
        steps += [(-1, -1), (-1, 1), (1, -1), (1, 1)]
    # Column-major scan order, as bwconncomp numbers components.
    for x in range(width):
        for y in range(height):
            if not mask[y, x] or seen[y, x]:
                continue
            component = np.zeros_like(mask)
            queue = deque([(y, x)])
            seen[y, x] = True
            while queue:
                cy, cx = queue.popleft()
                component[cy, cx] = True
                for dy, dx in steps:
                    ny, nx = cy + dy, cx + dx
                    if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
            if component.sum() > best.sum():
                best = component
    return best


def _ref_conn(pred, gt, region, eight=False):
    steps = [k / 10 for k in range(11)]
    level = -np.ones_like(pred)
    for k in range(1, len(steps)):
        omega = _ref_largest_component((pred >= steps[k]) & (gt >= steps[k]), eight)
        level[(level == -1) & ~omega] = steps[k - 1]
    level[level == -1] = 1
    pd, gd = pred - level, gt - level
    pd_phi = 1 - pd * (pd >= 0.15)
    gt_phi = 1 - gd * (gd >= 0.15)
    return np.abs(pd_phi - gt_phi)[region].sum() / 1000


def _alphas(seed, shape=(12, 10)):
    """A smooth blob plus noise, quantised to 8 bits like a real matte."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    blob = np.clip(1.5 - np.hypot(yy - shape[0] / 2, xx - shape[1] / 2) / 3, 0, 1)
    gt = np.round(blob * 255) / 255
    pred = np.round(np.clip(blob + rng.normal(0, 0.2, shape), 0, 1) * 255) / 255
    return pred, gt


# --------------------------------------------------------------------------------------------
# Hand-computed values
# --------------------------------------------------------------------------------------------


def test_sad_and_mse_by_hand():
    pred = np.array([[0.0, 0.5], [1.0, 0.25]])
    gt = np.array([[0.0, 1.0], [0.5, 0.25]])
    # |diff| = 0, 0.5, 0.5, 0 -> SAD 1.0 (reported /1000); squared 0.25 twice over 4 pixels.
    assert metrics.sad(pred, gt) == pytest.approx(1.0 / 1000)
    assert metrics.mse(pred, gt) == pytest.approx(0.5 / 4)
    # Only the top-right pixel: |diff| 0.5, squared 0.25 over 1 pixel.
    region = np.array([[False, True], [False, False]])
    assert metrics.sad(pred, gt, region) == pytest.approx(0.5 / 1000)
    assert metrics.mse(pred, gt, region) == pytest.approx(0.25)
    # The unknown band of an 8-bit trimap is its 128s.
    trimap = np.array([[0, 128], [255, 0]], dtype=np.uint8)
    np.testing.assert_array_equal(metrics.unknown_region(trimap), region)
    assert metrics.mse(pred, gt, np.zeros((2, 2), bool)) == 0.0


def test_connectivity_hole_in_the_prediction_by_hand():
    gt = np.ones((3, 3))
    pred = np.ones((3, 3))
    pred[1, 1] = 0.5
    # t <= 0.5: all 9 pixels form the source; at t = 0.6 the centre drops out -> its level is
    # 0.5; the 4-connected ring stays up to t = 1 -> level 1. phi(pred) = 1 everywhere
    # (d = 0); phi(gt) at the centre = 1 - (1 - 0.5) = 0.5, elsewhere 1. Error 0.5 / 1000.
    assert metrics.connectivity_error(pred, gt) == pytest.approx(0.5 / 1000)


def test_connectivity_detached_island_by_hand():
    gt = np.ones((4, 4))
    pred = np.zeros((4, 4))
    pred[:2, :2] = 1.0  # the main 2x2 blob
    pred[3, 3] = 1.0  # a detached one-pixel island
    # t = 0.1: source = the blob; every other pixel gets level 0. Blob: phi 1 for both.
    # Island: phi(pred) = 1 - 1 = 0, phi(gt) = 0 -> 0. The 11 zeros: phi(pred) = 1,
    # phi(gt) = 1 - 1 = 0 -> 11 in all.
    assert metrics.connectivity_error(pred, gt) == pytest.approx(11 / 1000)


def test_gradient_error_properties():
    pred, gt = _alphas(0)
    assert metrics.gradient_error(gt, gt) == 0.0
    # Constant offsets have no gradient; the error is symmetric and quadratic in scale.
    assert metrics.gradient_error(gt + 0.3, gt) == pytest.approx(0.0, abs=1e-12)
    assert metrics.gradient_error(pred, gt) == pytest.approx(metrics.gradient_error(gt, pred))
    assert metrics.gradient_error(0.5 * pred, 0.5 * gt) == pytest.approx(
        0.25 * metrics.gradient_error(pred, gt)
    )
    assert metrics.gradient_error(pred, gt) > 0


def test_perfect_prediction_scores_zero():
    _, gt = _alphas(1)
    assert metrics.matting_errors(gt, gt) == {"sad": 0.0, "mse": 0.0, "grad": 0.0, "conn": 0.0}


# --------------------------------------------------------------------------------------------
# Against the independent implementation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("use_region", [False, True])
def test_against_independent_implementation(seed, use_region):
    pred, gt = _alphas(seed)
    region = np.ones(gt.shape, bool)
    if use_region:
        region = (gt > 0) & (gt < 1)  # the transition band, as a trimap's unknown region
    arg = region if use_region else None
    diff = pred - gt
    assert metrics.sad(pred, gt, arg) == pytest.approx(np.abs(diff)[region].sum() / 1000)
    assert metrics.mse(pred, gt, arg) == pytest.approx((diff**2)[region].mean())
    assert metrics.gradient_error(pred, gt, arg) == pytest.approx(
        _ref_grad(pred, gt, region), rel=1e-9, abs=1e-15
    )
    assert metrics.connectivity_error(pred, gt, arg) == pytest.approx(_ref_conn(pred, gt, region))
    assert metrics.connectivity_error(pred, gt, arg, connectivity=8) == pytest.approx(
        _ref_conn(pred, gt, region, eight=True)
    )


def test_mean_errors_average_images():
    rows = [
        {"sad": 1.0, "mse": 0.1, "grad": 2.0, "conn": 3.0},
        {"sad": 3.0, "mse": 0.3, "grad": 4.0, "conn": 5.0},
    ]
    assert metrics.mean_errors(rows) == pytest.approx(
        {"sad": 2.0, "mse": 0.2, "grad": 3.0, "conn": 4.0}
    )
    assert metrics.mean_errors([]) == {"sad": None, "mse": None, "grad": None, "conn": None}


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="equal 2-D"):
        metrics.sad(np.zeros((2, 2)), np.zeros((2, 3)))
