"""benchmarks/run_all.py on the tiniest settings: one measurement of each kind, then the table
and the JSON structure. Figures are not checked (speed is the scripts' business)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import run_all  # noqa: E402

pytestmark = pytest.mark.slow


def test_generated_files_are_voc_and_folder_layouts(tmp_path):
    from PIL import Image

    run_all.generate_voc_like(tmp_path, 2)
    image = Image.open(tmp_path / "voc" / "JPEGImages" / "2007_000000.jpg")
    mask = Image.open(tmp_path / "voc" / "SegmentationClass" / "2007_000000.png")
    assert image.size == (500, 375) and image.format == "JPEG"
    assert mask.mode == "P" and mask.size == (500, 375)
    assert (tmp_path / "folder" / "splits" / "train.txt").read_text().split() == [
        "2007_000000",
        "2007_000001",
    ]


def test_one_of_each_then_table(tmp_path):
    run_all.generate_voc_like(tmp_path / "data", 4)
    data = {
        "batch_size": 2,
        "crop_size": [32, 32],
        "scale_range": [1.0, 1.0],
        "hflip": False,
        "flip_pairs": [],
        "jitter": {},
        "cache": "auto",
        "shuffle_buffer": 8,
        "num_parallel_calls": 1,
        "ignore_label": 255,
    }
    results = run_all.empty_results(run_all.machine_info() | {"mode": "test"})
    for variant in run_all.INPUT_VARIANTS:
        results["input"][f"voc/{variant}"] = run_all.run_worker(
            "input",
            {
                "layout": "voc",
                "variant": variant,
                "data": data,
                "root": str(tmp_path / "data" / "voc"),
                "steps": 1,
                "warmup": 1,
                "min_seconds": 0,
            },
        )
    overrides = [
        "model=unet",
        "model.base_filters=4",
        "model.depth=2",
        *run_all.COMMON,
        "data.crop_size=[32,32]",
        "data.batch_size=1",
    ]
    for variant in ("bare", "ours"):
        results["train"][f"unet/{variant}"] = run_all.run_worker(
            "train",
            {
                "variant": variant,
                "overrides": overrides,
                "jit": False,
                "warmup": 1,
                "steps": 2,
                "min_seconds": 0,
                "max_steps": 4,
                "stall_root": str(tmp_path / "data" / "voc"),
                "stall_steps": 2,
            },
        )
    results["infer"]["unet"] = run_all.run_worker(
        "infer",
        {
            "overrides": overrides,
            "batches": [1, 2],
            "warmup": 1,
            "steps": 1,
            "min_seconds": 0,
            "tta_scales": [1.0],
        },
    )
    results["crf"]["workers=1"] = run_all.run_worker(
        "crf", {"workers": 1, "height": 30, "width": 40, "classes": 3, "images": 1}
    )

    for group in ("input", "train", "infer", "crf"):
        for key, result in results[group].items():
            assert "error" not in result, (key, result)
            assert result["peak_rss_mb"] > 0
    assert 0 <= results["train"]["unet/ours"]["data_stall"] <= 1  # a share of step time
    assert {"images_per_s", "seconds_per_step", "crop", "batch"} <= set(
        results["train"]["unet/bare"]
    )

    table = run_all.render(results)
    assert table.startswith("**Machine**: ")
    for header in ("| input pipeline", "| training", "| inference", "| dense CRF"):
        assert header in table
    assert f"| voc: {run_all.INPUT_VARIANTS['naive']} |" in table
    assert "| unet | 32x32 x 1 |" in table
    json.loads(json.dumps(results))  # what run() writes to results.json


def test_main_passes_its_flags_to_run_and_prints_the_table(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_run(quick, out):
        calls.append((quick, out))
        return run_all.empty_results(run_all.machine_info() | {"mode": "quick", "cpu": "test-cpu"})

    monkeypatch.setattr(run_all, "run", fake_run)
    run_all.main(["--quick", "--out", str(tmp_path)])
    assert calls == [(True, tmp_path)]
    printed = capsys.readouterr().out
    assert printed.startswith("**Machine**")
    assert "test-cpu" in printed


def test_fastest_keeps_the_lower_seconds_per_step_and_lists_every_run():
    first = run_all.fastest(None, {"seconds_per_step": 2.0, "run": 1})
    second = run_all.fastest(first, {"seconds_per_step": 1.5, "run": 2})
    third = run_all.fastest(second, {"error": "killed"})
    assert second["run"] == 2 and third["run"] == 2
    assert third["runs_seconds_per_step"] == [2.0, 1.5, None]
    assert run_all.fastest(first, {"seconds_per_step": 3.0, "run": 3})["run"] == 1


def test_find_library_and_the_allocator_rows():
    assert run_all.find_library(("libc.so.6",)).endswith("/libc.so.6")
    assert run_all.find_library(("libnot-a-real-allocator.so.1",)) is None
    results = {
        "machine": run_all.machine_info() | {"mode": "test"},
        "input": {},
        "train": {"unet/ours": {"seconds_per_step": 0.6}},
        "infer": {},
        "allocator": {
            "unet/tcmalloc": {"seconds_per_step": 0.4, "peak_rss_mb": 900.0},
            "unet/jemalloc": {"error": "not installed (libjemalloc.so.2)"},
        },
        "crf": {},
    }
    table = run_all.render(results)
    assert "| unet: tcmalloc | 0.400 | 1.50x | 900 |" in table
    assert "| unet: jemalloc | not installed (libjemalloc.so.2) |||" in table
