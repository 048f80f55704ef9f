"""benchmarks/run_all.py on the tiniest settings: one measurement of each kind, then the table
and the JSON structure. Figures are not checked (speed is the scripts' business)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import run_all  # noqa: E402
from seg_train.config_checks import check_config  # noqa: E402
from tests.helpers import compose_config  # noqa: E402

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
    # The portrait layout: NNNNN.png + NNNNN_matte.png (one 0..255 channel) in both splits.
    for split in ("training", "testing"):
        portrait = Image.open(tmp_path / "portrait" / split / "00002.png")
        matte = Image.open(tmp_path / "portrait" / split / "00002_matte.png")
        assert portrait.size == matte.size == (500, 375) and matte.mode == "L"


def test_one_of_each_then_table(tmp_path, monkeypatch):
    run_all.generate_voc_like(tmp_path / "data", 4)
    scratch = tmp_path / "scratch"  # the workers' temporary files go here
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
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
    # Inference: test_infer_fields_and_ratios.
    results["crf"]["workers=1"] = run_all.run_worker(
        "crf", {"workers": 1, "height": 30, "width": 40, "classes": 3, "images": 1}
    )

    for group in ("input", "train", "infer", "crf"):
        for key, result in results[group].items():
            assert "error" not in result, (key, result)
            assert result["peak_rss_mb"] > 0
    assert 0 <= results["train"]["unet/ours"]["data_stall"] <= 1  # a share of step time
    assert not list(scratch.glob("seg-bench-*"))  # each worker removed its scratch dir
    assert {"images_per_s", "seconds_per_step", "crop", "batch"} <= set(
        results["train"]["unet/bare"]
    )

    table = run_all.render(results)
    assert table.startswith("**Machine**: ")
    for header in ("| input pipeline", "| training", "| inference", "| dense CRF"):
        assert header in table
    assert f"| voc: {run_all.INPUT_VARIANTS['naive']} |" in table
    # The per-core column: images/s over the machine's cores, computed here.
    row = next(ln for ln in table.splitlines() if ln.startswith("| voc: decode-only"))
    per_core = results["input"]["voc/decode_only"]["images_per_s"] / results["machine"]["cores"]
    assert row.split(" | ")[2] == run_all._fmt(per_core)
    assert "| unet | 32x32 x 1 |" in table
    json.loads(json.dumps(results))  # what run() writes to results.json


def test_infer_fields_and_ratios():
    """The inference worker on a tiny U-Net: every img/s field present and positive, the
    ratios over bare model.predict recomputed from the two entries, the table's columns."""
    spec = {
        "name": "unet",
        "variant": "infer",
        "overrides": [
            "model=unet",
            "model.base_filters=4",
            "model.depth=2",
            *run_all.COMMON,
            "data.crop_size=[32,32]",
        ],
        "images": 2,
        "warmup": 1,
        "steps": 1,
        "min_seconds": 0,
        "tta_scales": [0.75, 1.0],
    }
    result = run_all.with_infer_ratios(run_all.run_worker("infer", spec))
    assert "error" not in result, result
    # 1.5x the crop rounded to a multiple of eval.size_divisor (32): 3x3 slide windows.
    assert result["crop"] == [32, 32] and result["large"] == [64, 64] and result["images"] == 2
    assert "bare_predict_large_note" not in result  # the U-Net is fully convolutional
    fields = (
        "bare_predict",
        "predictor",
        "predictor_tta",
        "bare_predict_large",
        "predictor_slide",
        "savedmodel",
        "peak_rss_mb",
    )
    for field in fields:
        assert isinstance(result[field], float) and result[field] > 0, field
    assert result["predictor_vs_bare"] == pytest.approx(
        result["predictor"] / result["bare_predict"]
    )
    assert result["savedmodel_vs_bare"] == pytest.approx(
        result["savedmodel"] / result["bare_predict"]
    )

    results = run_all.empty_results(run_all.machine_info() | {"mode": "test"})
    results["infer"]["unet"] = result
    table = run_all.render(results)
    header = next(line for line in table.splitlines() if line.startswith("| inference"))
    for column in (
        "| crop |",
        "| bare model.predict |",
        "(mode=infer path)",
        "| ours / bare (target ≥ 0.95) |",
        "| ours + TTA",
        "| bare model.predict, large |",
        "| ours slide (crop windows), large |",
        "| SavedModel (mode=export) |",
        "| SavedModel / bare |",
        "| peak RSS MB |",
    ):
        assert column in header, column
    row = next(line for line in table.splitlines() if line.startswith("| unet |"))
    assert row.startswith("| unet | 32x32 | ")
    assert f"| {result['predictor_vs_bare']:.2f}x |" in row and "| 64x64 |" in row
    assert len(row.split("|")) == len(header.split("|"))
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


