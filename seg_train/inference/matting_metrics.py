"""The four alpha matting errors of Rhemann et al. (CVPR 2009): SAD, MSE, gradient, connectivity.

These are the errors of the alpha matting benchmark (alphamatting.com) and of the Deep Image
Matting (Xu et al. 2017) / MODNet evaluations. Every function takes a predicted and a true
alpha in [0, 1] (float arrays of one [H, W] image, at the image's original resolution) and an
optional boolean `region` of the pixels that count (the trimap's unknown band, see
`unknown_region`; None = the whole image, which is what a trimap-free set such as the portrait
set allows).

Scales follow the Deep Image Matting reference code (its MATLAB `compute_*` functions, which
take 8-bit alphas and divide by 255 first) and its Composition-1k tables: SAD, Grad and Conn
are reported divided by 1000, MSE as is (a mean over the counted pixels).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
from scipy import ndimage

# Gradient error: Gaussian first-derivative filters with sigma 1.4 (Rhemann et al.).
GRADIENT_SIGMA = 1.4
# Connectivity error: alpha thresholds 0, 0.1, ..., 1 and the "almost connected" cut-off.
CONNECTIVITY_STEP = 0.1
CONNECTIVITY_THETA = 0.15
# The reported unit of SAD, Grad and Conn (thousands), as in the benchmark tables.
SCALE = 1000.0
METRIC_NAMES = ("sad", "mse", "grad", "conn")


def _check(pred: np.ndarray, gt: np.ndarray, region: np.ndarray | None):
    """float64 copies of both alphas and the boolean region (all True when None)."""
    pred = np.asarray(pred, dtype=np.float64)
    gt = np.asarray(gt, dtype=np.float64)
    if pred.shape != gt.shape or pred.ndim != 2:
        raise ValueError(f"pred {pred.shape} and gt {gt.shape} must be equal 2-D alpha maps")
    if region is None:
        region = np.ones(gt.shape, dtype=bool)
    else:
        region = np.asarray(region, dtype=bool)
        if region.shape != gt.shape:
            raise ValueError(f"region {region.shape} must match the alpha {gt.shape}")
    return pred, gt, region


def unknown_region(trimap: np.ndarray) -> np.ndarray:
    """The unknown band of an 8-bit trimap (value 128, the benchmark's convention)."""
    return np.asarray(trimap) == 128


def sad(pred: np.ndarray, gt: np.ndarray, region: np.ndarray | None = None) -> float:
    """Sum of absolute alpha differences over the region, divided by 1000."""
    pred, gt, region = _check(pred, gt, region)
    return float(np.abs(pred - gt)[region].sum() / SCALE)


def mse(pred: np.ndarray, gt: np.ndarray, region: np.ndarray | None = None) -> float:
    """Mean squared alpha difference over the region (0 for an empty region)."""
    pred, gt, region = _check(pred, gt, region)
    count = int(region.sum())
    return float(((pred - gt) ** 2)[region].sum() / count) if count else 0.0


def _gradient_magnitude(alpha: np.ndarray, sigma: float) -> np.ndarray:
    """|grad alpha| with the reference's Gaussian-derivative kernels.

    The reference (`gaussgradient.m`) builds the 2-D kernel gauss(y) * dgauss(x) on a
    (2r+1)^2 grid, r = ceil(sigma * sqrt(-2 ln(sqrt(2 pi) sigma 0.01))) (4 for sigma 1.4),
    scales it to unit L2 norm and convolves with replicated borders. scipy's
    `gaussian_filter(order=1)` samples the same separable shapes (each factor normalised
    differently), so we filter with scipy at that radius with `nearest` (= replicate) borders
    and rescale by the ratio of the two normalisations.
    """
    radius = math.ceil(sigma * math.sqrt(-2.0 * math.log(math.sqrt(2.0 * math.pi) * sigma * 0.01)))
    # scipy's 1-D kernels (see scipy.ndimage.gaussian_filter1d): a Gaussian summing to 1 and
    # its derivative -x / sigma^2 times it; the reference's 2-D kernel is their outer product
    # divided by its L2 norm, which is the product of the two 1-D norms.
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    gauss = np.exp(-0.5 * x**2 / sigma**2)
    gauss /= gauss.sum()
    norm = np.linalg.norm(gauss) * np.linalg.norm(x * gauss / sigma**2)
    grad_x = ndimage.gaussian_filter(alpha, sigma, order=(0, 1), mode="nearest", radius=radius)
    grad_y = ndimage.gaussian_filter(alpha, sigma, order=(1, 0), mode="nearest", radius=radius)
    return np.hypot(grad_x, grad_y) / norm


def gradient_error(
    pred: np.ndarray,
    gt: np.ndarray,
    region: np.ndarray | None = None,
    sigma: float = GRADIENT_SIGMA,
) -> float:
    """Sum over the region of (|grad pred| - |grad gt|)^2, divided by 1000.

    Args:
        pred: Predicted alpha in [0, 1], [H, W].
        gt: True alpha in [0, 1], [H, W].
        region: Pixels that count (None: all).
        sigma: Standard deviation of the Gaussian derivative filters (1.4 in the benchmark).
    """
    pred, gt, region = _check(pred, gt, region)
    error = (_gradient_magnitude(pred, sigma) - _gradient_magnitude(gt, sigma)) ** 2
    return float(error[region].sum() / SCALE)


def _largest_component(mask: np.ndarray, structure: np.ndarray) -> np.ndarray:
    """The largest connected component of `mask` (all False when the mask is empty)."""
    labels, count = ndimage.label(mask, structure=structure)
    if not count:
        return np.zeros_like(mask)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0  # background
    return labels == int(np.argmax(sizes))


def connectivity_error(
    pred: np.ndarray,
    gt: np.ndarray,
    region: np.ndarray | None = None,
    step: float = CONNECTIVITY_STEP,
    connectivity: int = 4,
) -> float:
    """Connectivity error (Rhemann et al.), as the benchmark's `compute_connectivity_error.m`.

    For each threshold t_k = k * step (k >= 1), the source region is the largest connected
    component of {pred >= t_k and gt >= t_k}. A pixel's level l_i is the last threshold
    t_{k-1} at which it still belonged to the source region (1 if it never leaves);
    d_i = alpha_i - l_i and phi_i = 1 - d_i * [d_i >= 0.15] for each of the two alphas. The
    error is sum |phi(pred) - phi(gt)| over the region, divided by 1000.

    Args:
        pred: Predicted alpha in [0, 1], [H, W].
        gt: True alpha in [0, 1], [H, W].
        region: Pixels that count (None: all).
        step: Threshold step (0.1 in the benchmark).
        connectivity: 4 (the reference's `bwconncomp(.., 4)`) or 8.
    """
    pred, gt, region = _check(pred, gt, region)
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity!r}")
    structure = ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2)
    # linspace, not arange: thresholds exactly 0.1, 0.2, ... (no 0.30000000000000004).
    thresholds = np.linspace(0.0, 1.0, round(1.0 / step) + 1)
    level = np.full(gt.shape, -1.0)
    for previous, threshold in zip(thresholds[:-1], thresholds[1:], strict=True):
        source = _largest_component((pred >= threshold) & (gt >= threshold), structure)
        level[(level == -1.0) & ~source] = previous
    level[level == -1.0] = 1.0

    def phi(alpha: np.ndarray) -> np.ndarray:
        distance = alpha - level
        return 1.0 - distance * (distance >= CONNECTIVITY_THETA)

    return float(np.abs(phi(pred) - phi(gt))[region].sum() / SCALE)


def matting_errors(
    pred: np.ndarray, gt: np.ndarray, region: np.ndarray | None = None
) -> dict[str, float]:
    """All four errors of one image: {"sad", "mse", "grad", "conn"}."""
    return {
        "sad": sad(pred, gt, region),
        "mse": mse(pred, gt, region),
        "grad": gradient_error(pred, gt, region),
        "conn": connectivity_error(pred, gt, region),
    }


def mean_errors(per_image: Iterable[dict[str, float]]) -> dict[str, float | None]:
    """Dataset errors: the mean over images of each per-image error (None without images).

    The benchmark and the Composition-1k tables average per-image SAD / MSE / Grad / Conn.
    """
    rows = list(per_image)
    return {
        name: (float(np.mean([row[name] for row in rows])) if rows else None)
        for name in METRIC_NAMES
    }
