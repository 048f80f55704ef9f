"""The sources' own models and compile calls, written from their public text, as baselines.

Each builder follows one source's code line by line (layer names, sizes, initialisers, order),
so that `benchmarks/worker.py`'s "source" variant times the source's own `compile` + `fit` on
the same in-memory batch as seg-train's path. Nothing here imports seg_train: a baseline must
not share our code.

Both sources download ImageNet weights; here the backbones are built with `weights=None` (no
network access on the benchmark machines). Weights change neither the graph nor the speed.
"""

from __future__ import annotations

import keras
from keras import layers

TF_TUTORIAL = "tf_tutorial"
KERAS_IO = "keras_io"
SOURCES = (TF_TUTORIAL, KERAS_IO)


# ----- (a) TensorFlow's "Image segmentation" tutorial (seeds/004_58d9f01f14316898.txt) --------
def pix2pix_upsample(filters: int, size: int) -> keras.Sequential:
    """`tensorflow_examples.models.pix2pix.upsample(filters, size)` with its defaults.

    Conv2DTranspose(filters, size, strides=2, padding='same', N(0, 0.02) kernel, no bias) ->
    BatchNormalization -> ReLU (norm_type='batchnorm', apply_dropout=False).

    Differs from the source: `keras.initializers.RandomNormal(0.0, 0.02)` instead of
    `tf.random_normal_initializer(0., 0.02)` (the same distribution; Keras 3 wants its own
    initialiser objects), and the tensorflow_examples package is not needed.
    """
    return keras.Sequential(
        [
            layers.Conv2DTranspose(
                filters,
                size,
                strides=2,
                padding="same",
                kernel_initializer=keras.initializers.RandomNormal(mean=0.0, stddev=0.02),
                use_bias=False,
            ),
            layers.BatchNormalization(),
            layers.ReLU(),
        ]
    )


def build_tf_tutorial_unet(num_classes: int = 3, size: int = 128) -> keras.Model:
    """The TF segmentation tutorial's `unet_model(OUTPUT_CHANNELS)`.

    Source: tensorflow.org/tutorials/images/segmentation (seeds/004_58d9f01f14316898.txt):
    `tf.keras.applications.MobileNetV2(input_shape=[128, 128, 3], include_top=False)` read at
    block_1_expand_relu, block_3_expand_relu, block_6_expand_relu, block_13_expand_relu and
    block_16_project as `down_stack` with `down_stack.trainable = False`; up_stack =
    pix2pix.upsample(512, 3), (256, 3), (128, 3), (64, 3), each followed by a Concatenate with
    the skip of the same size; last layer Conv2DTranspose(OUTPUT_CHANNELS, 3, strides=2,
    padding='same') giving logits at the input size.

    Differs from the source: `weights=None` (the tutorial downloads the 128-px ImageNet weights;
    offline here), and `size` replaces the fixed 128 so that a quick run can use smaller inputs
    (any multiple of 32). The tutorial feeds images in [0, 1] without MobileNetV2's
    preprocessing; the model has no rescaling layer, as in the source.

    Args:
        num_classes: OUTPUT_CHANNELS (the tutorial: 3).
        size: Input height and width (the tutorial: 128).

    Returns:
        The uncompiled model; at 3 classes and 128 px it has 6,504,227 parameters, 4,660,323
        trainable (the frozen encoder holds the rest, with the decoder's BatchNorm statistics).
    """
    base_model = keras.applications.MobileNetV2(
        input_shape=[size, size, 3], include_top=False, weights=None
    )
    layer_names = [
        "block_1_expand_relu",  # size/2
        "block_3_expand_relu",  # size/4
        "block_6_expand_relu",  # size/8
        "block_13_expand_relu",  # size/16
        "block_16_project",  # size/32
    ]
    base_model_outputs = [base_model.get_layer(name).output for name in layer_names]
    down_stack = keras.Model(inputs=base_model.input, outputs=base_model_outputs)
    down_stack.trainable = False

    up_stack = [
        pix2pix_upsample(512, 3),
        pix2pix_upsample(256, 3),
        pix2pix_upsample(128, 3),
        pix2pix_upsample(64, 3),
    ]
    inputs = layers.Input(shape=[size, size, 3])
    skips = down_stack(inputs)
    x = skips[-1]
    skips = reversed(skips[:-1])
    for up, skip in zip(up_stack, skips):
        x = up(x)
        x = layers.Concatenate()([x, skip])
    last = layers.Conv2DTranspose(num_classes, 3, strides=2, padding="same")
    x = last(x)
    return keras.Model(inputs=inputs, outputs=x)


# ----- (b) keras-io "Multiclass semantic segmentation using DeepLabV3+" (seeds/001_...) --------
def convolution_block(
    block_input,
    num_filters: int = 256,
    kernel_size: int = 3,
    dilation_rate: int = 1,
    use_bias: bool = False,
):
    """keras-io's `convolution_block`: Conv2D (padding 'same', He-normal) -> BN -> ReLU.

    Differs from the source: `layers.ReLU()` instead of `tf.nn.relu(x)` (Keras 3 does not take
    a TensorFlow op on a symbolic tensor; the same function, no weights).
    """
    x = layers.Conv2D(
        num_filters,
        kernel_size=kernel_size,
        dilation_rate=dilation_rate,
        padding="same",
        use_bias=use_bias,
        kernel_initializer=keras.initializers.HeNormal(),
    )(block_input)
    x = layers.BatchNormalization()(x)
    return layers.ReLU()(x)