def test_sources_section_fields_and_ratio(tmp_path):
    """The source's own loop and ours on one tiny pair, alternated once, then the matmul: every
    field of the "sources" section, the ratio recomputed from the two entries."""
    pairs = {
        "unet_mobilenetv2 vs TF tutorial": (
            "tf_tutorial",
            ["experiment=pets_unet_mobilenetv2"],
            ["data.crop_size=[32,32]", "data.batch_size=1"],
        )
    }
    section, matmul = run_all.run_sources(True, 0, pairs=pairs, repeats=1, ablation=("metrics",))
    assert "error" not in matmul, matmul
    assert matmul["n"] == 2048 and matmul["gflops_per_s"] > 0
    pair = section["unet_mobilenetv2 vs TF tutorial"]
    source, ours = pair["source"], pair["ours"]
    for entry in (source, ours):
        assert "error" not in entry, entry
        assert entry["crop"] == [32, 32] and entry["batch"] == 1
        assert isinstance(entry["images_per_s"], float) and entry["images_per_s"] > 0
        assert isinstance(entry["train_gflops_per_image"], float)
        assert entry["train_gflops_per_image"] > 0
        assert entry["gflops_per_s"] == pytest.approx(
            entry["train_gflops_per_image"] * entry["images_per_s"]
        )
    assert source["source"] == "tf_tutorial"
    # The same network on both sides: the same parameters and (nearly) the same graph count.
    assert source["params"] == ours["params"] == 6_504_227
    assert ours["train_gflops_per_image"] == pytest.approx(
        source["train_gflops_per_image"], rel=0.05
    )
    # Independent recomputation: batch / median s/step of each side.
    expected = (ours["batch"] / ours["seconds_per_step"]) / (
        source["batch"] / source["seconds_per_step"]
    )
    assert isinstance(pair["ratio"], float)
    assert pair["ratio"] == pytest.approx(expected)
    assert pair["holds"] is (expected >= 1.0)
    assert pair["train_gflops_per_image"] == ours["train_gflops_per_image"]
    assert pair["gflops_per_s"] == ours["gflops_per_s"]
    assert pair["share_of_matmul"] == pytest.approx(ours["gflops_per_s"] / matmul["gflops_per_s"])
    # The ablation: ours without its mean IoU metric, its speed-up over ours recomputed.
    (piece,) = pair["ablation"]
    without = pair["ablation"][piece]
    assert piece == "metrics" and without["images_per_s"] > 0
    assert without["speedup"] == pytest.approx(without["images_per_s"] / ours["images_per_s"])

    results = run_all.empty_results(run_all.machine_info() | {"mode": "test"})
    results["sources"], results["matmul"] = section, matmul
    table = run_all.render(results)
    assert "| seg-train / source" in table
    assert "| unet_mobilenetv2 vs TF tutorial | 32x32 x 1 |" in table
    json.loads(json.dumps(results))


def test_source_pair_with_an_error_has_no_ratio():
    pair = run_all.source_pair({"error": "killed"}, {"images_per_s": 2.0, "gflops_per_s": 3.0}, 6.0)
    assert pair["ratio"] is None and pair["holds"] is None
    assert pair["share_of_matmul"] == 0.5
    pair = run_all.source_pair({"images_per_s": 4.0}, {"images_per_s": 3.0}, None)
    assert pair["ratio"] == 0.75 and pair["holds"] is False and pair["share_of_matmul"] is None


