"""Per-image prediction at the image's original resolution, shared by eval, infer and training.

`Predictor` turns a segmentation model into a function from a uint8 RGB image of any size to
class scores at that size:

* **whole** mode runs the image in one pass. A model built for a fixed input size is first
  re-instantiated with a dynamic input (same weights, `keras.models.clone_model`) so the image is
  seen at its own resolution, padded bottom/right with `pad_value` (`data.pad_value`) to a
  multiple of `size_divisor`. A model that cannot be re-instantiated gets the image resized to
  its input size instead: a different protocol, so it is a WARNING and `protocol_change` says
  it (evaluation records it in metrics.json).
* **slide** mode tiles the (padded) image with `crop_size` windows every `stride` pixels and
  averages the overlapping logits, as mmsegmentation's slide inference does. The windows run
  `batch_size` at a time, so memory does not grow with the image beyond its logits.
* **whole** mode above `max_whole_pixels` (an image's height x width) would need memory in
  proportion to the image for every layer's activations, so such images are predicted in slide
  mode instead: a WARNING and `protocol_change` say so (evaluation records it).
* **resize** mode resizes the whole image to `crop_size` (bilinear), runs it, and resizes the
  logits back to the image size (bilinear): the protocol of recipes trained on whole images
  resized to a fixed size (`data.transform=resize`, the tutorials), which would otherwise see
  objects at another scale than in training.
* **test-time augmentation** repeats either mode for each scale in `scales` (and mirrored if
  `flip`), resizes each view's logits bilinearly back to the original size, and fuses them:
  `mean_prob` averages softmax probabilities (returned as log-probabilities), `max_logit` takes
  the element-wise maximum of the logits (DeepLab v2's multi-scale max-fusion).

Logits are always resized to the label size *before* the argmax.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf

from seg_train.data.augment import pad_colour, pad_image
from seg_train.errors import UserError

log = logging.getLogger(__name__)

MODES = ("whole", "slide", "resize")
# Whole-mode images above this many pixels are predicted in slide mode. Measured: a whole-mode
# prediction of a 6000x4000 image with a 0.5M-parameter U-Net peaks at 7.6 GB of RAM (~320
# bytes per pixel, more for wider networks); 2048x2048 keeps that model near 1.3 GB while
# Cityscapes-size frames (2048x1024) still run whole. Measured again on 2 CPUs, `mode=infer` of
# one 3000x2000 image with a `model.base_filters=8` U-Net peaks at 2.45 GB whole and 1.39 GB
# switched to 512x512 windows (0.77 GB for a 64x64 image: the process with TensorFlow loaded).
MAX_WHOLE_PIXELS = 2048 * 2048
EVAL_BATCH_SIZE = 4
FUSIONS = ("mean_prob", "max_logit")


def dynamic_twin(model: keras.Model) -> keras.Model | None:
    """The same network with an [H, W]-agnostic input, or None if it cannot be rebuilt.

    None means predictions must resize every image to the model's input size; `Predictor`
    says so in a WARNING and in `protocol_change`.
    """
    return _twin_or_reason(model)[0]


def _twin_or_reason(model: keras.Model) -> tuple[keras.Model | None, str]:
    """(dynamic twin, "") or (None, why it could not be built)."""
    height, width = model.input_shape[1:3]
    if height is None and width is None:
        return model, ""
    try:
        twin = keras.models.clone_model(
            model, input_tensors=keras.Input((None, None, model.input_shape[-1]), name="image")
        )
        twin.set_weights(model.get_weights())
        # Probe with a size the original could not take, e.g. a model with a fixed-size
        # reshape or pooling fails here.
        twin(np.zeros((1, 2 * height, 2 * width, model.input_shape[-1]), np.float32))
    except Exception as exc:  # noqa: BLE001 - which layer fails, and how, is model-specific
        first_line = (str(exc).strip().splitlines() or [""])[0]
        return None, f"{type(exc).__name__}: {first_line}"[:200]
    return twin, ""


def resize_protocol_change(model: keras.Model, reason: str = "") -> str:
    """The line that says predictions of a fixed-size `model` are made on resized images."""
    height, width = model.input_shape[1:3]
    because = f" ({reason})" if reason else ""
    return (
        f"model {model.name} does not run at input sizes other than {height}x{width}"
        f"{because}: every image is resized to {height}x{width} and its logits back to the "
        "image size, instead of the original-resolution protocol"
    )


class Predictor:
    """Class scores at original resolution for single images of any size.

    Args:
        model: A model mapping float32 [B, H, W, 3] images (0..255) to logits [B, H, W, C].
        mode: "whole", "slide" or "resize".
        crop_size: [h, w] window of slide mode, or the size resize mode resizes every image to
            (defaults to the model's input size).
        stride: [h, w] step of slide mode (defaults to two thirds of crop_size).
        scales: TTA scales; [1.0] = no multi-scale.
        flip: Also predict the mirrored image (TTA).
        fusion: "mean_prob" or "max_logit", how TTA views are combined.
        flip_pairs: [[a, b], ...] classes that swap under a horizontal flip (left/right arm),
            so a mirrored view's scores are mapped back to the right classes.
        size_divisor: whole-mode images are padded to a multiple of this (the network stride).
        batch_size: Slide windows run through the network this many at a time.
        max_whole_pixels: Whole-mode images with more pixels (height x width, per TTA view)
            are predicted in slide mode with `crop_size` windows; 0 or None = no limit.
        pad_value: Image fill of that padding and of slide windows beyond the image: 0 or an
            [r, g, b] colour in 0..255 (`data.pad_value`, e.g. the backbone's mean colour).

    Attributes:
        protocol_change: None, or the line(s) saying that images are resized to a fixed-size
            model's input size because no size-agnostic twin could be built, and/or that
            images above `max_whole_pixels` were predicted in slide mode.
        resize_change: The first of those lines alone (None when images keep their size).
        slide_switches: How many views whole mode handed to slide mode.
    """

    def __init__(
        self,
        model: keras.Model,
        mode: str = "whole",
        crop_size: Sequence[int] | None = None,
        stride: Sequence[int] | None = None,
        scales: Sequence[float] = (1.0,),
        flip: bool = False,
        fusion: str = "mean_prob",
        flip_pairs: Sequence[Sequence[int]] | None = None,
        size_divisor: int = 32,
        pad_value: float | Sequence[float] = 0,
        batch_size: int = EVAL_BATCH_SIZE,
        max_whole_pixels: int | None = MAX_WHOLE_PIXELS,
    ):
        if mode not in MODES:
            raise UserError(f"eval.mode must be one of {', '.join(MODES)}, got {mode!r}")
        if fusion not in FUSIONS:
            raise UserError(f"eval.tta.fusion must be one of {', '.join(FUSIONS)}, got {fusion!r}")
        if not scales or any(s <= 0 for s in scales):
            raise UserError(f"eval.tta.scales must be positive numbers, got {list(scales)}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise UserError(
                f"eval.batch_size must be a positive integer (slide windows per "
                f"network call), got {batch_size!r}"
            )
        if max_whole_pixels is not None and (
            not isinstance(max_whole_pixels, int) or max_whole_pixels < 0
        ):
            raise UserError(
                "eval.max_whole_pixels must be a pixel count (e.g. 4194304 for "
                f"2048x2048) or 0 for no limit, got {max_whole_pixels!r}"
            )
        self.fixed_size = tuple(model.input_shape[1:3]) if model.input_shape[1] else None
        self.mode = mode
        self.crop_size = tuple(crop_size or self.fixed_size or (512, 512))
        self.stride = tuple(stride or (max(1, c * 2 // 3) for c in self.crop_size))
        twin, reason = _twin_or_reason(model)
        self.source_model = model
        self.model = twin or model
        self.resize_to_fixed = twin is None and self.fixed_size is not None
        if (
            mode in ("slide", "resize")
            and self.resize_to_fixed
            and (self.crop_size != self.fixed_size)
        ):
            raise UserError(
                f"eval.crop_size {list(self.crop_size)} must equal the model's fixed input size "
                f"{list(self.fixed_size)} for eval.mode={mode}"
            )
        # Resize mode asks for what a fixed-size model would get anyway: no protocol change.
        self.resize_change = (
            resize_protocol_change(model, reason)
            if self.resize_to_fixed and mode != "resize"
            else None
        )
        if self.resize_change:
            log.warning("Protocol change: %s", self.resize_change)
        self.resize_to = (
            self.crop_size
            if mode == "resize"
            else (self.fixed_size if self.resize_to_fixed else None)
        )
        self.scales = [float(s) for s in scales]
        self.flip = flip
        self.fusion = fusion
        self.size_divisor = size_divisor
        self.batch_size = batch_size
        self.max_whole_pixels = max_whole_pixels or None
        self.slide_switches = 0
        self.pad_colour = pad_colour(pad_value)
        self.channel_order = _flip_permutation(model.output_shape[-1], flip_pairs)
        self._net = tf.function(lambda x: self.model(x, training=False), reduce_retracing=True)

    @property
    def protocol_change(self) -> str | None:
        """What differs from the configured protocol, in words; None when nothing does."""
        lines = [self.resize_change] if self.resize_change else []
        if self.slide_switches:
            lines.append(self._slide_switch_line())
        return "; ".join(lines) or None

    def _slide_switch_line(self) -> str:
        return (
            f"{self.slide_switches} image view(s) above eval.max_whole_pixels="
            f"{self.max_whole_pixels} were predicted in slide mode ({list(self.crop_size)} "
            f"windows every {list(self.stride)} pixels) instead of whole mode, to bound "
            "memory; raise eval.max_whole_pixels (0 = no limit) to predict them whole"
        )

    def sync_weights(self) -> None:
        """Copies the source model's current weights into its dynamic twin (if it has one).

        A Predictor built once on a model that keeps training (in-training validation) must
        call this before each evaluation; the twin holds its own copy of the weights.
        """
        if self.model is not self.source_model:
            self.model.set_weights(self.source_model.get_weights())

    # ----- one view -------------------------------------------------------------------------
    def _run(self, batch: tf.Tensor) -> tf.Tensor:
        """Logits for a float32 batch at the batch's own size."""
        size = tf.shape(batch)[1:3]
        if self.resize_to is not None:
            logits = self._net(tf.image.resize(batch, self.resize_to, method="bilinear"))
            return tf.image.resize(logits, size, method="bilinear")
        divisor = self.size_divisor
        pad_h = (-batch.shape[1]) % divisor
        pad_w = (-batch.shape[2]) % divisor
        padded = pad_image(batch, [[0, pad_h], [0, pad_w]], self.pad_colour)
        return self._net(padded)[:, : batch.shape[1], : batch.shape[2]]

    def _slide(self, image: tf.Tensor) -> tf.Tensor:
        """Averages the logits of overlapping crop_size windows over a float32 [H, W, 3]."""
        height, width = int(image.shape[0]), int(image.shape[1])
        crop_h, crop_w = self.crop_size
        stride_h, stride_w = self.stride
        padding = [[0, max(crop_h - height, 0)], [0, max(crop_w - width, 0)]]
        padded = pad_image(image, padding, self.pad_colour)
        pad_height, pad_width = int(padded.shape[0]), int(padded.shape[1])
        tops = _window_starts(pad_height, crop_h, stride_h)
        lefts = _window_starts(pad_width, crop_w, stride_w)
        windows = [(top, left) for top in tops for left in lefts]
        total = count = None
        # A batch at a time, so memory holds batch_size windows' activations, not all of them.
        for start in range(0, len(windows), self.batch_size):
            batch = windows[start : start + self.batch_size]
            crops = tf.stack([padded[t : t + crop_h, x : x + crop_w] for t, x in batch])
            logits = self._run(crops).numpy()
            if total is None:
                total = np.zeros((pad_height, pad_width, logits.shape[-1]), np.float32)
                count = np.zeros((pad_height, pad_width, 1), np.float32)
            for (t, x), window_logits in zip(batch, logits):
                total[t : t + crop_h, x : x + crop_w] += window_logits
                count[t : t + crop_h, x : x + crop_w] += 1
        return tf.constant(total[:height, :width] / count[:height, :width])

    def _too_large_for_whole(self, image: tf.Tensor) -> bool:
        """True when whole mode would run a view above `max_whole_pixels` at its own size."""
        pixels = int(image.shape[0]) * int(image.shape[1])
        return (
            self.mode == "whole"
            and self.resize_to is None
            and self.max_whole_pixels is not None
            and pixels > self.max_whole_pixels
        )

    def _view(self, image: tf.Tensor) -> tf.Tensor:
        """Logits [H, W, C] for a float32 image [H, W, 3] in the configured mode."""
        if self.mode == "slide":
            return self._slide(image)
        if self._too_large_for_whole(image):
            self.slide_switches += 1
            if self.slide_switches == 1:
                log.warning(
                    "Protocol change: a %dx%d image is above eval.max_whole_pixels=%d: "
                    "predicting it (and any other such image) in slide mode with %s "
                    "windows every %s pixels, to bound memory; raise "
                    "eval.max_whole_pixels (0 = no limit) to predict it whole",
                    image.shape[1],
                    image.shape[0],
                    self.max_whole_pixels,
                    list(self.crop_size),
                    list(self.stride),
                )
            return self._slide(image)
        return self._run(image[None])[0]

    # ----- public API -----------------------------------------------------------------------
    def logits(self, image: np.ndarray) -> np.ndarray:
        """Fused class scores [H, W, C] for a uint8 RGB image [H, W, 3]; argmax = prediction.

        With one view these are the model's logits; with several, log mean probabilities
        (`mean_prob`) or the maximum logits (`max_logit`).
        """
        original = tf.cast(tf.convert_to_tensor(image), tf.float32)
        size = original.shape[:2]
        views = []
        for scale in self.scales:
            scaled = original
            if scale != 1.0:
                new_size = [max(1, round(size[0] * scale)), max(1, round(size[1] * scale))]
                scaled = tf.image.resize(original, new_size, method="bilinear")
            for mirrored in (False, True) if self.flip else (False,):
                view = self._view(tf.reverse(scaled, [1]) if mirrored else scaled)
                if mirrored:
                    view = tf.gather(tf.reverse(view, [1]), self.channel_order, axis=-1)
                if scale != 1.0:
                    view = tf.image.resize(view, size, method="bilinear")
                views.append(view)
        if len(views) == 1:
            return views[0].numpy()
        stacked = tf.stack(views)
        if self.fusion == "max_logit":
            return tf.reduce_max(stacked, axis=0).numpy()
        return tf.math.log(tf.reduce_mean(tf.nn.softmax(stacked, axis=-1), axis=0) + 1e-12).numpy()

    def probabilities(self, image: np.ndarray) -> np.ndarray:
        """Class probabilities [H, W, C] (softmax of the fused scores)."""
        return tf.nn.softmax(self.logits(image), axis=-1).numpy()

    def labels(self, image: np.ndarray) -> np.ndarray:
        """uint8 class ids [H, W] for a uint8 RGB image [H, W, 3]."""
        return self.logits(image).argmax(-1).astype(np.uint8)


def _window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Window offsets covering [0, length) with the last window flush with the end."""
    count = max(length - crop + stride - 1, 0) // stride + 1
    return sorted({min(i * stride, length - crop) for i in range(count)})


def _flip_permutation(num_classes: int, flip_pairs: Sequence[Sequence[int]] | None) -> list[int]:
    order = list(range(num_classes))
    for a, b in flip_pairs or []:
        order[a], order[b] = b, a
    return order
