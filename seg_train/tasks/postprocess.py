"""The post-processor a run's `postprocess` config selects (`postprocess=crf` or `none`)."""

from __future__ import annotations

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from seg_train.inference.crf import CRFRunner

# A run dir saved before configs/postprocess/crf.yaml named its builder has no `_target_`;
# `mode=eval ckpt_path=RUN` adopts that run's postprocess section, so it gets this one.
CRF_TARGET = "seg_train.inference.crf.build_runner"


def crf_runner(cfg: DictConfig) -> CRFRunner | None:
    """A `CRFRunner` built from `cfg.postprocess` (its `_target_`); None for postprocess=none.

    `postprocess.name` is what metrics.json records, not an argument of the builder.
    """
    postprocess = cfg.postprocess
    if postprocess.name == "none":
        return None
    node = OmegaConf.to_container(postprocess, resolve=True)
    node.pop("name", None)
    node.setdefault("_target_", CRF_TARGET)
    return instantiate(node)
