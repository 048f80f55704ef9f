"""Config -> data objects: the dataset source and the pipeline options of `cfg.data`, and the
decoded split an evaluation reads.

The data layer (`seg_train.data`) takes explicit arguments; these helpers are where the
tasks turn the composed config's `data` (and `eval`) nodes into them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from seg_train.data.base import Source
from seg_train.data.options import PipelineOptions
from seg_train.data.pipeline import decoded_dataset
from seg_train.errors import UserError


def build_source(data: Mapping) -> Source:
    """Builds `data.source` and applies `data.mask_threshold` and `data.label_map` to it.

    Configs saved before these keys existed have neither: masks are then used as decoded.

    Args:
        data: The `data` node of the composed config.

    Raises:
        UserError: if `data.label_map` is not a mapping (or the source refuses its arguments).
    """
    source = instantiate(data["source"])
    label_map = data.get("label_map")
    if label_map is not None and not isinstance(label_map, Mapping):
        raise UserError(
            f"data.label_map must be a mapping such as {{255:1}}, got {label_map!r}; "
            "e.g. 'data.label_map={255:1}'"
        )
    source.set_label_map(None if label_map is None else dict(label_map), data.get("mask_threshold"))
    return source


def pipeline_options(cfg: DictConfig) -> PipelineOptions:
    """The input pipeline's settings from `cfg.data`, resolved to plain values.

    Only the keys the pipeline reads are resolved: resolving all of `cfg.data` would fail on
    an unrelated key, e.g. `data.source.root: ${data.root}` while `data.root` is `???`.
    """
    data = cfg.data
    mapping = {}
    for key in (f.name for f in fields(PipelineOptions)):
        if key in data:  # False for a `???` value, which then takes the default (or fails)
            value = data[key]
            mapping[key] = (
                OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
            )
    return PipelineOptions.from_mapping(mapping)


def evaluation_examples(cfg: DictConfig, split: str, cache: bool = False):
    """The decoded (image, mask) pairs an evaluation reads, in split order: the first
    `eval.max_images` only where set; kept in memory between passes under `cache`
    (repeated validation). Segmentation and matting evaluations read the same."""
    examples = decoded_dataset(
        build_source(cfg.data),
        split,
        cfg.data.num_parallel_calls,
        max_images=cfg.eval.max_images,
    )
    return examples.cache() if cache else examples
