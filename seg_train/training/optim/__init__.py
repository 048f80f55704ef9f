"""The optimizer factory of `configs/optimizer/*.yaml`: `build_optimizer` and its checks.

`build_optimizer` is the Hydra entry point of every `configs/optimizer/*.yaml`:

    optimizer = hydra.utils.instantiate(cfg.optimizer, total_steps=N, steps_per_epoch=M)

where N is the number of batches `fit` runs (epochs x steps per epoch) and M the batches per
epoch. Schedules count optimizer updates (`optimizer.iterations`); with gradient accumulation
an update consumes `accumulation_steps` batches, and `build_optimizer` converts N and M.

The schedules live in `schedules`, the per-group optimizer (head layers at 10x/20x the
backbone's rate, L2 decay, accumulation) in `param_groups`; both are re-exported here, and
importing this package registers their Keras serialisables (`seg_train>PolyDecay`, ...).
"""

from __future__ import annotations

import functools
import inspect
import numbers
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import keras

from seg_train.errors import UserError
from seg_train.training.optim.param_groups import (
    DEFAULT_DECAY_PATTERN,
    DEFAULT_GROUP_PATTERN,
    ParamGroup,
    ParamGroupOptimizer,
    check_template,
    param_group_rows,
    parse_param_groups,
    print_param_groups,
)
from seg_train.training.optim.schedules import PolyDecay, ScaledSchedule, StepDecay

__all__ = [
    "DEFAULT_DECAY_PATTERN",
    "DEFAULT_GROUP_PATTERN",
    "ParamGroup",
    "ParamGroupOptimizer",
    "PolyDecay",
    "ScaledSchedule",
    "StepDecay",
    "build_optimizer",
    "check_template",
    "param_group_rows",
    "parse_param_groups",
    "print_param_groups",
]

_Schedule = keras.optimizers.schedules.LearningRateSchedule


def build_optimizer(
    inner: keras.optimizers.Optimizer | Callable[[], keras.optimizers.Optimizer],
    learning_rate: float,
    schedule: Callable[..., _Schedule] | _Schedule | None = None,
    param_groups: Iterable[Mapping[str, Any]] | None = None,
    weight_decay: float = 0.0,
    decay_pattern: str = DEFAULT_DECAY_PATTERN,
    accumulation_steps: int = 1,
    head_pattern: str | None = None,
    total_steps: int | None = None,
    steps_per_epoch: int | None = None,
) -> keras.optimizers.Optimizer:
    """Builds the optimizer of a `configs/optimizer/*.yaml` (call it under the strategy scope).

    Returns the plain `inner` optimizer (with the schedule as its learning rate) when there is
    nothing group-specific to do — no parameter groups, no weight decay, no accumulation — so
    the default Adam run stays a plain Keras Adam; otherwise a `ParamGroupOptimizer`. The model
    need not exist yet: Keras calls `build(model.trainable_variables)` later.

    Args:
        inner: Keras optimizer (or a zero-argument factory, e.g. a Hydra `_partial_`) whose
            class and hyper-parameters every group uses; its learning rate is ignored.
        learning_rate: Base learning rate (`optimizer.learning_rate`).
        schedule: None for a constant rate, a `LearningRateSchedule`, or a factory (Hydra
            `_partial_: true`) called with `initial_learning_rate` and whichever of
            `total_steps` / `steps_per_epoch` it accepts, both in optimizer updates.
        param_groups: `[{pattern, lr_mult, wd_mult}, ...]`, see `ParamGroupOptimizer`.
        weight_decay: L2 coefficient on kernels (`decay_pattern`); 0 disables it.
        decay_pattern: Regex selecting the decayed variables by path.
        accumulation_steps: Batches per optimizer update (DeepLab's `iter_size`).
        head_pattern: Unused here; lets a config define the head-layer regex once and
            interpolate it into several `param_groups` patterns.
        total_steps: Batches `fit` will run in total (epochs x steps per epoch).
        steps_per_epoch: Batches per epoch.
    """
    del head_pattern  # only a config convenience, see Args
    if not isinstance(inner, keras.optimizers.Optimizer) and callable(inner):
        inner = inner()
    check_template(inner)
    # optimizer.learning_rate is checked with the other config rules (config_checks.RULES).
    if not (isinstance(accumulation_steps, int) and accumulation_steps >= 1):
        raise UserError(
            f"optimizer.accumulation_steps must be an integer >= 1, got {accumulation_steps!r}"
        )
    rate = _make_schedule(
        schedule, float(learning_rate), total_steps, steps_per_epoch, accumulation_steps
    )
    groups = parse_param_groups(param_groups)
    if not groups and not weight_decay and accumulation_steps == 1:
        config = dict(inner.get_config(), learning_rate=rate)
        return type(inner).from_config(config)
    return ParamGroupOptimizer(
        inner,
        learning_rate=rate,
        param_groups=groups,
        weight_decay=weight_decay,
        decay_pattern=decay_pattern,
        accumulation_steps=accumulation_steps,
    )


def _make_schedule(
    schedule,
    learning_rate: float,
    total_steps: int | None,
    steps_per_epoch: int | None,
    accumulation_steps: int,
) -> float | _Schedule:
    if schedule is None:
        return learning_rate
    if isinstance(schedule, _Schedule):
        return schedule
    for name, value in (("total_steps", total_steps), ("steps_per_epoch", steps_per_epoch)):
        if value is not None and not (isinstance(value, numbers.Integral) and value > 0):
            raise UserError(f"build_optimizer: {name} must be a positive integer, got {value!r}")
    # Schedules count optimizer updates; one update consumes `accumulation_steps` batches.
    available = {
        "total_steps": None if total_steps is None else int(total_steps) // accumulation_steps,
        "steps_per_epoch": None
        if steps_per_epoch is None
        else steps_per_epoch / accumulation_steps,
    }
    parameters = inspect.signature(schedule).parameters
    bound = schedule.keywords if isinstance(schedule, functools.partial) else {}
    kwargs = {"initial_learning_rate": learning_rate}
    for name, value in available.items():
        if name not in parameters or name in bound:
            continue
        if value is None:
            if parameters[name].default is inspect.Parameter.empty:
                raise UserError(
                    f"the learning-rate schedule needs {name}; build the optimizer "
                    f"with instantiate(cfg.optimizer, {name}=...)"
                )
            continue
        kwargs[name] = value
    return schedule(**kwargs)
