"""The output head of a task: class logits (segmentation) or a sigmoid alpha (matting).

Builders that support both (`task` argument: U-Net, MobileNetV2 U-Net, DeepLabV3+) size their
last conv with `output_channels` and finish with `output`; both outputs are float32 even under
mixed precision, so losses and metrics run in float32.
"""

from __future__ import annotations

import keras

from seg_train.errors import UserError

TASKS = ("segmentation", "matting")


def check_task(task: str) -> str:
    """Returns `task`, or raises a `UserError` naming the choices."""
    if task not in TASKS:
        raise UserError(
            f"model.task must be one of {', '.join(TASKS)}, got {task!r}; it "
            "follows data.task (e.g. data.task=matting)"
        )
    return task


def output_channels(task: str, num_classes: int) -> int:
    """Channels of the last conv: one per class, or the single alpha channel."""
    return 1 if check_task(task) == "matting" else num_classes


def output(x, task: str, name: str = "logits_float32"):
    """float32 logits [B, H, W, C] unchanged, or the alpha sigmoid(x) [B, H, W, 1] in [0, 1]."""
    if check_task(task) == "matting":
        return keras.layers.Activation("sigmoid", dtype="float32", name="alpha")(x)
    return keras.layers.Activation("linear", dtype="float32", name=name)(x)