def test_baselines_have_the_sources_parameter_counts():
    """keras-io's DeepLabV3+ prints 11,857,236 parameters (11,824,500 trainable) for 20 classes
    at 512. The seed's edition of the TF tutorial prints no summary; its frozen split follows
    from the text: MobileNetV2 up to block_16_project (alpha 1.0) is frozen, so the trainable
    weights are the four pix2pix upsample blocks (Conv2DTranspose without bias, BatchNorm
    gamma/beta) and the last Conv2DTranspose (kernel and bias), computed below; the total
    6,504,227 is the tutorial's English edition's model.summary (and the recipe's comment)."""
    import numpy as np

    from benchmarks import baselines

    def trainable(model):
        return sum(int(np.prod(w.shape)) for w in model.trainable_weights)

    deeplab = baselines.build_keras_io_deeplabv3plus(num_classes=20, size=512)
    assert deeplab.count_params() == 11_857_236
    assert trainable(deeplab) == 11_824_500

    unet = baselines.build_tf_tutorial_unet(num_classes=3, size=128)
    # Input channels of each upsample: block_16_project (320), then upsample + skip concat:
    # 512 + 576 (block_13_expand_relu), 256 + 192 (block_6), 128 + 144 (block_3).
    decoder = sum(
        3 * 3 * c_in * c_out + 2 * c_out
        for c_in, c_out in ((320, 512), (1088, 256), (448, 128), (272, 64))
    )
    # The last layer reads 64 + 96 (block_1_expand_relu) channels.
    last = 3 * 3 * 160 * 3 + 3
    assert trainable(unet) == decoder + last == 4_660_323
    assert unet.count_params() == 6_504_227
    assert unet.output_shape == (None, 128, 128, 3)
    encoder = unet.layers[1]
    assert not encoder.trainable and [o.shape[1] for o in encoder.outputs] == [64, 32, 16, 8, 4]

    import keras

    for model, source in ((unet, "tf_tutorial"), (deeplab, "keras_io")):
        baselines.compile_like_source(model, source)
        assert isinstance(model.loss, keras.losses.SparseCategoricalCrossentropy)
        assert model.loss.get_config()["from_logits"] is True
        assert isinstance(model.optimizer, keras.optimizers.Adam)
        assert float(model.optimizer.learning_rate) == pytest.approx(0.001)
    with pytest.raises(ValueError):
        baselines.compile_like_source(unet, "nowhere")


def test_train_gflops_counts_each_convolution_three_times():
    """Forward, input gradient and kernel gradient of each convolution, 2 FLOP per
    multiply-add, plus a little element-wise loss arithmetic."""
    import keras

    from benchmarks import worker

    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(inputs)
    x = keras.layers.Conv2D(3, 1, use_bias=False)(x)
    forward = 2 * 16 * 16 * (3 * 3 * 3 * 8 + 8 * 3)
    gflops = worker.train_gflops_per_image(keras.Model(inputs, x), [16, 16])
    assert 3 * forward <= gflops * 1e9 <= 1.05 * 3 * forward


def test_memory_section_fields_and_ratio(tmp_path, monkeypatch):
    # One tiny recipe on the generated portrait files: a real debug=fast run and a bare fit.
    run_all.generate_voc_like(tmp_path, 2)
    tiny = ["model.base_filters=4", "model.depth=2", "data.crop_size=[32,32]"]
    monkeypatch.setattr(run_all, "MEMORY_RECIPES", {"portrait_unet": ("portrait", tiny, [])})
    monkeypatch.setattr(run_all, "QUICK", ["data.batch_size=2"])
    section = run_all.run_memory(quick=True, data_root=tmp_path)
    row = section["portrait_unet"]
    assert row["job"]["exit_code"] == 0, row["job"].get("output_tail")
    assert (row["crop"], row["batch"]) == ([32, 32], 2)
    job_mb, bare_mb = row["job"]["peak_rss_mb"], row["bare"]["peak_rss_mb"]
    assert job_mb > 100 and bare_mb > 100  # a TensorFlow process is never smaller
    assert row["ratio"] == pytest.approx(job_mb / bare_mb)
    assert row["holds"] == (job_mb / bare_mb <= 2)
    results = run_all.empty_results(run_all.machine_info() | {"mode": "test"})
    results["memory"] = section
    table = run_all.render(results)
    assert "| peak host memory: `seg-train experiment=R debug=fast`" in table
    line = next(ln for ln in table.splitlines() if ln.startswith("| portrait_unet |"))
    assert "| 32x32 x 2 |" in line and f"{job_mb / bare_mb:.2f}x" in line


