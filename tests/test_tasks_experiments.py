"""Every experiment recipe composes, builds, and runs a few steps; debug presets work."""

from __future__ import annotations

import json

import keras
import pytest
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate

from tests.helpers import CONFIG_DIR, compose_config, run_cli

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
# Small enough for every architecture on a CPU (FCN and DeepLab need 32-pixel multiples).
TINY_INPUT = ["data.crop_size=[64,64]", "data.batch_size=2", "model.backbone_weights=null"]


def test_every_experiment_states_its_source_protocol_target_and_differences():
    for name in EXPERIMENTS:
        header = (CONFIG_DIR / "experiment" / f"{name}.yaml").read_text()
        for field in ("# Command:", "# Source:", "# Protocol:", "# Target:", "# Differs:"):
            assert field in header, f"{name}: {field}"
        assert f"experiment={name}" in header


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_instantiates(name, tmp_path, monkeypatch):
    monkeypatch.setenv("SEG_TRAIN_CACHE_DIR", str(tmp_path))
    cfg = compose_config(
        [
            f"experiment={name}",
            *TINY_INPUT,
            "data.root=/nonexistent",
            f"hydra.runtime.output_dir={tmp_path}",
        ]
    )
    HydraConfig.instance().set_config(cfg)
    model = instantiate(cfg.model, _convert_="all")
    # A matting recipe (data.task=matting) predicts one alpha channel.
    matting = cfg.data.get("task") == "matting"
    assert model.output_shape[-1] == (1 if matting else cfg.data.num_classes)
    optimizer = instantiate(cfg.optimizer, total_steps=100, steps_per_epoch=10)
    assert isinstance(optimizer, keras.optimizers.Optimizer)
    if "auto" not in str(cfg.loss):
        assert isinstance(instantiate(cfg.loss), keras.losses.Loss)


SYNTHETIC_RUN = [
    "debug=fast",
    "data=synthetic",
    *TINY_INPUT,
    "data.source.num_train=8",
    "data.source.num_val=2",
    "data.source.image_size=64",
]
# voc_deeplabv2_msc_crf trains as voc_deeplabv2_msc (its header: "Training as
# voc_deeplabv2_msc") and adds the CRF at evaluation: its sweep evaluates the msc job's model.
CRF_RECIPE, ITS_TRAINING = "voc_deeplabv2_msc_crf", "voc_deeplabv2_msc"
# Two sweeps (TensorFlow starts once in each) that a parallel test run can place side by side:
# the three ResNet-101 recipes, whose first-step tracing takes minutes on a CPU, and the rest.
RESNET101 = ["voc_deeplabv2", "voc_deeplabv2_msc"]
SWEEPS = {
    "resnet101": RESNET101,
    "others": [n for n in EXPERIMENTS if n not in (*RESNET101, CRF_RECIPE)],
}


def test_sweeps_cover_every_experiment():
    covered = {CRF_RECIPE, *(name for names in SWEEPS.values() for name in names)}
    assert covered == set(EXPERIMENTS)


def test_crf_recipe_trains_as_the_msc_recipe():
    crf = compose_config([f"experiment={CRF_RECIPE}", "data.root=/data"])
    msc = compose_config([f"experiment={ITS_TRAINING}", "data.root=/data"])
    for section in ("data", "model", "optimizer", "loss", "trainer", "eval"):
        assert crf[section] == msc[section], section
    assert crf.postprocess.name == "crf" and msc.postprocess.name == "none"


@pytest.mark.slow
@pytest.mark.parametrize("group", sorted(SWEEPS))
def test_every_experiment_runs_a_few_steps_on_synthetic(group, cache_dir, tmp_path):
    """Each recipe trains and evaluates on synthetic data; the CRF recipe evaluates too."""
    names = SWEEPS[group]
    sweep = tmp_path / "sweep"
    args = ["-m", "experiment=" + ",".join(names), *SYNTHETIC_RUN, f"hydra.sweep.dir={sweep}"]
    result = run_cli(args, cache_dir, cwd=tmp_path, timeout=1500)
    assert result.returncode == 0, result.stderr[-3000:]
    for job in range(len(names)):
        metrics = json.loads((sweep / str(job) / "metrics.json").read_text())
        assert metrics["num_images"] == 2
    if ITS_TRAINING not in names:
        return
    # The CRF recipe's evaluation (MSC, then the dense CRF) of the msc recipe's run, as its
    # header's Command line gives it: mode=eval ckpt_path=RUN_DIR postprocess=crf.
    trained = sweep / str(names.index(ITS_TRAINING))
    crf_eval = tmp_path / "crf_eval"
    args = ["mode=eval", f"ckpt_path={trained}", "postprocess=crf", f"hydra.run.dir={crf_eval}"]
    result = run_cli(args, cache_dir, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((crf_eval / "metrics.json").read_text())
    assert metrics["num_images"] == 2 and metrics["protocol"]["postprocess"] == "crf"


@pytest.mark.slow
def test_debug_overfit_reaches_its_check(cache_dir, tmp_path):
    args = [
        "debug=overfit",
        # 10 of the preset's 25 epochs: the default U-Net passes 0.9 train mIoU on its fixed
        # batch after 5 (0.935; 1.0 after 13, in a full 25-epoch run on this 2-core machine).
        "trainer.epochs=10",
        "data.source.num_train=8",
        "data.source.num_val=4",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    result = run_cli(args, cache_dir, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Overfit check PASSED" in result.stdout + result.stderr


# The tutorials resize every image whole, for training and for prediction: keras-io DeepLabV3+
# (read_image: tf.image.resize to IMAGE_SIZE 512), the TF segmentation tutorial (128x128),
# seed 003's portrait U-Net (transforms.Resize((256, 256))).
RESIZE_RECIPES = {
    "cihp_deeplabv3plus": [512, 512],
    "pets_unet_mobilenetv2": [128, 128],
    "portrait_unet": [256, 256],
}


@pytest.mark.parametrize("name", sorted(RESIZE_RECIPES))
def test_tutorial_recipes_train_and_evaluate_on_whole_resized_images(name):
    cfg = compose_config([f"experiment={name}", "data.root=/nonexistent"])
    size = RESIZE_RECIPES[name]
    assert cfg.data.transform == "resize" and list(cfg.data.crop_size) == size
    assert cfg.eval.mode == "resize" and list(cfg.eval.crop_size) == size
    assert cfg.trainer.val_protocol == "original"  # best.keras chosen on the reported number