def dilated_spatial_pyramid_pooling(dspp_input):
    """keras-io's `DilatedSpatialPyramidPooling`: image pooling (AveragePooling2D over the whole
    map, 1x1 block with bias, bilinear UpSampling2D back) and 1x1, 3x3 rate 6, 12, 18 blocks,
    concatenated, then a 1x1 block. As in the source, line by line."""
    dims = dspp_input.shape
    x = layers.AveragePooling2D(pool_size=(dims[-3], dims[-2]))(dspp_input)
    x = convolution_block(x, kernel_size=1, use_bias=True)
    out_pool = layers.UpSampling2D(
        size=(dims[-3] // x.shape[1], dims[-2] // x.shape[2]), interpolation="bilinear"
    )(x)
    out_1 = convolution_block(dspp_input, kernel_size=1, dilation_rate=1)
    out_6 = convolution_block(dspp_input, kernel_size=3, dilation_rate=6)
    out_12 = convolution_block(dspp_input, kernel_size=3, dilation_rate=12)
    out_18 = convolution_block(dspp_input, kernel_size=3, dilation_rate=18)
    x = layers.Concatenate(axis=-1)([out_pool, out_1, out_6, out_12, out_18])
    return convolution_block(x, kernel_size=1)


def build_keras_io_deeplabv3plus(num_classes: int = 20, size: int = 512) -> keras.Model:
    """keras-io's `DeeplabV3Plus(image_size, num_classes)`.

    Source: keras-io examples/vision/deeplabv3_plus.py (seeds/001_1dfc365e7d3d21e1.txt):
    ResNet50(include_top=False, input_tensor=Input((512, 512, 3))) read at conv4_block6_2_relu
    -> DSPP -> bilinear x4 upsampling; conv2_block3_2_relu -> 1x1 block with 48 filters;
    concatenation, two 3x3 blocks, bilinear upsampling to the input size, Conv2D(num_classes,
    1x1, padding 'same') logits.

    Differs from the source: `weights=None` (keras-io loads ImageNet weights; offline here) and
    ReLU as a layer (see `convolution_block`). `size` may be any multiple of 32 (the source:
    IMAGE_SIZE = 512) so that a quick run can use smaller inputs.

    Args:
        num_classes: NUM_CLASSES (the source: 20, CIHP).
        size: IMAGE_SIZE.

    Returns:
        The uncompiled model; 11,857,236 parameters at 20 classes (the example's model.summary:
        11,824,500 trainable).
    """
    model_input = keras.Input(shape=(size, size, 3))
    resnet50 = keras.applications.ResNet50(
        weights=None, include_top=False, input_tensor=model_input
    )
    x = resnet50.get_layer("conv4_block6_2_relu").output
    x = dilated_spatial_pyramid_pooling(x)
    input_a = layers.UpSampling2D(
        size=(size // 4 // x.shape[1], size // 4 // x.shape[2]), interpolation="bilinear"
    )(x)
    input_b = resnet50.get_layer("conv2_block3_2_relu").output
    input_b = convolution_block(input_b, num_filters=48, kernel_size=1)
    x = layers.Concatenate(axis=-1)([input_a, input_b])
    x = convolution_block(x)
    x = convolution_block(x)
    x = layers.UpSampling2D(
        size=(size // x.shape[1], size // x.shape[2]), interpolation="bilinear"
    )(x)
    model_output = layers.Conv2D(num_classes, kernel_size=(1, 1), padding="same")(x)
    return keras.Model(inputs=model_input, outputs=model_output)


BUILDERS = {TF_TUTORIAL: build_tf_tutorial_unet, KERAS_IO: build_keras_io_deeplabv3plus}


def compile_like_source(model: keras.Model, source: str) -> keras.Model:
    """`model.compile(...)` exactly as the source writes it.

    tf_tutorial: compile(optimizer='adam', loss=SparseCategoricalCrossentropy(from_logits=True),
    metrics=['accuracy']). keras_io: compile(optimizer=Adam(learning_rate=0.001), loss=
    SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"]). Keras' defaults
    otherwise: no jit_compile argument, so Keras 3's 'auto' decides as it does for the sources'
    code today (no XLA on a CPU-only machine; XLA where an accelerator is present and the model
    supports it).

    Args:
        model: A baseline from `BUILDERS`.
        source: TF_TUTORIAL or KERAS_IO.

    Returns:
        The same model, compiled.
    """
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    if source == TF_TUTORIAL:
        model.compile(optimizer="adam", loss=loss, metrics=["accuracy"])
    elif source == KERAS_IO:
        model.compile(
            optimizer=keras.optimizers.Adam(learning_rate=0.001), loss=loss, metrics=["accuracy"]
        )
    else:
        raise ValueError(f"unknown source {source!r}; one of {SOURCES}")
    return model
