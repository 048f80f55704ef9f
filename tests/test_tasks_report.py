"""report.html: a self-contained page per run, checked against hand-computed numbers.

The run dirs here are built by hand (a 4x3 truth / prediction pair whose confusion matrix and
scores are worked out below), so the expected values come from arithmetic, not from our code.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf, open_dict
from PIL import Image

from seg_train.inference.metrics import ConfusionMatrix, write_metric_files
from seg_train.tasks.evaluate import WorstImages
from seg_train.tasks.report import build_report, write_report
from seg_train.viz import sample_panel
from tests.helpers import TINY_TRAIN, compose_config, run_cli

NAMES = ["background", "cat", "dog"]
PALETTE = [[0, 0, 0], [200, 0, 0], [0, 200, 0]]
IGN = 255  # ignore label
# 12 pixels: 8 background, 3 cat, 1 ignored (its prediction, dog, is not counted).
TRUTH = np.array([[0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, IGN]], np.uint8)
PRED = np.array([[0, 0, 0, 0], [0, 0, 1, 1], [0, 1, 1, 2]], np.uint8)
# By hand, rows = truth, columns = prediction:
#   background: 6 -> background, 2 -> cat;  cat: 1 -> background, 2 -> cat;  dog: nothing.
HAND_MATRIX = [[6, 2, 0], [1, 2, 0], [0, 0, 0]]
# IoU = tp / (row + column - tp): background 6 / (8 + 7 - 6) = 66.67 %, cat 2 / (3 + 4 - 2) = 40 %
# accuracy = tp / row: 6 / 8 = 75 %, 2 / 3 = 66.67 %;  Dice = 2 tp / (row + column):
# 12 / 15 = 80 %, 4 / 7 = 57.14 %;  dog is in neither: undefined ("-").
HAND_ROWS = {
    "background": ["66.67", "75.00", "80.00"],
    "cat": ["40.00", "66.67", "57.14"],
    "dog": ["-", "-", "-"],
}
HAND_MEAN = ["53.33", "70.83", "68.57"]  # the means over the defined classes


class Tables(HTMLParser):
    """Every <table> of a page as rows of cell texts, and every <img> src."""

    def __init__(self):
        super().__init__()
        self.tables, self.images, self._cell = [], [], None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = ""
        elif tag == "img":
            self.images.append(dict(attrs)["src"])

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append(self._cell.strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def parse(page: str) -> Tables:
    tables = Tables()
    tables.feed(page)
    return tables


def table_with(tables: Tables, header: list[str]) -> list[list[str]]:
    return next(t for t in tables.tables if t[0] == header)


def run_cfg(overrides=()):
    cfg = compose_config(
        [
            "data.num_classes=3",
            "data.class_names=[background,cat,dog]",
            f"data.palette={PALETTE}".replace(" ", ""),
            *overrides,
        ]
    )
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def make_run_dir(run_dir: Path, overrides=("trainer.epochs=3",)) -> Path:
    """A finished run's files as training writes them, for the hand-made images."""
    run_dir.mkdir(parents=True)
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    matrix = ConfusionMatrix(3, IGN)
    matrix.update(TRUTH, PRED)
    report = matrix.summary(NAMES)
    image = np.full((3, 4, 3), 120, np.uint8)
    worst = WorstImages(2, 3, IGN)
    worst.add(0, image, TRUTH, TRUTH)  # perfect: mIoU 100 %
    worst.add(1, image, TRUTH, PRED)  # 53.33 %
    worst.add(2, image, TRUTH, np.full_like(TRUTH, 2))  # all dog: IoU 0 everywhere
    palette = np.zeros((256, 3), np.uint8)
    palette[:3] = PALETTE
    report.update(
        num_images=3,
        split="val",
        dataset="pets",
        checkpoint=str(run_dir / "checkpoints" / "best.keras"),
        protocol={"mode": "whole"},
        eval_speed={"seconds": 2.0, "images_per_second": 1.5},
        worst_images=worst.save(run_dir, "val", palette, NAMES),
    )
    write_metric_files(report, matrix, NAMES, run_dir)
    (run_dir / "history.csv").write_text(
        "epoch,loss,mean_iou,val_mean_iou\n0,1.5,0.2,0.1\n1,1.0,0.4,0.3\n2,0.8,0.5,0.5\n"
    )
    (run_dir / "seg-train.log").write_text(
        "[x][seg_train.training.callbacks][INFO] - Epoch 1: data stall 25.0% of step time "
        "(50.0 ms of 200.0 ms per step)\n"
        "[x][seg_train.training.callbacks][INFO] - Epoch 2: data stall 10.0% of step time "
        "(10.0 ms of 100.0 ms per step)\n"
    )
    (run_dir / "devices.json").write_text(
        json.dumps({"tensorflow": "2.x", "gpus": [], "cpu_cores": 2, "cuda_version": "12"})
    )
    return run_dir


