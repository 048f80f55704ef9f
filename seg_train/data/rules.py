"""Config rules for the data keys (entries of `seg_train.config_checks.RULES`).

Each rule takes (key, value) and raises `UserError` naming the key and a valid example. This
module must stay free of TensorFlow: the CLI checks the config before TensorFlow is imported.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from omegaconf import OmegaConf

from seg_train.errors import UserError

Rule = Callable[[str, Any], None]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def one_of(*choices: str) -> Rule:
    """A rule accepting exactly one of `choices`."""

    def rule(key: str, value: Any) -> None:
        if value not in choices:
            raise UserError(
                f"config key {key} must be one of {', '.join(choices)}, got "
                f"{value!r}; e.g. {key}={choices[0]}"
            )

    return rule


def fraction(upper: float) -> Rule:
    """A rule accepting numbers in [0, upper] (jitter strengths)."""

    def rule(key: str, value: Any) -> None:
        if not (_is_number(value) and 0 <= value <= upper):
            raise UserError(
                f"config key {key} must be a number in 0..{upper} (0 = off), got "
                f"{value!r}; e.g. {key}=0.1"
            )

    return rule


def matte_threshold(key: str, value: Any) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 254):
        raise UserError(
            f"config key {key} must be an alpha value in 0..254 (pixels above it are "
            f"person), got {value!r}; e.g. {key}=127"
        )


def flip_pairs(key: str, value: Any) -> None:
    ok = OmegaConf.is_list(value) and all(
        OmegaConf.is_list(pair)
        and len(pair) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 255 for v in pair)
        and pair[0] != pair[1]
        for pair in value
    )
    if ok:
        labels = [v for pair in value for v in pair]
        ok = len(labels) == len(set(labels))
    if not ok:
        raise UserError(
            f"config key {key} must list [left, right] class-id pairs that swap on a "
            f"horizontal flip, each id once, got {value!r}; e.g. "
            f"'{key}=[[14,15],[16,17]]' or '{key}=[]'"
        )


def decoder_node(key: str, value: Any) -> None:
    if not (OmegaConf.is_dict(value) and "_target_" in value):
        hint = ""
        if value in ("raw", "tfds"):
            hint = f" (for Oxford-IIIT Pet use data.format={value})"
        raise UserError(
            f"config key {key} must be the dataset decoder (a node with _target_), "
            f"got {value!r}{hint}; pick a dataset with data=NAME instead"
        )


def split_names(key: str, value: Any) -> None:
    ok = value is None or (
        OmegaConf.is_list(value) and len(value) > 0 and all(isinstance(v, str) and v for v in value)
    )
    if not ok:
        raise UserError(
            f"config key {key} must be null (every split) or a list of split names, "
            f"got {value!r}; e.g. '{key}=[train,val]'"
        )


def split_specs(key: str, value: Any) -> None:
    ok = (
        OmegaConf.is_dict(value)
        and len(value) > 0
        and all(isinstance(v, str) and v for v in value.values())
    )
    if not ok or "train" not in value or "val" not in value:
        raise UserError(
            f"config key {key} must map split names (at least train and val) to "
            f"their source, got {value!r}; e.g. {key}.val=test"
        )
