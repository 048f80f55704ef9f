"""Custom layers and initialisers shared by the models, registered so `.keras` files reload.

Only what Keras has no built-in layer for lives here: the backbones' ImageNet preprocessing as a
layer, bilinear resizing to another tensor's (possibly dynamic) size or by a scale factor, and
the bilinear kernel initialiser of FCN's transposed convolutions. Everything is registered under
the `seg_train` package so `keras.saving.load_model(..., safe_mode=True)` can rebuild it once
`seg_train.models` is imported.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf
from keras import ops

PACKAGE = "seg_train"
PREPROCESSING_MODES = ("caffe", "tf", "torch")


def bilinear_kernel(size: int) -> np.ndarray:
    """The 2D bilinear interpolation filter of side `size` (Long et al.'s `upsample_filt`).

    For an upsampling factor f the FCN kernel has size `2 * f - f % 2`; used in a stride-f
    transposed convolution with `same` padding it reproduces bilinear interpolation with
    half-pixel centres (what `skimage.transform.rescale(order=1)` computes).
    """
    factor = (size + 1) // 2
    center = factor - 1 if size % 2 == 1 else factor - 0.5
    rows, cols = np.ogrid[:size, :size]
    return ((1 - abs(rows - center) / factor) * (1 - abs(cols - center) / factor)).astype("float32")


@keras.saving.register_keras_serializable(package=PACKAGE)
class BilinearUpsampling(keras.initializers.Initializer):
    """Initialises a `Conv2DTranspose` kernel [k, k, out, in] to per-channel bilinear upsampling.

    Channel i is upsampled from input channel i only (zero across channels), so the layer starts
    as plain bilinear interpolation and can then be trained (FCN, Long et al. 2015).
    """

    def __call__(self, shape, dtype=None):
        height, width, out_channels, in_channels = shape
        if height != width or out_channels != in_channels:
            raise ValueError(
                f"BilinearUpsampling needs a square kernel with as many input as "
                f"output channels, got kernel shape {tuple(shape)}"
            )
        kernel = np.zeros(shape, dtype="float32")
        filt = bilinear_kernel(height)
        for channel in range(out_channels):
            kernel[:, :, channel, channel] = filt
        return ops.convert_to_tensor(kernel, dtype=dtype or "float32")

    def get_config(self):
        return {}


@keras.saving.register_keras_serializable(package=PACKAGE)
class ImagePreprocessing(keras.layers.Layer):
    """Normalises 0..255 RGB images as a `keras.applications` backbone expects.

    Calls `keras.applications.imagenet_utils.preprocess_input` (the function behind every
    `keras.applications.<family>.preprocess_input`), so the model owns its normalisation and
    train, eval, infer and export agree. Runs in float32 even under a mixed-precision policy:
    the caffe mode subtracts means of ~120 from values up to 255, where float16 loses precision.

    Args:
        mode: "caffe" (VGG, ResNet: RGB->BGR, minus the ImageNet mean), "tf" (MobileNetV2:
            scale to -1..1) or "torch" (0..1, then ImageNet mean / std).
    """

    def __init__(self, mode: str = "caffe", **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if mode not in PREPROCESSING_MODES:
            raise ValueError(f"mode must be one of {PREPROCESSING_MODES}, got {mode!r}")
        self.mode = mode

    def call(self, images):
        return keras.applications.imagenet_utils.preprocess_input(images, mode=self.mode)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


def _resize(images, size, interpolation: str):
    """tf.image.resize to a size that may only be known at run time, in the input's dtype.

    `keras.ops.image.resize` validates `size` with Python comparisons, which fails once the
    size is a symbolic tensor (a model traced for `input_shape=[None, None, 3]`).
    """
    resized = tf.image.resize(
        images, tf.stack(size) if not _static(size) else size, method=interpolation
    )
    # tf.image.resize returns float32 for float16 inputs; keep the layer's compute dtype.
    return ops.cast(resized, images.dtype)


def _static(size) -> bool:
    return all(isinstance(side, int) for side in size)


@keras.saving.register_keras_serializable(package=PACKAGE)
class ResizeLike(keras.layers.Layer):
    """Bilinearly resizes `inputs[0]` to the height and width of `inputs[1]`.

    The target size is read from the reference tensor at run time, so the model works for any
    input size (including `input_shape=[None, None, 3]`) without rounding assumptions about how
    a backbone's strides shrink odd sizes.
    """

    def __init__(self, interpolation: str = "bilinear", **kwargs):
        super().__init__(**kwargs)
        self.interpolation = interpolation

    def call(self, inputs):
        images, reference = inputs
        return _resize(images, ops.shape(reference)[1:3], self.interpolation)

    def compute_output_shape(self, input_shape):
        images, reference = input_shape
        return (images[0], reference[1], reference[2], images[3])

    def get_config(self):
        return {**super().get_config(), "interpolation": self.interpolation}


@keras.saving.register_keras_serializable(package=PACKAGE)
class ResizeByScale(keras.layers.Layer):
    """Bilinearly rescales images by `scale`, to `floor(size * scale)` pixels.

    The size rule is DrSleep's tensorflow-deeplab-resnet (train_msc.py / evaluate_msc.py:
    `int(h * 0.75)`), the source of the DeepLab v2 MSC recipes: 321 px -> 240 px at 0.75 and
    160 px at 0.5, whose stride-8 score maps are 30x30 and 20x20.
    """

    def __init__(self, scale: float, interpolation: str = "bilinear", **kwargs):
        super().__init__(**kwargs)
        self.scale = float(scale)
        self.interpolation = interpolation

    def _scaled(self, size):
        if isinstance(size, int):
            return max(1, math.floor(size * self.scale))
        if size is None:
            return None
        scaled = ops.floor(ops.cast(size, "float32") * self.scale)
        return ops.maximum(ops.cast(scaled, "int32"), 1)

    def call(self, images):
        height, width = ops.shape(images)[1:3]
        return _resize(images, (self._scaled(height), self._scaled(width)), self.interpolation)

    def compute_output_shape(self, input_shape):
        batch, height, width, channels = input_shape
        return (batch, self._scaled(height), self._scaled(width), channels)

    def get_config(self):
        return {**super().get_config(), "scale": self.scale, "interpolation": self.interpolation}