def test_memory_overrides_keep_the_recipe_and_cap_only_the_default_run(tmp_path):
    quick = run_all.memory_overrides("voc_deeplabv2", True, tmp_path)
    default = run_all.memory_overrides("voc_deeplabv2", False, tmp_path)
    for overrides in (quick, default):
        assert overrides[0] == "experiment=voc_deeplabv2"
        assert "data=voc" in overrides and f"data.root={tmp_path / 'voc'}" in overrides
        assert "model.freeze_bn=false" in overrides
        # The generated VOC files have no SBD lists or SegmentationClassAug masks.
        assert {"data.aug=false", "data.train_list=null"} <= set(overrides)
    assert "data.batch_size=2" in default and "data.crop_size=[64,64]" in quick
    assert not any(
        o.startswith("data.root")
        for o in run_all.memory_overrides("synthetic_unet_classic", True, tmp_path)
    )


@pytest.mark.parametrize("quick", [True, False])
def test_every_memory_recipe_composes_to_a_complete_config(tmp_path, quick):
    # The memory section runs each recipe on generated files in another layout (data=folder
    # for the pets recipe): its overrides must fill every value that layout requires, or the
    # row is an error line instead of a measurement (a full --quick run found pets' missing
    # data.class_names).
    for recipe in run_all.MEMORY_RECIPES:
        overrides = run_all.memory_overrides(recipe, quick, tmp_path) + ["debug=fast"]
        check_config(compose_config(overrides))  # the CLI's first check: one line on a ???


def test_gpu_check_prints_the_pipeline_per_core_beside_each_gpu_row(tmp_path, monkeypatch):
    from benchmarks import gpu_check

    monkeypatch.setattr(gpu_check, "MODELS", {"unet": ["model=unet", "data.crop_size=[32,32]"]})
    pipeline = gpu_check.pipeline_rows(quick=True, out=tmp_path)
    row = pipeline["unet"]
    assert "error" not in row, row
    import os

    assert row["images_per_s_per_core"] == pytest.approx(row["images_per_s"] / os.cpu_count())
    train = {"unet/float32": {"crop": [32, 32], "batch": 2, "images_per_s": 500.0}}
    results = {
        "machine": {
            "gpu_models": ["X"],
            "tensorflow": "2",
            "cuda_version": "12",
            "cudnn_version": "9",
            "mode": "quick",
        },
        "train": train,
        "pipeline": pipeline,
        "cli": {},
    }
    table = gpu_check.render(results)
    assert "CPU cores to feed the GPU" in table
    line = next(ln for ln in table.splitlines() if ln.startswith("| unet |"))
    assert line.split(" | ")[-1].rstrip(" |") == run_all._fmt(500.0 / row["images_per_s_per_core"])


