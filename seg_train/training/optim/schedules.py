"""Learning-rate schedules over optimizer updates (step 0 is the first update).

`PolyDecay` (DeepLab's "poly" with warmup) and `StepDecay` are the schedules the optimizer
configs name; `ScaledSchedule` gives one parameter group its `lr_mult` share of the base
schedule. All are registered with Keras as `seg_train>ClassName`, the names saved in
`.keras` checkpoints.
"""

from __future__ import annotations

import numbers
from typing import Any

import keras
from keras import ops

from seg_train.errors import UserError

_Schedule = keras.optimizers.schedules.LearningRateSchedule


@keras.saving.register_keras_serializable(package="seg_train")
class PolyDecay(_Schedule):
    """DeepLab's "poly" schedule with an optional linear warmup.

    `lr(step) = initial * (1 - min(step, total) / total) ** power * min(1, (step + 1) / warmup)`

    `keras.optimizers.schedules.PolynomialDecay` computes the same decay only with
    `end_learning_rate=0` (its default is 1e-4) and has no warmup, so warmup and decay live here
    in one serialisable schedule. The warmup factor starts at `1 / warmup_steps` rather than 0
    so the first update is not wasted, and reaches 1 at `step = warmup_steps - 1`, where it
    joins the poly curve without a jump.

    Args:
        initial_learning_rate: Base learning rate.
        total_steps: Number of optimizer updates of the whole run; the rate is 0 from there on.
        power: Exponent of the decay (0.9 in DeepLab).
        warmup_steps: Length of the linear warmup in updates; 0 disables it.
        name: Name of the schedule.
    """

    def __init__(
        self,
        initial_learning_rate: float,
        total_steps: int,
        power: float = 0.9,
        warmup_steps: int = 0,
        name: str = "PolyDecay",
    ):
        super().__init__()
        if not (isinstance(total_steps, numbers.Integral) and total_steps > 0):
            raise UserError(
                f"the poly schedule needs total_steps > 0 optimizer updates, got "
                f"{total_steps!r}; raise trainer.epochs or trainer.steps_per_epoch"
            )
        if not (isinstance(warmup_steps, numbers.Integral) and warmup_steps >= 0):
            raise UserError(
                f"optimizer.schedule.warmup_steps must be an integer >= 0, got {warmup_steps!r}"
            )
        self.initial_learning_rate = float(initial_learning_rate)
        self.total_steps = int(total_steps)
        self.power = float(power)
        self.warmup_steps = int(warmup_steps)
        self.name = name

    def __call__(self, step):
        step = ops.cast(step, "float32")
        progress = ops.minimum(step, float(self.total_steps)) / float(self.total_steps)
        rate = self.initial_learning_rate * ops.power(1.0 - progress, self.power)
        if self.warmup_steps:
            rate = rate * ops.minimum(1.0, (step + 1.0) / float(self.warmup_steps))
        return rate

    def get_config(self) -> dict[str, Any]:
        return {
            "initial_learning_rate": self.initial_learning_rate,
            "total_steps": self.total_steps,
            "power": self.power,
            "warmup_steps": self.warmup_steps,
            "name": self.name,
        }


@keras.saving.register_keras_serializable(package="seg_train")
class StepDecay(_Schedule):
    """Step decay: the rate is multiplied by `decay_rate` every `decay_epochs` epochs.

    `lr(step) = initial * decay_rate ** floor(step / (decay_epochs * steps_per_epoch))`, as
    PyTorch's `StepLR(step_size=7, gamma=0.1)` of the PyTorch U-Net recipe. It equals
    `keras.optimizers.schedules.ExponentialDecay(staircase=True)` with `decay_steps =
    decay_epochs * steps_per_epoch`; this class only takes epochs so the config can stay in
    epochs while `build_optimizer` supplies the steps per epoch.

    Args:
        initial_learning_rate: Rate of the first `decay_epochs` epochs.
        steps_per_epoch: Optimizer updates per epoch (may be fractional with accumulation).
        decay_epochs: Epochs between two decays.
        decay_rate: Factor applied at each decay.
        name: Name of the schedule.
    """

    def __init__(
        self,
        initial_learning_rate: float,
        steps_per_epoch: float,
        decay_epochs: float = 7,
        decay_rate: float = 0.1,
        name: str = "StepDecay",
    ):
        super().__init__()
        if not (steps_per_epoch and steps_per_epoch > 0):
            raise UserError(f"the step schedule needs steps_per_epoch > 0, got {steps_per_epoch!r}")
        if not decay_epochs > 0:
            raise UserError(f"optimizer.schedule.decay_epochs must be > 0, got {decay_epochs!r}")
        self.initial_learning_rate = float(initial_learning_rate)
        self.steps_per_epoch = float(steps_per_epoch)
        self.decay_epochs = float(decay_epochs)
        self.decay_rate = float(decay_rate)
        self.name = name

    def __call__(self, step):
        period = self.decay_epochs * self.steps_per_epoch
        drops = ops.floor(ops.cast(step, "float32") / period)
        return self.initial_learning_rate * ops.power(self.decay_rate, drops)

    def get_config(self) -> dict[str, Any]:
        return {
            "initial_learning_rate": self.initial_learning_rate,
            "steps_per_epoch": self.steps_per_epoch,
            "decay_epochs": self.decay_epochs,
            "decay_rate": self.decay_rate,
            "name": self.name,
        }


@keras.saving.register_keras_serializable(package="seg_train")
class ScaledSchedule(_Schedule):
    """`schedule(step) * multiplier`: one parameter group's share of the base schedule."""

    def __init__(self, schedule: _Schedule, multiplier: float):
        super().__init__()
        self.schedule = schedule
        self.multiplier = float(multiplier)

    def __call__(self, step):
        return self.schedule(step) * self.multiplier

    def get_config(self) -> dict[str, Any]:
        return {
            "schedule": keras.saving.serialize_keras_object(self.schedule),
            "multiplier": self.multiplier,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ScaledSchedule:
        config = dict(config)
        config["schedule"] = keras.saving.deserialize_keras_object(config["schedule"])
        return cls(**config)
