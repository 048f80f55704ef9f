"""The TensorBoard prediction panels carry column titles and a class legend, like samples/."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from seg_train.training.callbacks import PredictionImageLogger
from seg_train.viz import full_palette

SIZE = 32


def _logged_panels(log_dir) -> list[np.ndarray]:
    panels = []
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                tensor = tf.make_ndarray(value.tensor)
                # An image summary holds [width, height, png...] as strings.
                panels += [tf.io.decode_png(png).numpy() for png in tensor[2:]]
    return panels


def test_panels_have_titles_and_a_legend_and_differing_legends_still_log(tmp_path):
    images = np.full((2, SIZE, SIZE, 3), 120, np.float32)
    masks = np.zeros((2, SIZE, SIZE), np.uint8)
    masks[1, :8] = 2  # the second image shows one class more: a longer legend
    inputs = keras.Input((SIZE, SIZE, 3))
    model = keras.Model(inputs, keras.layers.Conv2D(3, 1)(inputs))
    logger = PredictionImageLogger(
        str(tmp_path),
        images,
        masks,
        full_palette([[0, 0, 0], [255, 0, 0], [0, 255, 0]]),
        class_names=["background", "road", "tree"],
    )
    logger.set_model(model)
    logger.on_epoch_end(0)
    panels = _logged_panels(tmp_path)
    assert len(panels) == 2
    for panel in panels:
        # Three 32-px columns (image | truth | prediction), at least 32 px wide each, plus a
        # title strip above and a legend below: taller than the 32-px images.
        assert panel.shape[1] >= 3 * SIZE and panel.shape[0] > SIZE
        # The strips are drawn on white; the images are grey 120.
        assert (panel[0] == 255).all()
