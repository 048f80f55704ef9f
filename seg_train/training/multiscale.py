"""The model `fit` trains, asked rather than inspected: one view for single- and multi-output.

DeepLab v2 with multi-scale inputs (MSC) trains a view of the model whose outputs are the fused
logits and every per-scale score map: the loss goes on each score map (as in the paper and
DrSleep's `train_msc.py`), mean IoU on the fused logits, and checkpoints follow the fused
metrics. Every other model trains itself. `TrainingView.of(model)` hides which case it is, so
the train task, the benchmark and the callbacks use one interface.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import keras
import tensorflow as tf

# The output of a multi-output training view that metrics and checkpoints follow; the name
# is deeplabv2.METRIC_OUTPUT, the view's input-resolution fused logits.
FUSED = "fused"


@dataclass(frozen=True)
class TrainingView:
    """What `fit` trains for a model, and how labels, losses, metrics and monitors follow it.

    Attributes:
        model: The model that is saved and evaluated (single output).
        train_model: The model `fit` trains: `model` itself, or a multi-output view sharing all
            its weights.
        output_names: The view's output names; None for a single output.
    """

    model: keras.Model
    train_model: keras.Model
    output_names: tuple[str, ...] | None = None

    @classmethod
    def of(cls, model: keras.Model) -> TrainingView:
        """The view of `model`: multi-output for a DeepLab v2 built with `msc_scales`."""
        from seg_train.models import deeplabv2

        if any(layer.name.startswith(deeplabv2.SCALE_LOGITS_PREFIX) for layer in model.layers):
            train_model = deeplabv2.msc_training_model(model)
            return cls(model, train_model, tuple(train_model.output))
        return cls(model, model)

    @property
    def multi_output(self) -> bool:
        """Whether `fit` trains several outputs."""
        return self.output_names is not None

    def wrap_dataset(self, dataset: tf.data.Dataset) -> tf.data.Dataset:
        """(images, labels) batches with the labels repeated for every output of the view."""
        if self.output_names is None:
            return dataset
        names = self.output_names
        return dataset.map(lambda images, labels: (images, {name: labels for name in names}))

    def losses(self, loss):
        """The loss on every score map; none on the fused logits (labels shrink to each map)."""
        if self.output_names is None:
            return loss
        return {name: None if name == FUSED else loss for name in self.output_names}

    def metrics(self, metrics: Sequence):
        """The metrics, computed on the fused logits of a multi-output view."""
        if self.output_names is None:
            return list(metrics)
        return {FUSED: list(metrics)}

    def monitor(self, name: str) -> str:
        """The name `fit` logs a validation metric under (`val_mean_iou` ->
        `val_fused_mean_iou` for a multi-output view)."""
        if self.output_names is None or not name.startswith("val_"):
            return name
        return f"val_{FUSED}_{name.removeprefix('val_')}"
