"""The pipeline's settings: the `data.*` keys the input pipeline reads, as one frozen value.

The data layer never sees the config: a task turns `cfg.data` into a `PipelineOptions` once
(`seg_train.tasks.sources.pipeline_options`) and hands that down. Kept in its own module so
`augment.py`, `matting.py` and `pipeline.py` can all take it without importing each other.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from seg_train.data.readers import IGNORE_LABEL
from seg_train.errors import UserError

# data.transform: how a training example becomes a data.crop_size sample.
TRANSFORMS = ("crop", "resize")
# Jitter strengths, each 0 = off; see `augment.color_jitter`.
JITTER_KEYS = ("brightness", "contrast", "saturation", "hue")


@dataclass(frozen=True)
class PipelineOptions:
    """What the shared pipeline needs to know, named as the `data.*` keys it comes from.

    Attributes:
        batch_size: Examples per batch (`data.batch_size`).
        crop_size: (height, width) of every training / resized validation sample.
        transform: "crop" (random scale, pad, crop) or "resize" (the whole image resized).
        scale_range: (low, high) random scale factors of the crop transform.
        pad_value: Image fill where a crop overhangs: 0 or an (r, g, b) colour in 0..255.
        ignore_label: The label that crop padding writes into masks.
        hflip: Random horizontal flips.
        flip_pairs: (left, right) label pairs a flip swaps; validated by `config_checks`.
        jitter: Photometric jitter strengths by name (`JITTER_KEYS`); empty = off.
        cache: `data.cache`: True, False or "auto".
        shuffle_buffer: Records in the training shuffle buffer.
        num_parallel_calls: Parallel decodes and transforms; None = AUTOTUNE.
    """

    batch_size: int
    crop_size: tuple[int, int]
    transform: str = "crop"
    scale_range: tuple[float, float] = (1.0, 1.0)
    pad_value: float | tuple[float, ...] = 0
    ignore_label: int = IGNORE_LABEL
    hflip: bool = False
    flip_pairs: tuple[tuple[int, int], ...] = ()
    jitter: Mapping[str, float] = field(default_factory=dict)
    cache: bool | str = False
    shuffle_buffer: int = 1000
    num_parallel_calls: int | None = None

    def __post_init__(self) -> None:
        # Checked here, once, rather than while tracing each transform (as it used to be).
        if self.transform not in TRANSFORMS:
            raise UserError(
                f"config key data.transform must be one of {', '.join(TRANSFORMS)}, "
                f"got {self.transform!r}; e.g. data.transform=crop"
            )

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> PipelineOptions:
        """Builds the options from a plain mapping such as the resolved `cfg.data`.

        Keys the pipeline does not read (name, root, source, class_names, ...) are ignored;
        absent optional keys, and null `flip_pairs` / `jitter` / `pad_value`, take the
        defaults above.

        Args:
            mapping: Plain Python values (e.g. `OmegaConf.to_container(cfg.data,
                resolve=True)`), not config nodes.

        Raises:
            UserError: if `batch_size` or `crop_size` is absent, or `transform` is unknown.
        """
        for key in ("batch_size", "crop_size"):
            if mapping.get(key) is None:
                raise UserError(f"config key data.{key} is required but has no value")
        values: dict[str, Any] = {
            "batch_size": int(mapping["batch_size"]),
            "crop_size": tuple(int(v) for v in mapping["crop_size"]),
        }
        if mapping.get("transform") is not None:
            values["transform"] = str(mapping["transform"])
        if mapping.get("scale_range") is not None:
            values["scale_range"] = tuple(float(v) for v in mapping["scale_range"])
        pad = mapping.get("pad_value")
        if pad is not None:
            values["pad_value"] = pad if isinstance(pad, (int, float)) else tuple(pad)
        for key in ("ignore_label", "shuffle_buffer"):
            if mapping.get(key) is not None:
                values[key] = int(mapping[key])
        if mapping.get("hflip") is not None:
            values["hflip"] = bool(mapping["hflip"])
        values["flip_pairs"] = tuple(
            tuple(int(v) for v in pair) for pair in (mapping.get("flip_pairs") or ())
        )
        values["jitter"] = {
            key: float(value)
            for key, value in (mapping.get("jitter") or {}).items()
            if key in JITTER_KEYS
        }
        if mapping.get("cache") is not None:
            values["cache"] = mapping["cache"]
        if mapping.get("num_parallel_calls") is not None:
            values["num_parallel_calls"] = int(mapping["num_parallel_calls"])
        return cls(**values)

    @property
    def crop(self) -> list[int]:
        """`crop_size` as the [height, width] list TensorFlow's resize and shape checks take."""
        return list(self.crop_size)