@pytest.fixture
def page(tmp_path) -> str:
    run_dir = make_run_dir(tmp_path / "run")
    path = write_report(run_dir, run_cfg(["trainer.epochs=3"]))
    assert path == run_dir / "report.html"
    return path.read_text()


def test_per_class_scores_and_confusion_matrix_are_the_hand_computed_ones(page):
    tables = parse(page)
    per_class = table_with(tables, ["id", "class", "IoU", "accuracy", "Dice"])
    assert {row[1]: row[2:] for row in per_class[1:4]} == HAND_ROWS
    assert per_class[4][1:] == ["mean", *HAND_MEAN]
    # The class colours: a swatch in each class's palette colour.
    for r, g, b in PALETTE:
        assert f"background: rgb({r}, {g}, {b})" in page
    confusion = table_with(tables, ["truth \\ prediction", *NAMES, "total"])
    assert [row[1:4] for row in confusion[1:]] == [[str(v) for v in r] for r in HAND_MATRIX]
    assert [row[4] for row in confusion[1:]] == ["8", "3", "0"]
    result = table_with(tables, ["metric", "this run (%)"])
    assert ["pixel accuracy", "72.73"] in result  # 8 of 11 counted pixels right


def test_worst_images_curves_speed_and_environment_are_embedded(page):
    tables = parse(page)
    # Curves, then the 2 worst of 3 images (the all-dog one first), nothing from the network.
    assert len(tables.images) == 3
    assert all(src.startswith("data:image/png;base64,") for src in tables.images)
    assert not re.search(r"https?://", page)
    assert "<script" not in page and "<link" not in page
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", page)
    assert [re.sub(r"<[^>]+>", "", c) for c in captions] == [
        "val image #2: mIoU 0.00% (worst/val_0002.png)",
        "val image #1: mIoU 53.33% (worst/val_0001.png)",
    ]
    speed = table_with(
        tables, ["epoch", "train img/s", "step (ms)", "input wait (ms)", "data stall (%)"]
    )
    # Global batch 16 (data.batch_size): 16 / 0.2 s = 80 img/s, 16 / 0.1 s = 160 img/s.
    assert speed[1:] == [
        ["1", "80.0", "200.0", "50.0", "25.0"],
        ["2", "160.0", "100.0", "10.0", "10.0"],
    ]
    assert "Evaluation: 1.50 img/s" in page
    assert "host (peak RSS of this process)" in page
    environment = dict(table_with(tables, ["", "version / value"])[1:])
    assert environment["devices"] == "CPU only (2 cores)" and environment["python"]
    # The config: the one value changed on the command line, against the defaults (8 epochs).
    config = table_with(tables, ["key", "defaults", "this run"])
    assert ["trainer.epochs", "8", "3"] in config


