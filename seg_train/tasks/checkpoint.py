"""Finding and loading checkpoints, and reusing a training run's data/model config.

`open_checkpoint` is the prologue that mode=eval, mode=infer and mode=export share.
"""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from seg_train.config_checks import check_config, is_matting_data
from seg_train.errors import UserError

log = logging.getLogger(__name__)

BEST_CHECKPOINT = Path("checkpoints") / "best.keras"
SAVED_CONFIG = Path(".hydra") / "config.yaml"
# Sections taken from the training run when evaluating or predicting with its checkpoint: its
# data and model, and how it was evaluated (eval.mode=resize for the resize-trained recipes,
# TTA, CRF), so `mode=eval ckpt_path=RUN` reproduces the run's report unless told otherwise.
RUN_SECTIONS = ("data", "model", "eval", "postprocess")
# Sections that config.yaml defines once (not a choice among option files): a run written
# before one of their keys existed lacks it, and the key keeps today's default.
_ONE_SCHEMA_SECTIONS = ("eval",)


def resolve_checkpoint(ckpt_path: str) -> tuple[Path, Path | None]:
    """Returns (the .keras file, the training run dir or None) for a run dir or a .keras file."""
    path = Path(ckpt_path).expanduser()
    if path.is_dir():
        checkpoint = path / BEST_CHECKPOINT
        if not checkpoint.is_file():
            raise UserError(
                f"ckpt_path {path} is a directory without {BEST_CHECKPOINT}; pass a "
                "training run dir or a .keras file"
            )
        return checkpoint, path if (path / SAVED_CONFIG).is_file() else None
    if path.suffix != ".keras":
        raise UserError(f"ckpt_path {path} is not a .keras file or a run dir")
    # A run's own checkpoints/best.keras still finds its run dir.
    run_dir = path.parent.parent
    return path, run_dir if (run_dir / SAVED_CONFIG).is_file() else None


def _overridden(section: str) -> tuple[bool, list[str]]:
    """(whether the command line chose another `section` option, its `section.*` overrides)."""
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    keys = [o.lstrip("+~") for o in overrides]
    replaced = any(k.split("=", 1)[0] in (section, f"{section}@{section}") for k in keys)
    values = [k for k in keys if k.startswith(f"{section}.")]
    return replaced, values


def adopt_run_config(cfg: DictConfig, run_dir: Path | None) -> None:
    """Replaces cfg.data / model / eval / postprocess by the training run's, except where the
    command line set them.

    A `data=...` (or `postprocess=...`) choice keeps this command's section whole;
    `data.key=value` overrides are re-applied on top of the run's section.
    """
    if run_dir is None:
        return
    saved = OmegaConf.load(run_dir / SAVED_CONFIG)
    for section in RUN_SECTIONS:
        replaced, values = _overridden(section)
        if replaced or section not in saved:
            continue
        defaults = (
            [OmegaConf.create(OmegaConf.to_container(cfg[section]))]  # unresolved, not struct
            if section in _ONE_SCHEMA_SECTIONS
            else []
        )
        merged = OmegaConf.merge(
            *defaults,
            saved[section],
            OmegaConf.from_dotlist([v.split(".", 1)[1] for v in values]),
        )
        with open_dict(cfg):
            cfg[section] = merged
        log.info(
            "Using %s config of run %s%s",
            section,
            run_dir,
            f" with overrides {values}" if values else "",
        )


def load_model(checkpoint: Path, num_classes: int):
    """Loads a .keras model in safe mode (no arbitrary code) and checks its class count."""
    import keras

    import seg_train.models  # noqa: F401

    # Register our custom layers, losses and optimizers for deserialisation.
    import seg_train.training.losses  # noqa: F401
    import seg_train.training.optim  # noqa: F401

    try:
        model = keras.saving.load_model(checkpoint, compile=False, safe_mode=True)
    except Exception as exc:  # noqa: BLE001 - any failure here means the file is unusable
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load checkpoint {checkpoint}: {first_line}") from exc
    classes = model.output_shape[-1]
    if classes != num_classes:
        raise UserError(
            f"checkpoint {checkpoint} predicts {classes} classes but "
            f"data.num_classes is {num_classes}; use the matching data config"
        )
    log.info("Loaded %s (%s parameters)", checkpoint, f"{model.count_params():,}")
    return model


def output_channels(cfg: DictConfig) -> int:
    """The channels a checkpoint of this config predicts: classes, or the one alpha."""
    return 1 if is_matting_data(cfg.data) else cfg.data.num_classes


def open_checkpoint(cfg: DictConfig) -> Path:
    """Finds `cfg.ckpt_path` and takes over its training run's config; returns the .keras file.

    The training run's data / model / eval / postprocess sections replace this command's (except
    where the command line set them), so the merged config is checked again here: the CLI
    checked only the composed one.
    """
    checkpoint, run_dir = resolve_checkpoint(cfg.ckpt_path)
    if run_dir is not None:
        adopt_run_config(cfg, run_dir)
        check_config(cfg)
    return checkpoint
