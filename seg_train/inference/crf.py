"""Fully-connected CRF refinement (Krähenbühl & Koltun 2011) with pydensecrf, as DeepLab uses it.

Unaries are -log(softmax probabilities) at the image's original resolution; the pairwise terms
are a Gaussian smoothness kernel and an appearance (bilateral) kernel on the original RGB image.
The defaults are the DeepLab / DrSleep parameters. `CRFRunner` spreads images over a process
pool; this module imports no TensorFlow so worker processes start quickly and safely.
"""

from __future__ import annotations

import os
import signal
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Any

import numpy as np

from seg_train.errors import UserError


@dataclass(frozen=True)
class CRFParams:
    """Dense CRF settings (defaults: DeepLab v2 / DrSleep's tensorflow-deeplab-resnet)."""

    iterations: int = 10
    gaussian_sxy: float = 1.0
    gaussian_compat: float = 4.0
    bilateral_sxy: float = 49.0
    bilateral_srgb: float = 13.0
    bilateral_compat: float = 5.0


def _densecrf():
    try:
        import pydensecrf.densecrf as dcrf
        import pydensecrf.utils  # noqa: F401
    except ImportError as exc:
        raise UserError(
            "postprocess=crf needs pydensecrf: pip install pydensecrf2 (PyPI's pydensecrf "
            "1.0rc3 does not build with Cython 3), or run without postprocess=crf"
        ) from exc
    return dcrf


def dense_crf(image: np.ndarray, probabilities: np.ndarray, params: CRFParams) -> np.ndarray:
    """Refines class probabilities with a dense CRF.

    Args:
        image: uint8 RGB [H, W, 3], the original image.
        probabilities: float [H, W, C] softmax probabilities at the image's resolution.
        params: CRF settings.

    Returns:
        float32 [H, W, C] marginals after mean-field inference.
    """
    dcrf = _densecrf()
    from pydensecrf.utils import unary_from_softmax

    height, width, classes = probabilities.shape
    crf = dcrf.DenseCRF2D(width, height, classes)
    unary = unary_from_softmax(probabilities.transpose(2, 0, 1))  # -log(p), clipped at 1e-5
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    crf.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_compat)
    crf.addPairwiseBilateral(
        sxy=params.bilateral_sxy,
        srgb=params.bilateral_srgb,
        rgbim=np.ascontiguousarray(image, dtype=np.uint8),
        compat=params.bilateral_compat,
    )
    marginals = np.array(crf.inference(params.iterations), dtype=np.float32)
    return marginals.reshape(classes, height, width).transpose(1, 2, 0)


class CRFRunner:
    """Runs `dense_crf` over a stream of images, in order, on a pool of worker processes.

    At most `2 * workers` images are in flight, so memory stays flat on long streams.

    Args:
        params: CRF settings.
        workers: Worker processes; None = all cores; 0 or 1 = in this process.
    """

    def __init__(self, params: CRFParams, workers: int | None = None):
        _densecrf()  # fail early with the install hint
        self.params = params
        self.workers = (os.cpu_count() or 1) if workers is None else workers

    def map(self, items: Iterable[tuple[np.ndarray, np.ndarray, Any]]) -> Iterator[tuple]:
        """Yields (marginals, tag) for each (image, probabilities, tag), in input order."""
        if self.workers <= 1:
            for image, probabilities, tag in items:
                yield dense_crf(image, probabilities, self.params), tag
            return
        # spawn, not fork: the parent has TensorFlow's threads running.
        pool = ProcessPoolExecutor(
            self.workers, mp_context=get_context("spawn"), initializer=_leave_ctrl_c_to_parent
        )
        pending: deque[tuple[Future, Any]] = deque()
        try:
            for image, probabilities, tag in items:
                with _workers_born_deaf_to_ctrl_c():  # submit may start a worker process
                    future = pool.submit(dense_crf, image, probabilities, self.params)
                pending.append((future, tag))
                if len(pending) >= 2 * self.workers:
                    future, done_tag = pending.popleft()
                    yield future.result(), done_tag
            while pending:
                future, done_tag = pending.popleft()
                yield future.result(), done_tag
        finally:
            # On Ctrl-C or an error downstream, drop the queued images instead of finishing them.
            pool.shutdown(wait=True, cancel_futures=True)


def _leave_ctrl_c_to_parent() -> None:
    """Pool worker start-up: ignore SIGINT.

    A terminal's Ctrl-C reaches the whole process group; the parent turns it into one line and
    exit 130 and stops the pool, while a worker interrupted mid-image would print its own
    traceback.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextmanager
def _workers_born_deaf_to_ctrl_c() -> Iterator[None]:
    """Blocks SIGINT in this thread while a pool worker may be spawned.

    The initializer runs only after a spawned worker has re-imported the parent's main module
    (seconds under load); a Ctrl-C in that window printed the worker's KeyboardInterrupt
    traceback. A child inherits the signal mask across fork and exec, so a worker started here
    never sees SIGINT; a Ctrl-C that reaches this process meanwhile stays pending and is
    delivered when the block ends, so the parent still stops at once.
    """
    if not hasattr(signal, "pthread_sigmask"):  # Windows: no signal masks, no process groups
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def build_runner(
    *,
    iterations: int = 10,
    gaussian: Mapping[str, float] | None = None,
    bilateral: Mapping[str, float] | None = None,
    workers: int | None = None,
) -> CRFRunner:
    """A `CRFRunner`, as configs/postprocess/crf.yaml describes one (its `_target_`).

    Args:
        iterations: Mean-field iterations.
        gaussian: The smoothness kernel, {sxy, compat}; None = `CRFParams`' defaults.
        bilateral: The appearance kernel, {sxy, srgb, compat}; None = `CRFParams`' defaults.
        workers: Worker processes; None = all cores; 0 or 1 = in this process.
    """
    defaults = CRFParams()
    gaussian, bilateral = gaussian or {}, bilateral or {}
    params = CRFParams(
        iterations=iterations,
        gaussian_sxy=gaussian.get("sxy", defaults.gaussian_sxy),
        gaussian_compat=gaussian.get("compat", defaults.gaussian_compat),
        bilateral_sxy=bilateral.get("sxy", defaults.bilateral_sxy),
        bilateral_srgb=bilateral.get("srgb", defaults.bilateral_srgb),
        bilateral_compat=bilateral.get("compat", defaults.bilateral_compat),
    )
    return CRFRunner(params, workers)
