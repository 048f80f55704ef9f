"""Parameter groups: one inner Keras optimizer per group of variables, each with its own rate.

Keras 3 has one learning rate per optimizer. Recipes such as DeepLab (Chen et al. 2017,
https://arxiv.org/abs/1606.00915) train the new head layers 10x (weights) and 20x (biases)
faster than the pretrained backbone. Scaling gradients is no substitute: Adam, RMSprop and
friends normalise the gradient, so a scaled gradient gives the same step. `ParamGroupOptimizer`
therefore runs one inner Keras optimizer per group of variables, each with its own learning
rate (`schedule(step) * lr_mult`) and its own slots (momentum, Adam moments, ...), and adds
L2 weight decay and gradient accumulation.

Variables are assigned to groups by regular expressions searched (`re.search`) in the variable
path, e.g. `aspp_conv_2/kernel` or, for a layer inside a nested model,
`scale_net/aspp_conv_2/kernel`; the first matching group wins and unmatched variables form the
default group (multipliers 1). `param_group_rows` / `print_param_groups` tabulate the groups.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import keras
from keras import ops

from seg_train.errors import UserError
from seg_train.training.optim.schedules import ScaledSchedule

log = logging.getLogger(__name__)

# Conv (incl. depthwise/separable/transposed) and dense weights are named `...kernel` in Keras 3;
# biases (`bias`) and BatchNorm `gamma`/`beta` are not, so they are never decayed.
DEFAULT_DECAY_PATTERN = r"kernel$"
DEFAULT_GROUP_PATTERN = "(default)"
_GROUP_KEYS = {"pattern", "lr_mult", "wd_mult"}
_Schedule = keras.optimizers.schedules.LearningRateSchedule


@dataclass(frozen=True)
class ParamGroup:
    """One parameter group: variables whose path matches `pattern` (None: the default group)."""

    pattern: str | None
    lr_mult: float = 1.0
    wd_mult: float = 1.0

    def matches(self, path: str) -> bool:
        return self.pattern is not None and re.search(self.pattern, path) is not None

    def to_dict(self) -> dict[str, Any]:
        return {"pattern": self.pattern, "lr_mult": self.lr_mult, "wd_mult": self.wd_mult}


def parse_param_groups(groups: Iterable[Mapping[str, Any] | ParamGroup] | None) -> list[ParamGroup]:
    """Validates `optimizer.param_groups` entries; raises `UserError` naming the bad key."""
    parsed = []
    for i, group in enumerate(groups or ()):
        key = f"optimizer.param_groups[{i}]"
        if isinstance(group, ParamGroup):
            group = group.to_dict()
        if not isinstance(group, Mapping):
            raise UserError(
                f"{key} must be a mapping like {{pattern: '^head', lr_mult: 10, "
                f"wd_mult: 1}}, got {group!r}"
            )
        unknown = set(group) - _GROUP_KEYS
        if unknown:
            raise UserError(
                f"{key} has unknown keys {sorted(unknown)}; allowed: {sorted(_GROUP_KEYS)}"
            )
        pattern = group.get("pattern")
        if not isinstance(pattern, str) or not pattern:
            raise UserError(f"{key}.pattern must be a non-empty regex, got {pattern!r}")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise UserError(
                f"{key}.pattern {pattern!r} is not a valid regex ({exc}); fix the pattern"
            ) from exc
        mults = {}
        for name in ("lr_mult", "wd_mult"):
            value = group.get(name, 1.0)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise UserError(f"{key}.{name} must be a number >= 0, got {value!r}")
            mults[name] = float(value)
        parsed.append(ParamGroup(pattern, **mults))
    return parsed


def _path(variable) -> str:
    # tf.Variable has no `path`; its name ("dense/kernel:0") is the closest equivalent.
    return getattr(variable, "path", None) or variable.name


def _num_params(variable) -> int:
    count = 1
    for dim in variable.shape:
        count *= int(dim)
    return count


def _num_replicas() -> int:
    """Replicas the loss is averaged over (Keras divides the loss by this under tf.distribute)."""
    if keras.backend.backend() != "tensorflow":
        return 1
    import tensorflow as tf

    return tf.distribute.get_strategy().num_replicas_in_sync


class _Hidden:
    """Holds the inner optimizers out of sight of Keras' saving walk.

    `save_own_variables` of the wrapper already writes every inner variable (see
    `ParamGroupOptimizer.variables`); if `saving_lib` also found the inner optimizers as
    attributes it would store every slot twice.
    """

    def __init__(self, optimizers: Sequence[keras.optimizers.Optimizer], template: dict):
        self.optimizers = tuple(optimizers)
        self.template = template


@keras.saving.register_keras_serializable(package="seg_train")
class ParamGroupOptimizer(keras.optimizers.Optimizer):
    """Applies one inner optimizer per parameter group, each with its own learning rate.

    Each group gets a copy of the template `optimizer` (same class and hyper-parameters) whose
    learning rate is the base `learning_rate` times the group's `lr_mult` (for a schedule:
    `ScaledSchedule(schedule, lr_mult)`), so every group has its own slots and, for Adam, its
    own bias correction. The template's own learning rate is ignored.

    L2 weight decay is added to the gradient (`g + weight_decay * wd_mult * w`, the gradient of
    `weight_decay / 2 * ||w||^2`, as Caffe/DeepLab and PyTorch's SGD `weight_decay` do) for
    variables whose path matches `decay_pattern` (kernels), before momentum or Adam see it.

    Gradient accumulation (`accumulation_steps` > 1, DeepLab's `iter_size`) averages the
    gradients of that many batches and then updates once. Keras' own
    `gradient_accumulation_steps` is not used: it branches with `ops.cond` in replica context
    around a `merge_call`, which fails under `tf.distribute.MirroredStrategy` ("merge_call
    called while defining a new graph"), and it evaluates learning-rate schedules at batch
    rather than update counts. Here the branch runs in cross-replica context, as Keras'
    `LossScaleOptimizer` does, and inner optimizers only count real updates.

    Args:
        optimizer: Template Keras optimizer (instance or its serialised config), e.g.
            `keras.optimizers.SGD(momentum=0.9)`. Must not set `weight_decay` or
            `gradient_accumulation_steps` (use this class' arguments).
        learning_rate: Base rate (float) or `LearningRateSchedule` over optimizer updates.
        param_groups: `[{pattern, lr_mult, wd_mult}, ...]`; first match wins; the rest form
            the default group with multipliers 1.
        weight_decay: L2 coefficient; 0 disables decay.
        decay_pattern: Regex searched in variable paths selecting the decayed variables.
        accumulation_steps: Batches per update.
        loss_scale_factor: Static loss scale (see `keras.optimizers.Optimizer`).
        name: Optimizer name.
    """

    def __init__(
        self,
        optimizer: keras.optimizers.Optimizer | dict,
        learning_rate: float | _Schedule = 0.01,
        param_groups: Iterable[Mapping[str, Any] | ParamGroup] | None = None,
        weight_decay: float = 0.0,
        decay_pattern: str = DEFAULT_DECAY_PATTERN,
        accumulation_steps: int = 1,
        loss_scale_factor: float | None = None,
        name: str | None = None,
    ):
        # No **kwargs: clipnorm, use_ema, ... belong to the inner `optimizer`, where they act;
        # on the wrapper they would be silently ignored.
        if isinstance(learning_rate, int):
            learning_rate = float(learning_rate)
        super().__init__(
            learning_rate=learning_rate, loss_scale_factor=loss_scale_factor, name=name
        )
        if isinstance(optimizer, dict):
            optimizer = keras.saving.deserialize_keras_object(optimizer)
        check_template(optimizer)
        if not (isinstance(accumulation_steps, int) and accumulation_steps >= 1):
            raise UserError(
                f"optimizer.accumulation_steps must be an integer >= 1, got {accumulation_steps!r}"
            )
        if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0):
            raise UserError(f"optimizer.weight_decay must be a number >= 0, got {weight_decay!r}")
        self.groups = [*parse_param_groups(param_groups), ParamGroup(None)]
        self.l2_weight_decay = float(weight_decay)
        self.decay_pattern = decay_pattern
        self.accumulation_steps = accumulation_steps
        template = optimizer.get_config()
        inner = []
        for i, group in enumerate(self.groups):
            config = dict(
                template,
                name=f"{self.name}_group{i}",
                gradient_accumulation_steps=None,
                learning_rate=self._group_learning_rate(learning_rate, group.lr_mult),
            )
            inner.append(type(optimizer).from_config(config))
        self._hidden = _Hidden(inner, keras.saving.serialize_keras_object(optimizer))

    @staticmethod
    def _group_learning_rate(learning_rate, lr_mult: float):
        if isinstance(learning_rate, _Schedule):
            return ScaledSchedule(learning_rate, lr_mult)
        return float(ops.convert_to_numpy(learning_rate)) * lr_mult

    def group_optimizers(self) -> tuple[keras.optimizers.Optimizer, ...]:
        """The inner optimizers, one per group, the default group last.

        A method, not a property: Keras' saving walk visits properties and would store the
        inner optimizers' variables a second time.
        """
        return self._hidden.optimizers

    @property
    def iterations(self):
        """Optimizer updates (batches // accumulation_steps), what schedules count."""
        if self.accumulation_steps > 1:
            return ops.floor_divide(self._iterations, self.accumulation_steps)
        return self._iterations

    @property
    def learning_rate(self):
        """The base (backbone, lr_mult 1) learning rate at the current update."""
        return self._get_current_learning_rate()

    @learning_rate.setter
    def learning_rate(self, value):
        # Callbacks such as ReduceLROnPlateau set the base rate; the groups follow with their
        # multipliers. Setting a float on a schedule raises TypeError, as for any Keras optimizer.
        keras.optimizers.Optimizer.learning_rate.fset(self, value)
        if hasattr(self, "_hidden"):
            for group, inner in zip(self.groups, self.group_optimizers(), strict=True):
                inner.learning_rate = self._group_learning_rate(value, group.lr_mult)

    def _get_current_learning_rate(self):
        if isinstance(self._learning_rate, _Schedule):
            return self._learning_rate(self.iterations)
        return super()._get_current_learning_rate()

    @property
    def variables(self) -> list:
        variables = self._variables[:]
        for inner in self.group_optimizers():
            variables.extend(inner.variables)
        return variables

    def group_index(self, variable) -> int:
        """Index in `self.groups` of the group `variable` belongs to (first match wins)."""
        path = _path(variable)
        for i, group in enumerate(self.groups[:-1]):
            if group.matches(path):
                return i
        return len(self.groups) - 1

    def decay_coefficient(self, variable) -> float:
        """L2 coefficient applied to `variable` (0 for biases, BatchNorm and other non-kernels)."""
        if not self.l2_weight_decay or re.search(self.decay_pattern, _path(variable)) is None:
            return 0.0
        return self.l2_weight_decay * self.groups[self.group_index(variable)].wd_mult

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self._group_of = {}
        self._decay_of = {}
        members = [[] for _ in self.groups]
        for variable in var_list:
            index = self.group_index(variable)
            self._group_of[self._var_key(variable)] = index
            self._decay_of[self._var_key(variable)] = self.decay_coefficient(variable)
            members[index].append(variable)
        inners = self.group_optimizers()
        for group, inner, variables in zip(self.groups, inners, members, strict=True):
            if variables:
                inner.build(variables)
            elif group.pattern is not None:
                log.warning(
                    "optimizer.param_groups pattern %r matches no trainable variable; "
                    "check it against the model's layer names",
                    group.pattern,
                )
        self._accumulators = []
        if self.accumulation_steps > 1:
            self._accumulators = [
                self.add_variable_from_reference(v, name="accumulator") for v in var_list
            ]

    def apply(self, grads, trainable_variables=None):
        """Adds L2 decay, accumulates if asked, and lets each group's optimizer update."""
        if len(grads) == 0:
            return
        if trainable_variables is None:
            if not self.built:
                raise ValueError(
                    "Call `optimizer.build(trainable_variables)` before applying "
                    "gradients without variables."
                )
            trainable_variables = self._trainable_variables
        trainable_variables = list(trainable_variables)
        if not self.built:
            self.build(trainable_variables)
        self._check_variables_are_known(trainable_variables)
        grads = list(grads)
        if self.loss_scale_factor is not None:
            grads = [None if g is None else g / self.loss_scale_factor for g in grads]
        grads = self._add_weight_decay(grads, trainable_variables)
        if self.accumulation_steps == 1:
            self._apply_groups(grads, trainable_variables)
        else:
            self._accumulate(grads, trainable_variables)
        self._iterations.assign_add(1)

    def _add_weight_decay(self, grads, variables):
        if not self.l2_weight_decay:
            return grads
        # Keras divides the loss by the number of replicas and sums the gradients over them, so
        # each replica adds its share of the decay term.
        share = 1.0 / _num_replicas()
        out = []
        for grad, variable in zip(grads, variables, strict=True):
            coefficient = self._decay_of[self._var_key(variable)] * share
            if grad is None or not coefficient:
                out.append(grad)
            else:
                value = ops.cast(variable, grad.dtype)
                out.append(ops.add(grad, ops.multiply(ops.cast(coefficient, grad.dtype), value)))
        return out

    def _apply_groups(self, grads, variables):
        buckets = [([], []) for _ in self.groups]
        for grad, variable in zip(grads, variables, strict=True):
            if grad is not None:  # no gradient (e.g. frozen by the graph): leave it alone
                bucket = buckets[self._group_of[self._var_key(variable)]]
                bucket[0].append(grad)
                bucket[1].append(variable)
        for inner, (group_grads, group_vars) in zip(self.group_optimizers(), buckets, strict=True):
            if group_vars:
                inner.apply(group_grads, group_vars)

    def _accumulate(self, grads, variables):
        pairs = [
            (g, v, self._accumulators[self._get_variable_index(v)])
            for g, v in zip(grads, variables, strict=True)
            if g is not None
        ]
        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            if tf.distribute.has_strategy() and not tf.distribute.in_cross_replica_context():
                tf.distribute.get_replica_context().merge_call(
                    self._accumulate_cross_replica, args=(pairs,)
                )
                return
        is_update = self._is_update_step()

        for grad, _, accumulator in pairs:
            accumulator.assign_add(ops.cast(grad, accumulator.dtype))

        def update():
            self._apply_accumulated([(v, a) for _, v, a in pairs])
            for _, _, accumulator in pairs:
                accumulator.assign(ops.zeros_like(accumulator))

        ops.cond(is_update, update, lambda: None)

    def _is_update_step(self):
        # `_iterations` counts batches and is incremented after this batch is handled.
        return ops.equal((self._iterations + 1) % self.accumulation_steps, 0)

    def _accumulate_cross_replica(self, distribution, pairs):
        # Accumulators hold each replica's own (not yet all-reduced) gradient sum; the inner
        # optimizers all-reduce the averaged gradients when they apply them. The branch on
        # `is_update` must happen here, in cross-replica context: tf.distribute cannot run a
        # `cond` in replica context whose branch calls `merge_call` (every inner `apply` does).
        for grad, _, accumulator in pairs:
            distribution.extended.update(
                accumulator.value,
                lambda a, g: a.assign_add(ops.cast(g, a.dtype)),
                args=(grad,),
                group=False,
            )

        def update():
            distribution.extended.call_for_each_replica(
                self._apply_accumulated, args=([(v, a) for _, v, a in pairs],)
            )
            for _, _, accumulator in pairs:
                distribution.extended.update(
                    accumulator.value, lambda a: a.assign(ops.zeros_like(a)), group=False
                )

        ops.cond(self._is_update_step(), update, lambda: None)

    def _apply_accumulated(self, pairs):
        steps = float(self.accumulation_steps)
        self._apply_groups(
            [ops.divide(ops.convert_to_tensor(a), steps) for _, a in pairs], [v for v, _ in pairs]
        )

    def finalize_variable_values(self, var_list):
        buckets = [[] for _ in self.groups]
        for variable in var_list:
            buckets[self._group_of[self._var_key(variable)]].append(variable)
        for inner, variables in zip(self.group_optimizers(), buckets, strict=True):
            if variables:
                inner.finalize_variable_values(variables)

    def set_weights(self, weights):
        variables = self.variables
        if len(weights) != len(variables):
            raise ValueError(f"expected {len(variables)} optimizer weights, got {len(weights)}")
        for variable, weight in zip(variables, weights, strict=True):
            variable.assign(weight)

    def get_config(self) -> dict[str, Any]:
        if isinstance(self._learning_rate, _Schedule):
            learning_rate = keras.saving.serialize_keras_object(self._learning_rate)
        else:
            learning_rate = float(ops.convert_to_numpy(self._learning_rate))
        return {
            "name": self.name,
            "optimizer": self._hidden.template,
            "learning_rate": learning_rate,
            "param_groups": [g.to_dict() for g in self.groups[:-1]],
            "weight_decay": self.l2_weight_decay,
            "decay_pattern": self.decay_pattern,
            "accumulation_steps": self.accumulation_steps,
            "loss_scale_factor": self.loss_scale_factor,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any], custom_objects=None) -> ParamGroupOptimizer:
        config = dict(config)
        if isinstance(config.get("learning_rate"), dict):
            config["learning_rate"] = keras.saving.deserialize_keras_object(
                config["learning_rate"], custom_objects=custom_objects
            )
        config["optimizer"] = keras.saving.deserialize_keras_object(
            config["optimizer"], custom_objects=custom_objects
        )
        return cls(**config)


def check_template(optimizer) -> None:
    """Raises `UserError` unless `optimizer` can serve as the per-group template.

    Args:
        optimizer: The built `optimizer.inner`: a plain Keras optimizer without its own
            weight decay, gradient accumulation or global clipnorm.
    """
    if not isinstance(optimizer, keras.optimizers.Optimizer):
        raise UserError(
            f"optimizer.inner must build a keras.optimizers.Optimizer, got "
            f"{type(optimizer).__name__}"
        )
    if isinstance(optimizer, (keras.optimizers.LossScaleOptimizer, ParamGroupOptimizer)):
        raise UserError(
            "optimizer.inner must be a plain Keras optimizer such as "
            "keras.optimizers.SGD, not a wrapper"
        )
    if optimizer.weight_decay:
        raise UserError(
            "set optimizer.weight_decay (L2 on kernels only) instead of "
            "optimizer.inner.weight_decay (decoupled decay on every variable)"
        )
    if optimizer.gradient_accumulation_steps:
        raise UserError(
            "set optimizer.accumulation_steps instead of "
            "optimizer.inner.gradient_accumulation_steps"
        )
    if optimizer.global_clipnorm:
        raise UserError(
            "optimizer.inner.global_clipnorm would clip each parameter group "
            "separately; use optimizer.inner.clipnorm (per variable) instead"
        )


# --------------------------------------------------------------------------------------------
# Group table
# --------------------------------------------------------------------------------------------


def param_group_rows(
    optimizer: keras.optimizers.Optimizer, variables: Sequence
) -> list[dict[str, Any]]:
    """One row per parameter group: pattern, #variables, #parameters, lr_mult, wd_mult, #decayed.

    Works before the optimizer is built (pass `model.trainable_variables`), for a
    `ParamGroupOptimizer` also inside a `LossScaleOptimizer`, and for plain optimizers (one row).
    """
    while isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        optimizer = optimizer.inner_optimizer
    if not isinstance(optimizer, ParamGroupOptimizer):
        return [
            {
                "pattern": "(all)",
                "variables": len(variables),
                "parameters": sum(_num_params(v) for v in variables),
                "lr_mult": 1.0,
                "wd_mult": 0.0,
                "decayed": 0,
            }
        ]
    rows = [
        {
            "pattern": g.pattern or DEFAULT_GROUP_PATTERN,
            "variables": 0,
            "parameters": 0,
            "lr_mult": g.lr_mult,
            "wd_mult": g.wd_mult,
            "decayed": 0,
        }
        for g in optimizer.groups
    ]
    for variable in variables:
        row = rows[optimizer.group_index(variable)]
        row["variables"] += 1
        row["parameters"] += _num_params(variable)
        row["decayed"] += int(optimizer.decay_coefficient(variable) > 0)
    return rows


def print_param_groups(
    optimizer: keras.optimizers.Optimizer, variables: Sequence, console=None
) -> list[dict[str, Any]]:
    """Prints the parameter-group table (rich) and returns its rows."""
    from rich.console import Console
    from rich.table import Table

    rows = param_group_rows(optimizer, variables)
    inner = optimizer
    while isinstance(inner, keras.optimizers.LossScaleOptimizer):
        inner = inner.inner_optimizer
    weight_decay = getattr(inner, "l2_weight_decay", 0.0)
    table = Table(
        title=f"Parameter groups ({type(inner).__name__}, L2 weight decay {weight_decay:g})"
    )
    for column in ("pattern", "variables", "parameters", "lr_mult", "wd_mult", "decayed"):
        table.add_column(
            column, justify="left" if column == "pattern" else "right", overflow="fold"
        )
    for row in rows:
        table.add_row(
            row["pattern"],
            str(row["variables"]),
            f"{row['parameters']:,}",
            f"{row['lr_mult']:g}",
            f"{row['wd_mult']:g}",
            str(row["decayed"]),
        )
    (console or Console()).print(table)
    return rows