def test_the_recipe_target_stands_beside_the_result(tmp_path):
    run_dir = make_run_dir(tmp_path / "run", overrides=("experiment=voc_fcn8s",))
    page = build_report(run_dir, run_cfg(["experiment=voc_fcn8s"]))
    recipe = table_with(
        parse(page), ["recipe", "target (the source's number)", "this run: mIoU (%)"]
    )
    assert recipe[1][0] == "voc_fcn8s"
    assert recipe[1][1].startswith("65.4 mIoU on seg11valid (reference README")
    assert recipe[1][2] == "53.33"
    # Against the recipe, only what this run changed (its data section: 21 VOC classes).
    config = table_with(parse(page), ["key", "recipe voc_fcn8s", "this run"])
    assert ["data.num_classes", "21", "3"] in config
    assert not any(row[0].startswith(("model.", "optimizer.", "trainer.")) for row in config)


def test_a_users_report_html_is_never_replaced(tmp_path):
    run_dir = make_run_dir(tmp_path / "run")
    (run_dir / "report.html").write_text("<p>my notes</p>")
    assert write_report(run_dir, run_cfg()) is None
    assert (run_dir / "report.html").read_text() == "<p>my notes</p>"


def test_sample_panels_have_column_titles_and_a_legend():
    image = np.full((3, 4, 3), 255, np.uint8)  # white, so only titles and legend draw ink
    palette = np.zeros((256, 3), np.uint8)
    palette[:3] = PALETTE
    palette[255] = [224, 224, 192]
    panel = sample_panel(image, TRUTH, PRED, palette, alpha=1.0, class_names=NAMES)
    plain = sample_panel(image, TRUTH, PRED, palette, alpha=1.0)
    assert plain.shape == (3, 12, 3)
    # Enlarged to at least 128 px a column (4 px -> x32), a title strip above and legend below.
    assert panel.shape[1] == 3 * 128 and panel.shape[0] > 3 * 32
    top = panel[: (panel.shape[0] - 96) // 2]
    for column in range(3):  # a title in each column: dark text on the white strip
        assert (top[:, column * 128 : (column + 1) * 128] < 100).all(-1).any()
    legend = panel[96 + top.shape[0] :]
    colours = {tuple(c) for c in legend.reshape(-1, 3)}
    # cat (red), dog (green: predicted) and ignore are in the legend; the panels' own pixels
    # are not, so these colours come from the swatches.
    assert {(200, 0, 0), (0, 200, 0), (224, 224, 192)} <= colours


def test_chromium_renders_the_report(page, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium)")
    html_file = tmp_path / "run" / "report.html"
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",  # as root in a container
            "--disable-gpu",
            "--hide-scrollbars",
            f"--screenshot={shot}",
            "--window-size=1200,2000",
            html_file.as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )
    rendered = np.asarray(Image.open(shot).convert("L"), np.float32)
    assert rendered.shape == (2000, 1200)
    assert rendered.std() > 20  # text, tables and images, not a blank page


@pytest.mark.slow
def test_training_writes_report_html(tmp_path, cache_dir):
    run_dir = tmp_path / "train"
    result = run_cli(
        [
            *TINY_TRAIN,
            "debug=fast",
            "trainer.epochs=1",
            "eval.report_worst=3",
            f"hydra.run.dir={run_dir}",
        ],
        cache_dir,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    page = (run_dir / "report.html").read_text()
    tables = parse(page)
    # Training curves and the 3 worst of the 8 val images, as written to worst/.
    assert len(tables.images) == 1 + 3 and len(list((run_dir / "worst").glob("*.png"))) == 3
    per_class = table_with(tables, ["id", "class", "IoU", "accuracy", "Dice"])
    assert [row[1] for row in per_class[1:5]] == ["background", "disc", "square", "triangle"]
    assert not re.search(r"https?://", page)
    assert ["eval.report_worst", "4", "3"] in table_with(tables, ["key", "defaults", "this run"])
    assert OmegaConf.load(run_dir / ".hydra" / "config.yaml").eval.report_worst == 3