def test_precision_section_fields_and_ratio(monkeypatch):
    """float32 and mixed_bfloat16 on one tiny U-Net (alternated once) and a 1-epoch training in
    both: every field of the "precision" section, the ratio recomputed from its two entries,
    the val mIoU difference, the tables."""
    tiny = [
        "model=unet",
        "model.base_filters=4",
        "model.depth=2",
        "data.crop_size=[32,32]",
        "data.batch_size=2",
    ]
    monkeypatch.setattr(run_all, "PRECISION_MODELS", {"unet (tiny)": (tiny, [])})
    monkeypatch.setattr(run_all, "QUICK", [])
    accuracy = tiny + ["seed=0", "trainer.epochs=1", "trainer.steps_per_epoch=4", "debug=fast"]
    section = run_all.run_precision(quick=True, min_seconds=0, repeats=1, accuracy=accuracy)

    row = section["speed"]["unet (tiny)"]
    float32, bfloat16 = row["float32"], row["mixed_bfloat16"]
    for entry, precision in ((float32, "float32"), (bfloat16, "mixed_bfloat16")):
        assert "error" not in entry, entry
        assert entry["precision"] == precision
        assert entry["crop"] == [32, 32] and entry["batch"] == 2
        assert isinstance(entry["images_per_s"], float) and entry["images_per_s"] > 0
        assert entry["peak_rss_mb"] > 0
    assert (row["crop"], row["batch"]) == ([32, 32], 2)
    expected = (bfloat16["batch"] / bfloat16["seconds_per_step"]) / (
        float32["batch"] / float32["seconds_per_step"]
    )
    assert isinstance(row["ratio"], float) and row["ratio"] == pytest.approx(expected)
    assert row["holds"] is (expected >= 1.8)

    result = section["accuracy"]
    assert result["overrides"] == accuracy
    ious = []
    for precision in ("float32", "mixed_bfloat16"):
        job = result[precision]
        assert job["exit_code"] == 0, job.get("output_tail")
        assert "val_mean_iou_note" not in job, job["val_mean_iou_note"]
        assert isinstance(job["val_mean_iou"], float) and 0 <= job["val_mean_iou"] <= 1
        ious.append(job["val_mean_iou"])
    assert result["difference"] == pytest.approx(ious[1] - ious[0])

    results = run_all.empty_results(run_all.machine_info() | {"mode": "test"})
    results["precision"] = section
    table = run_all.render(results)
    lines = table.splitlines()
    header = next(ln for ln in lines if ln.startswith("| precision: training"))
    for column in (
        "| crop x batch |",
        "| float32 img/s |",
        "| bf16 img/s |",
        "| bf16 / float32 (target ≥ 1.8x on AMX) |",
        "| holds |",
    ):
        assert column in header, column
    assert results["machine"]["bf16_hardware"] in header
    line = next(ln for ln in lines if ln.startswith("| unet (tiny) |"))
    assert line.startswith("| unet (tiny) | 32x32 x 2 | ")
    assert f"| {expected:.2f}x | {'yes' if expected >= 1.8 else 'no'} |" in line
    assert len(line.split("|")) == len(header.split("|"))
    assert "| precision: val mIoU of a short fixed-seed training" in table
    line = next(ln for ln in lines if ln.startswith("| `seg-train model=unet"))
    assert f"| {ious[0]:.4f} | {ious[1]:.4f} | {ious[1] - ious[0]:+.4f} |" in line
    assert f"bf16 hardware: {results['machine']['bf16_hardware']}" in table.splitlines()[0]
    json.loads(json.dumps(results))


def test_precision_pair_with_an_error_has_no_ratio():
    row = run_all.precision_pair({"error": "killed"}, {"images_per_s": 2.0})
    assert row["ratio"] is None and row["holds"] is None
    row = run_all.precision_pair(
        {"images_per_s": 4.0, "crop": [8, 8], "batch": 2}, {"images_per_s": 8.0}
    )
    assert row["ratio"] == 2.0 and row["holds"] is True and row["batch"] == 2


def test_bf16_hardware_from_cpuinfo_flags():
    def cpuinfo(flags: str) -> str:
        return f"processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: {flags}\n\nprocessor\t: 1\n"

    base = "fpu vme sse sse2 avx avx2 fma"
    assert run_all.bf16_hardware(cpuinfo(base)) == "none (bfloat16 is emulated: expect < 1x)"
    assert run_all.bf16_hardware(cpuinfo(base + " avx512f avx512_bf16")) == "AVX512_BF16"
    sapphire = base + " avx512f avx512_bf16 amx_bf16 amx_tile amx_int8"
    assert run_all.bf16_hardware(cpuinfo(sapphire)) == "AMX"
    # A flag's name inside another one's does not count (avx512_bf16 is not amx_bf16).
    assert run_all.bf16_hardware(cpuinfo(base + " avx512_bf16x")) == run_all.bf16_hardware(
        cpuinfo(base)
    )
    arm = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes sve bf16 i8mm\n"
    assert run_all.bf16_hardware(arm) == "ARM BF16"
    assert run_all.bf16_hardware("") == "none (bfloat16 is emulated: expect < 1x)"
