"""Configs compose, every `_target_` is real, and bad values are rejected with the key named."""

import functools
import subprocess
import sys
from pathlib import Path

import keras
import pytest
import yaml
from hydra.utils import get_object, instantiate
from omegaconf import OmegaConf

from seg_train.config_checks import check_config
from seg_train.errors import UserError
from tests.helpers import CONFIG_DIR, REPO, compose_config

GROUPS = sorted(
    p.name for p in CONFIG_DIR.iterdir() if p.is_dir() and p.name not in ("hydra", "local")
)
# `_*.yaml` files are blocks other options include (data/_pipeline.yaml), not options.
OPTIONS = [
    (g, p.stem)
    for g in GROUPS
    for p in sorted((CONFIG_DIR / g).glob("*.yaml"))
    if not p.stem.startswith("_")
]


def _targets(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "_target_":
                yield value
            else:
                yield from _targets(value)
    elif isinstance(node, list):
        for value in node:
            yield from _targets(value)


def test_root_config_has_one_group_per_component():
    expected = {
        "mode",
        "data",
        "model",
        "loss",
        "optimizer",
        "trainer",
        "callbacks",
        "hardware",
        "paths",
        "experiment",
        "debug",
    }
    assert expected <= set(GROUPS) | {"hydra"}
    cfg = compose_config()
    assert cfg.mode.name == "train" and cfg.data.name == "synthetic"
    assert cfg.model._target_ == "seg_train.models.unet.build_unet"


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes(group, option):
    overrides = [f"{group}={option}"]
    if group == "data" and option == "folder":
        overrides += ["data.root=/tmp/x", "data.num_classes=2", "data.class_names=[a,b]"]
    cfg = compose_config(overrides)
    # Every key the option's own file sets (read with PyYAML, not through Hydra) is in the
    # composed group.
    written = yaml.safe_load((CONFIG_DIR / group / f"{option}.yaml").read_text()) or {}
    if "@package _global_" not in (CONFIG_DIR / group / f"{option}.yaml").read_text():
        section = cfg[group.split("/")[0]]
        for key in written:
            if key != "defaults":
                # keys(): `in` on a DictConfig is False for a mandatory "???" value.
                assert key in section.keys(), f"{group}={option}: {key}"  # noqa: SIM118


def test_every_target_is_a_real_import_path():
    targets = set()
    for path in CONFIG_DIR.rglob("*.yaml"):
        targets |= set(_targets(yaml.safe_load(path.read_text()) or {}))
    assert "seg_train.models.unet.build_unet" in targets
    for target in sorted(targets):
        assert callable(get_object(target)), target


def test_stable_keys_exist():
    cfg = compose_config(["mode=infer"])
    for key in [
        "mode",
        "ckpt_path",
        "seed",
        "data.root",
        "data.num_classes",
        "data.class_names",
        "data.batch_size",
        "data.crop_size",
        "data.ignore_label",
        "model.backbone_weights",
        "optimizer.learning_rate",
        "trainer.epochs",
        "trainer.steps_per_epoch",
        "infer.input",
        "infer.output_dir",
        "infer.overwrite",
        "hardware.devices",
    ]:
        assert OmegaConf.select(cfg, key, default="<absent>") != "<absent>", key


def test_default_components_instantiate(tmp_path, monkeypatch):
    monkeypatch.setenv("SEG_TRAIN_CACHE_DIR", str(tmp_path))
    cfg = compose_config(
        [
            "data.source.num_train=2",
            "data.source.num_val=1",
            "data.source.image_size=32",
            "data.crop_size=[32,32]",
            "model.base_filters=2",
            "model.depth=2",
            f"hydra.runtime.output_dir={tmp_path / 'run'}",
        ]
    )
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().set_config(cfg)
    model = instantiate(cfg.model, _convert_="all")
    assert model.output_shape == (None, 32, 32, 4)
    assert isinstance(instantiate(cfg.loss), keras.losses.Loss)
    assert isinstance(instantiate(cfg.optimizer), keras.optimizers.Optimizer)
    assert len(instantiate(cfg.data.source).examples("train")) == 2
    import numpy as np

    for name, node in cfg.callbacks.items():
        callback = instantiate(node)
        if isinstance(callback, functools.partial):
            callback = callback(
                val_images=np.zeros((1, 32, 32, 3)),
                val_masks=np.zeros((1, 32, 32), np.uint8),
                palette=np.zeros((256, 3), np.uint8),
            )
        assert hasattr(callback, "on_epoch_end"), name


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("data.batch_size=abc", "data.batch_size"),
        ("data.batch_size=0", "data.batch_size"),
        ("trainer.epochs=1.5", "trainer.epochs"),
        ("optimizer.learning_rate=-1", "optimizer.learning_rate"),
        ("data.crop_size=[128]", "data.crop_size"),
        ("hardware.devices=gpu0", "hardware.devices"),
        ("data.num_classes=5", "data.class_names"),
        ("infer.overwrite=maybe", "infer.overwrite"),
        ("eval.max_images=0", "eval.max_images"),
    ],
)
def test_bad_values_name_their_key(override, key):
    # A mode's own block (infer.*, export.*, ...) is in the config of that mode only.
    mode = ["mode=infer"] if override.startswith("infer.") else []
    cfg = compose_config([*mode, override])
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        check_config(cfg)


def test_eval_and_infer_need_a_checkpoint():
    with pytest.raises(UserError, match="ckpt_path"):
        check_config(compose_config(["mode=eval"]))
    with pytest.raises(UserError, match="does not exist"):
        check_config(compose_config(["mode=eval", "ckpt_path=/no/such/run"]))
    with pytest.raises(UserError, match="infer.input"):
        check_config(compose_config(["mode=infer", f"ckpt_path={REPO}"]))


def test_cli_module_does_not_import_tensorflow():
    code = "import sys, seg_train.cli; sys.exit('tensorflow' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_help_lists_groups_without_tensorflow():
    result = subprocess.run(
        [sys.executable, "-m", "seg_train", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    groups = dict(
        line.split(": ", 1) for line in result.stdout.splitlines() if line.count(": ") == 1
    )
    assert {"eval", "infer", "train"} <= set(groups["mode"].split(", "))
    assert "unet" in groups["model"] and "synthetic" in groups["data"]
    for group in ("optimizer", "loss", "hardware", "trainer", "callbacks", "debug", "experiment"):
        assert groups[group], group
    assert "tensorflow" not in result.stderr.lower()


def test_readme_commands_match_scripts():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    assert "bash scripts/quickstart.sh" in readme and "bash scripts/test.sh" in readme
    assert "scripts/test.sh" in ci
    assert Path(REPO / "scripts" / "test.sh").is_file()
