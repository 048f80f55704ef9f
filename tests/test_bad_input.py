"""Bad input through the real CLI: one clear line naming the culprit, exit 2, nothing lost."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.helpers import error_lines, run_cli


def write_folder_root(root, with_masks=True):
    for sub in ("images", "masks", "splits"):
        (root / sub).mkdir(parents=True)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "images" / "a.jpg")
    if with_masks:
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(root / "masks" / "a.png")
    for split in ("train", "val"):
        (root / "splits" / f"{split}.txt").write_text("a\n")
    return root


FOLDER = ["data=folder", "data.num_classes=2", "data.class_names=[bg,fg]", "debug=fast"]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["trainer.epoch=3"], ["unknown config key 'trainer.epoch'", "epochs"]),
        (["data.batch_size=abc"], ["data.batch_size", "positive integer"]),
        (["model=nosuchmodel"], ["model", "nosuchmodel", "unet"]),
        (["mode=eval"], ["ckpt_path"]),
        (["mode=infer"], ["ckpt_path"]),
        (["mode=eval", "ckpt_path=/no/such/run"], ["/no/such/run", "does not exist"]),
        (["data=folder"], ["data.root"]),
        ([*FOLDER, "data.root=/no/such/dataset"], ["/no/such/dataset", "data.root"]),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) and "=" in "".join(v) else None,
)
def test_config_and_path_errors(args, expected, cache_dir, tmp_path):
    result = run_cli([*args, f"hydra.run.dir={tmp_path / 'run'}"], cache_dir, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = error_lines(result)
    assert len(lines) == 1, lines
    assert lines[0].startswith("seg-train: error: ")
    for fragment in expected:
        assert fragment in lines[0]
    assert "Traceback" not in result.stderr


def test_folder_images_without_masks(cache_dir, tmp_path):
    root = write_folder_root(tmp_path / "data", with_masks=False)
    result = run_cli(
        [*FOLDER, f"data.root={root}", f"hydra.run.dir={tmp_path / 'run'}"], cache_dir, cwd=tmp_path
    )
    assert result.returncode == 2
    (line,) = error_lines(result)
    assert "no mask" in line and "a.png" in line and str(root / "masks") in line


def test_infer_input_matching_nothing(cache_dir, tmp_path):
    fake_run = tmp_path / "model.keras"
    fake_run.write_bytes(b"not really a model")
    result = run_cli(
        [
            "mode=infer",
            f"ckpt_path={fake_run}",
            f"infer.input={tmp_path}/*.jpg",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cache_dir,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    (line,) = error_lines(result)
    assert "matches no image" in line and "infer.input" in line


def test_full_traceback_on_request(cache_dir, tmp_path):
    result = run_cli(
        ["data.batch_size=abc", f"hydra.run.dir={tmp_path / 'run'}"],
        cache_dir,
        cwd=tmp_path,
        env={"HYDRA_FULL_ERROR": "1"},
    )
    assert result.returncode != 0 and "Traceback" in result.stderr
