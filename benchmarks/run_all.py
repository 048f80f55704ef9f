"""Runs every benchmark, prints one markdown table and writes table.md + results.json.

    python benchmarks/run_all.py [--quick] [--out DIR] [--only SECTION ...]
    python benchmarks/run_all.py --recipe "experiment=voc_deeplabv2 data.root=DIR" [--recipe ...]

--recipe runs `seg-train benchmark OVERRIDES` (the product's own measurement of a composed
config: training img/s, s/step, data stall, eval img/s, peak memory) for each recipe instead,
and writes recipes.json.

Each measurement runs in its own subprocess (benchmarks/worker.py) with the same environment:
TF_ENABLE_ONEDNN_OPTS=1 (as seg-train sets it), this process's LD_PRELOAD (none unless you
set one) and TensorFlow's default thread pools, so every ratio compares programs under
identical oneDNN/allocator settings and its peak RSS belongs to that measurement alone.
Ratios are computed against baselines measured in the same run. The "sources" section times
each source's own model, compile and fit (benchmarks/baselines.py, written from the source's
text) against seg-train's path on the same recipe, with a float32 matmul as the machine's
ceiling. The "precision" section times seg-train's path in float32 and in
trainer.precision=mixed_bfloat16 (the bf16 / float32 img/s ratio; machine_info says whether the
CPU has bf16 units) and trains a small U-Net briefly in both (val mIoU). --quick (tiny sizes,
a few steps) took about 65 minutes on 2 cores: sources ~18, memory ~28 (ten recipes' debug=fast
runs), precision ~8 (emulated bf16 steps: 4-5x a float32 step), the rest ~10. The default run
(recipe sizes) takes longer; `--only SECTION` runs one section.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WORKER = Path(__file__).resolve().parent / "worker.py"

# model name -> (recipe overrides, default-run overrides). Every model at its recipe's crop and
# batch except where the default run shrinks the batch to stay within ~20 minutes (said in the
# table).
MODELS = {
    "unet": (["model=unet"], []),
    "unet (classic 64)": (["experiment=synthetic_unet_classic"], []),
    "unet_mobilenetv2": (["experiment=pets_unet_mobilenetv2"], []),
    "fcn32s": (["experiment=voc_fcn32s"], []),
    "fcn8s": (["experiment=voc_fcn8s"], []),
    # Random init (no weights offline) with the recipe's frozen BatchNorm diverges to NaN within
    # a few steps, which the NaN guard stops: BatchNorm trains here.
    "deeplabv2 (R101)": (
        ["experiment=voc_deeplabv2", "model.freeze_bn=false"],
        ["data.batch_size=2"],
    ),
    "deeplabv3plus (R50)": (["experiment=cihp_deeplabv3plus"], []),
}
# What each input-pipeline row measures (the table's first column).
INPUT_VARIANTS = {
    "ours": "ours, defaults (data.cache=auto caches these files; after the first epoch)",
    "ours_no_cache": "ours, data.cache=false (every epoch decodes)",
    "ours_decode": "our decode alone (no augmentation)",
    "naive": "naive tutorial pipeline, as written (tf.data parallelises it by itself)",
    "naive_sequential": "naive tutorial pipeline, tf.data's automatic parallel map and "
    "prefetch off",
    "decode_only": "decode-only: tf.io decoders, parallel",
}
# Allocators tried with LD_PRELOAD (first library found), on these models' training.
ALLOCATORS = {
    "tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4"),
    "jemalloc": ("libjemalloc.so.2",),
}
ALLOCATOR_MODELS = ("unet", "deeplabv3plus (R50)")
COMMON = ["data.root=/nonexistent", "model.backbone_weights=null", "trainer.backups=true"]
# The "sources" section: pair name -> (baselines source, recipe overrides, --quick overrides).
# The default run uses the sources' own sizes (the recipes: 128x128 batch 64, 512x512 batch 4).
SOURCE_PAIRS = {
    "unet_mobilenetv2 vs TF tutorial": (
        "tf_tutorial",
        ["experiment=pets_unet_mobilenetv2"],
        ["data.crop_size=[64,64]", "data.batch_size=4"],
    ),
    "deeplabv3plus vs keras-io": (
        "keras_io",
        ["experiment=cihp_deeplabv3plus"],
        ["data.crop_size=[128,128]", "data.batch_size=2"],
    ),
}
# The "memory" section: recipe -> (the generated layout it reads, overrides of every run, overrides
# of the default run). Each recipe runs as a user runs it, `seg-train experiment=R debug=fast`
# (2 training steps, eval of 2 images, checkpoint), against a bare Keras fit of the same model
# at the same crop and batch. The default run caps the largest batches (the table shows the
# batch); --quick uses QUICK's crop and batch for both.
MEMORY_RECIPES = {
    "voc_fcn32s": ("voc", [], []),
    "voc_fcn8s": ("voc", [], []),
    # Frozen BatchNorm from random init can turn NaN in two steps: BatchNorm trains here.
    "voc_deeplabv2": ("voc", ["model.freeze_bn=false"], ["data.batch_size=2"]),
    "voc_deeplabv2_msc": ("voc", ["model.freeze_bn=false"], ["data.batch_size=2"]),
    "voc_deeplabv3plus": ("voc", [], ["data.batch_size=4"]),
    "cihp_deeplabv3plus": ("voc", [], []),
    # The folder layout asks for the class names the pets source knows (trimap order).
    "pets_unet_mobilenetv2": (
        "folder",
        ["data.num_classes=3", "data.class_names=[pet,background,border]"],
        [],
    ),
    "portrait_unet": ("portrait", [], []),
    "portrait_matting": ("portrait", [], []),
    "synthetic_unet_classic": (None, [], []),
}
# The "precision" section: seg-train's training path ("ours", synthetic tensors) in float32 and
# in trainer.precision=mixed_bfloat16, name -> (recipe overrides, default-run overrides), with
# COMMON, and QUICK under --quick. bfloat16 pays only where the CPU has bf16 units (AMX:
# Intel Xeon 4th generation on; AVX512_BF16); elsewhere oneDNN emulates it and the ratio is
# below 1 (machine_info's bf16_hardware says which). Every model at its recipe's crop and
# batch, except that the default run caps at 1 the batches whose emulated bfloat16 steps would
# take minutes on 2 cores without bf16 units: --quick measured bf16 at 0.21-0.25x float32 and
# ~5 GFLOP/s there, and a training image of the classic portrait U-Net at 256x256 or of
# DeepLabV3+ at 512x512 costs ~300 / ~340 GFLOP (the worker's count at 64x64, times the area),
# so one bf16 step of the recipes' batch 8 / batch 4 would take several minutes. The table
# shows crop x batch.
PRECISION_MODELS = {
    "unet_mobilenetv2": (["experiment=pets_unet_mobilenetv2"], []),
    "unet (portrait)": (["experiment=portrait_unet"], ["data.batch_size=1"]),
    "deeplabv3plus (keras-io)": (["experiment=cihp_deeplabv3plus"], ["data.batch_size=1"]),
}
PRECISIONS = ("float32", "mixed_bfloat16")
# bf16 / float32 training img/s the issue asks of CPUs with AMX.
BF16_TARGET = 1.8
# The accuracy rows: a short fixed-seed `seg-train` training on the embedded synthetic set
# (320 train / 64 val images) in each precision, its final val mIoU from metrics.json. A small
# U-Net, so that both runs take a few minutes here; trainer.epochs is added by run_precision
# (3, or 1 under --quick). TensorBoard, prediction images and backups are off: they do not
# change the numbers.
PRECISION_ACCURACY = [
    "model=unet",
    "model.base_filters=8",
    "data.crop_size=[64,64]",
    "data.batch_size=8",
    "seed=0",
    "trainer.backups=false",
    "callbacks.tensorboard=null",
    "callbacks.prediction_images=null",
]
SECTIONS = ("input", "train", "allocator", "crf", "sources", "memory", "precision")
# --quick: tiny inputs (the sources' pairs take their own quick sizes from SOURCE_PAIRS); the
# table says so.
QUICK = ["data.crop_size=[64,64]", "data.batch_size=2"]
QUICK_MODELS = {
    "unet": MODELS["unet"],
    "unet_mobilenetv2": MODELS["unet_mobilenetv2"],
    "deeplabv3plus (R50)": (["experiment=cihp_deeplabv3plus", "model.backbone=mobilenetv2"], []),
}


def generate_voc_like(root: Path, count: int, seed: int = 0) -> None:
    """Writes `count` 500x375 JPEGs with palette-PNG masks in the VOC and folder layouts, and
    the same scenes as PNG portraits with alpha mattes in the portrait layout.

    Images are smooth random fields with noise (they compress like photos, not like flat
    colour); masks are ellipses of classes 1-2 on background 0 with a 255 border band, so they
    fit every recipe's class count.
    """
    # seg_train.viz, not seg_train.data.voc: the parent process stays free of TensorFlow.
    from seg_train.viz import voc_palette

    if (root / "done-v2").is_file():
        return
    rng = np.random.default_rng(seed)
    voc = root / "voc"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    folder = root / "folder"
    for sub in ("images", "masks", "splits"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    portrait = root / "portrait"
    for sub in ("training", "testing"):
        (portrait / sub).mkdir(parents=True, exist_ok=True)
    palette = voc_palette(256).ravel().tolist()
    yy, xx = np.mgrid[0:375, 0:500]
    ids = []
    for index in range(count):
        coarse = rng.uniform(0, 255, (8, 10, 3)).astype(np.float32)
        field = np.asarray(
            Image.fromarray(coarse.astype(np.uint8)).resize((500, 375), Image.BICUBIC)
        )
        image = np.clip(field + rng.normal(0, 12, field.shape), 0, 255).astype(np.uint8)
        mask = np.zeros((375, 500), np.uint8)
        for cls in (1, 2):
            cy, cx, ry, rx = rng.uniform(60, 315), rng.uniform(60, 440), *rng.uniform(30, 120, 2)
            inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
            mask[inside <= 1] = cls
            mask[(inside > 0.9) & (inside <= 1.1)] = 255
        image_id = f"2007_{index:06d}"
        ids.append(image_id)
        Image.fromarray(image).save(voc / "JPEGImages" / f"{image_id}.jpg", quality=90)
        png = Image.fromarray(mask, mode="P")
        png.putpalette(palette)
        png.save(voc / "SegmentationClass" / f"{image_id}.png")
        # The portrait set: person = class 1, its border band half transparent.
        matte = np.where(mask == 1, 255, np.where(mask == 255, 128, 0)).astype(np.uint8)
        for sub in ("training", "testing"):
            Image.fromarray(image).save(portrait / sub / f"{index + 1:05d}.png")
            Image.fromarray(matte).save(portrait / sub / f"{index + 1:05d}_matte.png")
        for src, dst in (
            (voc / "JPEGImages" / f"{image_id}.jpg", folder / "images" / f"{image_id}.jpg"),
            (voc / "SegmentationClass" / f"{image_id}.png", folder / "masks" / f"{image_id}.png"),
        ):
            if not dst.exists():
                dst.symlink_to(src)
    for split in ("train", "val", "trainval"):
        (voc / "ImageSets/Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    for split in ("train", "val"):
        (folder / "splits" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    (root / "done-v2").write_text("ok\n")


def find_library(names: tuple[str, ...]) -> str | None:
    """The first of `names` found in the usual shared-library folders, as a path."""
    folders = (
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/lib64",
        "/usr/lib",
        "/usr/local/lib",
    )
    for name in names:
        for folder in folders:
            if (Path(folder) / name).is_file():
                return str(Path(folder) / name)
    return None


def run_worker(kind: str, spec: dict, timeout: float = 1800, preload: str | None = None) -> dict:
    """One measurement in a fresh process; returns its JSON result (or the error).

    Args:
        preload: A shared library to run the process under (`LD_PRELOAD`), e.g. tcmalloc.
    """
    started = time.perf_counter()
    env = dict(os.environ, LD_PRELOAD=preload) if preload else None
    proc = subprocess.run(
        [sys.executable, str(WORKER), kind, json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
    )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        result = {"error": " | ".join(tail)}
    else:
        result = json.loads(line.removeprefix("RESULT "))
    result["wall_s"] = time.perf_counter() - started
    print(
        f"  {kind:6s} {spec.get('name', '')} {spec.get('variant', '')}: "
        f"{'ERROR ' + result['error'] if 'error' in result else 'ok'} "
        f"({result['wall_s']:.0f} s)",
        file=sys.stderr,
        flush=True,
    )
    return result


def run_mode_benchmark(overrides: list[str], run_dir: Path, timeout: float = 3600) -> dict:
    """`seg-train benchmark OVERRIDES` in a fresh process; returns its benchmark.json.

    Args:
        overrides: The recipe, e.g. ["experiment=voc_deeplabv2", "data.root=DIR"].
        run_dir: A new run dir for it (hydra.run.dir); benchmark.json is read from there.
        timeout: Seconds before the run is stopped.

    Returns:
        The report, or {"error": the last lines of its output} if it failed.
    """
    command = [
        sys.executable,
        "-m",
        "seg_train",
        "benchmark",
        *overrides,
        f"hydra.run.dir={run_dir}",
    ]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    report = Path(run_dir) / "benchmark.json"
    if proc.returncode or not report.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail) or f"exit status {proc.returncode}"}
    return json.loads(report.read_text())


def run_recipes(recipes: list[str], out: Path) -> dict:
    """`seg-train benchmark` for each recipe (a string of overrides); writes recipes.json."""
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results = {}
    for index, recipe in enumerate(recipes):
        run_dir = out / "recipes" / f"{stamp}-{index}"
        results[recipe] = run_mode_benchmark(shlex.split(recipe), run_dir)
    (out / "recipes.json").write_text(json.dumps(results, indent=2))
    return results


def empty_results(machine: dict) -> dict:
    """The results layout `render` reads: the machine line, then one dict per area."""
    return {
        "machine": machine,
        "input": {},
        "train": {},
        "infer": {},
        "allocator": {},
        "crf": {},
        "sources": {},
        "memory": {},
        "precision": {},
    }


def fastest(previous: dict | None, result: dict) -> dict:
    """The run with the lower s/step (an error loses), listing every run's s/step."""
    runs = (previous or {}).get("runs_seconds_per_step", []) + [result.get("seconds_per_step")]
    best = result
    if (
        previous
        and "error" not in previous
        and ("error" in result or previous["seconds_per_step"] <= result["seconds_per_step"])
    ):
        best = previous
    return best | {"runs_seconds_per_step": runs}


def bf16_hardware(cpuinfo: str) -> str:
    """Which bfloat16 units the CPU has, from the text of /proc/cpuinfo (its first "flags" line;
    "Features" on ARM).

    Returns:
        "AMX" (amx_bf16 and amx_tile: oneDNN's bf16 matrix tiles), "AVX512_BF16" (bf16 dot
        products), "ARM BF16" (the bf16 feature of Armv8.6) or "none (bfloat16 is emulated:
        expect < 1x)".
    """
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags = set(value.split())
            break
    if {"amx_bf16", "amx_tile"} <= flags:
        return "AMX"
    if "avx512_bf16" in flags:
        return "AVX512_BF16"
    if "bf16" in flags:
        return "ARM BF16"
    return "none (bfloat16 is emulated: expect < 1x)"


def machine_info() -> dict:
    """The machine and the settings every measurement ran under."""
    import importlib.metadata as md

    cpuinfo = Path("/proc/cpuinfo").read_text()
    cpu = "unknown"
    for line in cpuinfo.splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "tensorflow": md.version("tensorflow"),
        "keras": md.version("keras"),
        "tf_enable_onednn_opts": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "1"),
        "ld_preload": os.environ.get("LD_PRELOAD", "") or "none (glibc malloc)",
        "threads": "TF defaults: intra-op = inter-op = all cores; tf.data AUTOTUNE",
        "precision": "float32 (the precision tables: also mixed_bfloat16)",
        "bf16_hardware": bf16_hardware(cpuinfo),
        "load_average_at_start": os.getloadavg()[0],
    }


def _fmt(value, digits: int = 1) -> str:
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    return f"{value:.{digits}f}" if abs(value) < 1000 else f"{value:.0f}"


def _ratio(a, b) -> float | None:
    if a is None or b in (None, 0):
        return None
    return a / b


def _size(shape) -> str:
    return f"{shape[0]}x{shape[1]}" if shape else "—"


def _crop_x_batch(crop, batch) -> str:
    """A table's "crop x batch" cell, e.g. "512x512 x 4"."""
    return f"{_size(crop)} x {batch}" if crop else "—"


def _holds(value: bool | None) -> str:
    return {True: "yes", False: "no", None: "—"}[value]


def _errors(runs: dict[str, dict]) -> str:
    """The first 80 characters of each named run's error, joined: "" when none failed."""
    return "; ".join(f"{name}: {r['error'][:80]}" for name, r in runs.items() if "error" in r)


def with_infer_ratios(result: dict) -> dict:
    """An infer worker's result with its ratios over bare `model.predict` on the same images.

    Returns:
        `result` plus predictor_vs_bare (ours, the `mode=infer` path; target ≥ 0.95) and
        savedmodel_vs_bare (the exported SavedModel), both img/s over img/s; None where a
        figure is missing (an error).
    """
    bare = result.get("bare_predict")
    return result | {
        "predictor_vs_bare": _ratio(result.get("predictor"), bare),
        "savedmodel_vs_bare": _ratio(result.get("savedmodel"), bare),
    }


def source_pair(source: dict, ours: dict, matmul_gflops_per_s: float | None) -> dict:
    """One row of the "sources" section from the fastest source and ours runs of a pair.

    Returns:
        {source, ours, ratio: ours img/s / source img/s, holds: ratio >= 1.0,
        train_gflops_per_image and gflops_per_s (ours), share_of_matmul: ours GFLOP/s over
        the matmul's}; None where a figure is missing (an error).
    """
    ratio = _ratio(ours.get("images_per_s"), source.get("images_per_s"))
    gflops_per_s = ours.get("gflops_per_s")
    return {
        "source": source,
        "ours": ours,
        "ratio": ratio,
        "holds": None if ratio is None else ratio >= 1.0,
        "train_gflops_per_image": ours.get("train_gflops_per_image"),
        "gflops_per_s": gflops_per_s,
        "share_of_matmul": _ratio(gflops_per_s, matmul_gflops_per_s),
    }


# What the "ours" step has that the sources' does not, each taken out in turn in the ablation
# (benchmarks/worker.py `without`): the mean IoU metric, our loss (ignore-label mask), the
# parameter-group optimizer, the callbacks (checkpoint, CSV, TensorBoard, images, data stall,
# NaN guard, backups).
ABLATION_PIECES = ("metrics", "loss", "param_groups", "callbacks")
SOURCES_MIN_SECONDS = 5.0


def run_sources(
    quick: bool,
    min_seconds: float,
    pairs: dict | None = None,
    repeats: int = 3,
    ablation: tuple[str, ...] = ABLATION_PIECES,
) -> tuple[dict, dict]:
    """Each pair: the source's own loop and ours, alternated `repeats` times (the fastest of
    each kept, as in the training table), then one 2048x2048 matmul.

    Args:
        quick: Use each pair's --quick sizes (and fewer warm-up / timed steps).
        min_seconds: Least timed seconds per measurement.
        pairs: name -> (source, recipe overrides, quick overrides); SOURCE_PAIRS by default.
        repeats: Alternations of source and ours.
        ablation: Pieces of ours (from `ABLATION_PIECES`) to take out one at a time, each
            run once: img/s and speed-up over ours, under "ablation".

    Returns:
        (the "sources" section, name -> `source_pair`; the matmul result).
    """
    pairs = SOURCE_PAIRS if pairs is None else pairs
    warmup, steps = (1, 2) if quick else (2, 3)
    runs: dict = {}
    for name, (source, recipe, quick_sizes) in pairs.items():
        overrides = recipe + COMMON + (quick_sizes if quick else [])
        for variant in ("source", "ours") * repeats:
            spec = {
                "name": name,
                "variant": variant,
                "source": source,
                "overrides": overrides,
                # Keras' "auto" on both sides: the sources pass no jit_compile, and it is
                # seg-train's default (trainer.jit_compile=auto).
                "jit": "auto",
                "warmup": warmup,
                "steps": steps,
                "min_seconds": min_seconds,
                "max_steps": 500,
            }
            key = (name, variant)
            runs[key] = fastest(runs.get(key), run_worker("train", spec))
        # Where a step's time goes beyond the source's: ours without one piece at a time.
        for piece in ablation:
            spec = {**spec, "variant": "ours", "without": [piece]}
            runs[(name, f"without_{piece}")] = run_worker("train", spec)
    matmul = run_worker(
        "matmul",
        {
            "name": "2048x2048 float32",
            "n": 2048,
            "warmup": 2,
            "steps": 5,
            "min_seconds": min_seconds,
        },
    )
    rate = matmul.get("gflops_per_s")
    section = {
        name: source_pair(runs[(name, "source")], runs[(name, "ours")], rate) for name in pairs
    }
    for name in pairs:
        ours = section[name]["ours"].get("images_per_s")
        section[name]["ablation"] = {
            piece: {
                "images_per_s": runs[(name, f"without_{piece}")].get("images_per_s"),
                "speedup": _ratio(runs[(name, f"without_{piece}")].get("images_per_s"), ours),
            }
            for piece in ablation
        }
    return section, matmul


def memory_overrides(recipe: str, quick: bool, data_root: Path) -> list[str]:
    """The overrides both runs of a "memory" row share: the recipe, the generated data in its
    layout, no downloads, and the crop and batch (QUICK's, or the recipe's with the default
    run's cap)."""
    layout, always, default_run = MEMORY_RECIPES[recipe]
    overrides = [f"experiment={recipe}", "model.backbone_weights=null", *always]
    if layout is not None:
        overrides += [f"data={layout}", f"data.root={data_root / layout}"]
    if layout == "voc":  # the generated files have VOC's own lists and masks, not SBD's
        overrides += ["data.aug=false", "data.train_list=null"]
    return overrides + (QUICK if quick else default_run)


def run_memory(quick: bool, data_root: Path) -> dict:
    """Peak host memory of each recipe's `debug=fast` run against a bare fit of its model.

    Returns:
        recipe -> {"job": the run's exit code, seconds and peak RSS; "bare": the bare fit's
        result; "ratio": job / bare peak RSS (target <= 2); "crop", "batch"}.
    """
    section = {}
    for recipe in MEMORY_RECIPES:
        overrides = memory_overrides(recipe, quick, data_root)
        job = run_worker("job", {"name": recipe, "overrides": overrides + ["debug=fast"]})
        spec = {
            "name": recipe,
            "variant": "bare",
            "overrides": overrides,
            "jit": False,
            "warmup": 1,
            "steps": 1,
            "min_seconds": 0,
            "max_steps": 1,
        }
        bare = run_worker("train", spec)
        ratio = None
        if "error" not in job and not job.get("exit_code"):
            ratio = _ratio(job.get("peak_rss_mb"), bare.get("peak_rss_mb"))
        section[recipe] = {
            "job": job,
            "bare": bare,
            "ratio": ratio,
            "holds": None if ratio is None else ratio <= 2.0,
            "crop": bare.get("crop"),
            "batch": bare.get("batch"),
        }
    return section


def precision_pair(float32: dict, bfloat16: dict) -> dict:
    """One row of the "precision" section from the fastest float32 and mixed_bfloat16 runs.

    Returns:
        {float32, mixed_bfloat16: the worker results; ratio: bf16 img/s / float32 img/s;
        holds: ratio >= BF16_TARGET; crop, batch}; None where a figure is missing (an error).
    """
    ratio = _ratio(bfloat16.get("images_per_s"), float32.get("images_per_s"))
    return {
        "float32": float32,
        "mixed_bfloat16": bfloat16,
        "ratio": ratio,
        "holds": None if ratio is None else ratio >= BF16_TARGET,
        "crop": float32.get("crop") or bfloat16.get("crop"),
        "batch": float32.get("batch") or bfloat16.get("batch"),
    }


def run_precision(
    quick: bool,
    min_seconds: float,
    models: dict | None = None,
    repeats: int | None = None,
    accuracy: list[str] | None = None,
) -> dict:
    """float32 against trainer.precision=mixed_bfloat16: training speed and val mIoU.

    Args:
        quick: QUICK's crop and batch, one alternation, a 1-epoch training.
        min_seconds: Least timed seconds per speed measurement.
        models: name -> (recipe overrides, default-run overrides); PRECISION_MODELS by default.
        repeats: Alternations of float32 and bf16 per model (each keeps its fastest run);
            2, or 1 under --quick, by default.
        accuracy: The overrides of the training run in both precisions; PRECISION_ACCURACY
            with trainer.epochs=3 (1 under --quick) by default.

    Returns:
        {"speed": name -> `precision_pair`; "accuracy": {overrides, float32, mixed_bfloat16:
        the `job` worker results (exit_code, seconds, val_mean_iou, peak_rss_mb), difference:
        bf16 - float32 val mIoU (None if either is missing)}}.
    """
    models = PRECISION_MODELS if models is None else models
    repeats = (1 if quick else 2) if repeats is None else repeats
    if accuracy is None:
        accuracy = PRECISION_ACCURACY + [f"trainer.epochs={1 if quick else 3}"]
    # One warm-up step (the trace) and at least 2 timed steps and min_seconds, in both modes:
    # an emulated bf16 step of the capped models takes about a minute here, while on a CPU
    # with bf16 units min_seconds decides how many steps are timed.
    warmup, steps = 1, 2
    speed = {}
    for name, (recipe, shrink) in models.items():
        overrides = recipe + COMMON + (QUICK if quick else shrink)
        runs: dict = {}
        # Alternated, each keeping its fastest run, as in the training table: another process
        # slowing one run down does not decide the ratio.
        for precision in PRECISIONS * repeats:
            spec = {
                "name": name,
                "variant": "ours",
                "overrides": overrides + [f"trainer.precision={precision}"],
                "jit": False,
                "warmup": warmup,
                "steps": steps,
                "min_seconds": min_seconds,
                "max_steps": 500,
            }
            runs[precision] = fastest(runs.get(precision), run_worker("train", spec))
        speed[name] = precision_pair(runs["float32"], runs["mixed_bfloat16"])
    jobs = {}
    for precision in PRECISIONS:
        spec = {
            "name": "accuracy",
            "variant": precision,
            "overrides": accuracy + [f"trainer.precision={precision}"],
        }
        jobs[precision] = run_worker("job", spec)
    ious = [jobs[precision].get("val_mean_iou") for precision in PRECISIONS]
    return {
        "speed": speed,
        "accuracy": {
            "overrides": accuracy,
            **jobs,
            "difference": None if None in ious else ious[1] - ious[0],
        },
    }


def run(quick: bool, out: Path, only: tuple[str, ...] = SECTIONS) -> dict:
    """Measures everything (or the sections in `only`); returns the results dict (also
    written to out/results.json)."""
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
    out.mkdir(parents=True, exist_ok=True)
    data_root = out / "data"
    generate_voc_like(data_root, 16 if quick else 64)
    info = machine_info()
    info["mode"] = "quick" if quick else "default"
    results = empty_results(info)
    started = time.perf_counter()

    # Input pipeline: the voc_deeplabv2 recipe's augmentation (crop 321, batch 10, scale
    # 0.5-1.5, flip, mean-colour padding) over 500x375 JPEG + palette PNG files, per decoder.
    data = {
        "batch_size": 10,
        "crop_size": [321, 321],
        "scale_range": [0.5, 1.5],
        "hflip": True,
        "flip_pairs": [],
        "jitter": {},
        "cache": "auto",
        "shuffle_buffer": 1000,
        "num_parallel_calls": None,
        "ignore_label": 255,
        "pad_value": [123.68, 116.779, 103.939],  # the recipe pads images with the mean colour
    }
    if quick:
        data.update(batch_size=2, crop_size=[64, 64])
    info["input_crop_batch"] = [data["crop_size"][0], data["batch_size"]]
    # Every timing lasts at least min_seconds (and min steps) after warm-up.
    min_seconds = 1.0 if quick else 5.0
    input_steps, input_warmup = (4, 2) if quick else (10, 4)
    for layout in ("voc", "folder") if "input" in only else ():
        for variant in INPUT_VARIANTS:
            if layout == "folder" and variant not in ("ours", "ours_no_cache"):
                continue  # the same files: the references are measured once, on the VOC layout
            spec = {
                "name": layout,
                "layout": layout,
                "variant": variant,
                "data": data,
                "root": str(data_root / layout),
                "steps": input_steps,
                "warmup": input_warmup,
                "min_seconds": min_seconds,
            }
            results["input"][f"{layout}/{variant}"] = run_worker("input", spec)

    # Training: each model at its recipe's crop and batch on one in-memory batch.
    models = QUICK_MODELS if quick else MODELS
    warmup, steps = (1, 2) if quick else (2, 3)
    repeats = 1 if quick else 2
    for name, (recipe, shrink) in models.items() if "train" in only else ():
        overrides = recipe + COMMON + (QUICK if quick else shrink)
        # bare and ours alternate `repeats` times and each keeps its fastest run: another
        # process slowing one run down (the machine may be shared) does not decide the ratio.
        schedule = [("bare", False), ("ours", False)] * repeats + [("ours_jit", True)]
        for variant, jit in schedule:
            spec = {
                "name": name,
                "variant": variant,
                "overrides": overrides,
                "jit": jit,
                "warmup": warmup,
                "steps": steps,
                # XLA is slower for every model here (see the README); its few steps are
                # enough to show by how much, and keep the default run short.
                "min_seconds": 0 if jit else min_seconds,
                "max_steps": 500,
                "stall_root": str(data_root / "voc"),
                "stall_steps": 3 if quick else 4,
            }
            result = run_worker("train", spec)
            key = f"{name}/{variant}"
            results["train"][key] = fastest(results["train"].get(key), result)

        # Inference: the same images through bare model.predict, our Predictor (mode=infer),
        # with TTA, in slide mode on larger images, and through the exported SavedModel.
        spec = {
            "name": name,
            "variant": "infer",
            "overrides": overrides,
            "images": 2 if quick else 4,
            "warmup": 1,
            # Passes over the images; slow models' TTA passes take tens of seconds each.
            "steps": 1 if quick else 2,
            "min_seconds": min_seconds,
            "tta_scales": [0.75, 1.0, 1.25],
        }
        results["infer"][name] = with_infer_ratios(run_worker("infer", spec))

    # Allocators: our training path under tcmalloc / jemalloc (LD_PRELOAD) where installed,
    # against the same path under this process's allocator (the training table's "ours").
    allocator_models = ALLOCATOR_MODELS if not quick else list(models)[:1]
    for name in allocator_models if "allocator" in only else ():
        recipe, shrink = models[name]
        for allocator, names in ALLOCATORS.items():
            library = find_library(names)
            key = f"{name}/{allocator}"
            if library is None:
                results["allocator"][key] = {"error": f"not installed ({names[0]})"}
                continue
            spec = {
                "name": name,
                "variant": allocator,
                "overrides": recipe + COMMON + (QUICK if quick else shrink),
                "jit": False,
                "warmup": warmup,
                "steps": steps,
                "min_seconds": min_seconds,
                "max_steps": 500,
            }
            results["allocator"][key] = run_worker("train", spec, preload=library) | {
                "library": library
            }

    # CRF on 500x375 images with 21 classes, one worker vs all cores.
    for workers in (1, None) if "crf" in only else ():
        spec = {
            "name": "crf",
            "variant": f"workers={workers or 'all'}",
            "workers": workers,
            "height": 375,
            "width": 500,
            "classes": 21,
            "images": 4 if quick else 16,
        }
        results["crf"][f"workers={workers or 'all'}"] = run_worker("crf", spec)

    # The sources' own loops against ours, same recipe, same batch in memory.
    if "sources" in only:
        # Runs of one side on this shared VM differ by up to ~10% (three 25-step runs of one
        # step: 0.78-0.86 s) and the verdict is >= 1.00: each side keeps its fastest of three
        # runs (run_sources' default) of at least 5 s, --quick included.
        results["sources"], results["matmul"] = run_sources(
            quick, max(min_seconds, SOURCES_MIN_SECONDS)
        )
    if "memory" in only:
        # Four files: each debug=fast run validates and evaluates the whole val split.
        memory_root = out / "memory_data"
        generate_voc_like(memory_root, 4)
        results["memory"] = run_memory(quick, memory_root)
    if "precision" in only:
        results["precision"] = run_precision(quick, min_seconds)
    info["total_minutes"] = (time.perf_counter() - started) / 60
    info["load_average_at_end"] = os.getloadavg()[0]
    (out / "results.json").write_text(json.dumps(results, indent=2))
    table = render(results)
    (out / "table.md").write_text(table)
    return results


def render(results: dict) -> str:
    """The markdown report: machine line, then one table per area, with target ratios."""
    info = results["machine"]
    lines = [
        f"**Machine**: {info['cpu']}, {info['cores']} cores; Python {info['python']}, "
        f"TensorFlow {info['tensorflow']}, Keras {info['keras']}; "
        f"TF_ENABLE_ONEDNN_OPTS={info['tf_enable_onednn_opts']}; "
        f"LD_PRELOAD={info['ld_preload']}; threads: {info['threads']}; "
        f"bf16 hardware: {info.get('bf16_hardware', 'unknown')}; "
        f"precision {info['precision']}; run: {info['mode']}, "
        f"{info.get('total_minutes', 0):.1f} min, load average "
        f"{info['load_average_at_start']:.1f} at start / "
        f"{info.get('load_average_at_end', 0):.1f} at end.",
        "",
    ]
    inp = results["input"]
    naive = inp.get("voc/naive", {}).get("images_per_s")
    sequential = inp.get("voc/naive_sequential", {}).get("images_per_s")
    decode = inp.get("voc/decode_only", {}).get("images_per_s")
    crop, batch = info.get("input_crop_batch", [321, 10])
    lines += [
        f"| input pipeline (500x375 JPEG + palette PNG, crop {crop}, batch {batch}) | images/s | "
        f"images/s per CPU core ({info['cores']} cores) | vs naive as written (target ≥ 3x) | "
        "vs naive sequential | vs decode-only (target ≥ 0.90 uncached) | peak RSS MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, result in inp.items():
        ips = result.get("images_per_s")
        layout, variant = key.split("/")
        if "error" in result:
            lines.append(f"| {key} | error: {result['error']} ||||||")
            continue
        lines.append(
            f"| {layout}: {INPUT_VARIANTS.get(variant, variant)} | {_fmt(ips)} | "
            f"{_fmt(_ratio(ips, info['cores']))} | "
            f"{_fmt(_ratio(ips, naive), 2)}x | {_fmt(_ratio(ips, sequential), 2)}x | "
            f"{_fmt(_ratio(ips, decode), 2)} | {_fmt(result.get('peak_rss_mb'), 0)} |"
        )
    lines.append("")
    lines += [
        "| training (synthetic tensors) | crop x batch | bare fit s/step | ours s/step "
        "| ours img/s | ours / bare (target ≥ 0.95) | ours XLA s/step | XLA / no XLA "
        "| data stall (target < 5%) | peak RSS MB bare / ours / XLA |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    names = list(dict.fromkeys(key.rsplit("/", 1)[0] for key in results["train"]))
    for name in names:
        bare = results["train"].get(f"{name}/bare", {})
        mine = results["train"].get(f"{name}/ours", {})
        xla = results["train"].get(f"{name}/ours_jit", {})
        crop = mine.get("crop") or bare.get("crop")
        size = f"{crop[0]}x{crop[1]} x {mine.get('batch') or bare.get('batch')}" if crop else "—"
        stall = mine.get("data_stall")
        errors = "; ".join(
            f"{v}: {r['error'][:80]}"
            for v, r in (("bare", bare), ("ours", mine), ("xla", xla))
            if "error" in r
        )
        lines.append(
            f"| {name} | {size} | {_fmt(bare.get('seconds_per_step'), 3)} | "
            f"{_fmt(mine.get('seconds_per_step'), 3)} | {_fmt(mine.get('images_per_s'), 2)} | "
            # ours/bare as a throughput ratio: bare s/step over ours s/step.
            f"{_fmt(_ratio(bare.get('seconds_per_step'), mine.get('seconds_per_step')), 2)}x | "
            f"{_fmt(xla.get('seconds_per_step'), 3)} | "
            f"{_fmt(_ratio(mine.get('seconds_per_step'), xla.get('seconds_per_step')), 2)}x | "
            f"{_fmt(None if stall is None else 100 * stall)}% | "
            f"{_fmt(bare.get('peak_rss_mb'), 0)} / {_fmt(mine.get('peak_rss_mb'), 0)} / "
            f"{_fmt(xla.get('peak_rss_mb'), 0)} |" + (f" {errors}" if errors else "")
        )
    lines.append("")
    lines += [
        "| inference (images/s, one image at a time) | crop | bare model.predict | ours "
        "(mode=infer path) | ours / bare (target ≥ 0.95) | ours + TTA (3 scales x flip) "
        "| large image | bare model.predict, large | ours slide (crop windows), large "
        "| SavedModel (mode=export) | SavedModel / bare | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, result in results["infer"].items():
        if "error" in result:
            lines.append(f"| {name} | error: {result['error'][:120]} |||||||||||")
            continue
        crop, large = result.get("crop"), result.get("large")
        note = result.get("bare_predict_large_note")
        lines.append(
            f"| {name} | {_size(crop)} | {_fmt(result.get('bare_predict'), 2)} | "
            f"{_fmt(result.get('predictor'), 2)} | {_fmt(result.get('predictor_vs_bare'), 2)}x | "
            f"{_fmt(result.get('predictor_tta'), 2)} | {_size(large)} | "
            f"{_fmt(result.get('bare_predict_large'), 2)} | "
            f"{_fmt(result.get('predictor_slide'), 2)} | {_fmt(result.get('savedmodel'), 2)} | "
            f"{_fmt(result.get('savedmodel_vs_bare'), 2)}x | "
            f"{_fmt(result.get('peak_rss_mb'), 0)} |" + (f" {note}" if note else "")
        )
    lines.append("")
    if results.get("allocator"):
        lines += [
            "| allocator (our training path, LD_PRELOAD) | s/step | vs this run's default "
            "allocator (training table) | peak RSS MB |",
            "|---|---|---|---|",
        ]
        for key, result in results["allocator"].items():
            name, allocator = key.rsplit("/", 1)
            if "error" in result:
                lines.append(f"| {name}: {allocator} | {result['error'][:80]} |||")
                continue
            default = results["train"].get(f"{name}/ours", {}).get("seconds_per_step")
            step = result.get("seconds_per_step")
            lines.append(
                f"| {name}: {allocator} | {_fmt(step, 3)} | {_fmt(_ratio(default, step), 2)}x "
                f"| {_fmt(result.get('peak_rss_mb'), 0)} |"
            )
        lines.append("")
    lines += _crf_rows(results)
    if results.get("sources"):
        lines += _source_rows(results)
    if results.get("memory"):
        lines += _memory_rows(results)
    if results.get("precision"):
        lines += _precision_rows(results)
    return "\n".join(lines) + "\n"


def _precision_rows(results: dict) -> list[str]:
    """The "precision" tables: training img/s in float32 and mixed_bfloat16 per model, then
    the val mIoU of the same short training in both."""
    section = results["precision"]
    hardware = results["machine"].get("bf16_hardware", "unknown")
    lines = [
        "",
        f"| precision: training, ours (synthetic tensors; bf16 hardware: {hardware}) "
        "| crop x batch | float32 img/s | bf16 img/s "
        f"| bf16 / float32 (target ≥ {BF16_TARGET}x on AMX) | holds |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in section.get("speed", {}).items():
        float32, bfloat16 = row["float32"], row["mixed_bfloat16"]
        size = _crop_x_batch(row.get("crop"), row.get("batch"))
        errors = _errors({"float32": float32, "bf16": bfloat16})
        holds = _holds(row["holds"])
        lines.append(
            f"| {name} | {size} | {_fmt(float32.get('images_per_s'), 2)} | "
            f"{_fmt(bfloat16.get('images_per_s'), 2)} | {_fmt(row['ratio'], 2)}x | {holds} |"
            + (f" {errors}" if errors else "")
        )
    accuracy = section.get("accuracy")
    if accuracy:
        float32, bfloat16 = accuracy["float32"], accuracy["mixed_bfloat16"]
        difference = accuracy["difference"]
        problems = "; ".join(
            f"{name}: {text[:80]}"
            for name, job in (("float32", float32), ("bf16", bfloat16))
            for text in (job.get("error"), job.get("output_tail"), job.get("val_mean_iou_note"))
            if text
        )
        lines += [
            "",
            "| precision: val mIoU of a short fixed-seed training (synthetic set) | val mIoU "
            "float32 | val mIoU bf16 | bf16 − float32 | seconds float32 / bf16 |",
            "|---|---|---|---|---|",
            f"| `seg-train {' '.join(accuracy['overrides'])}` | "
            f"{_fmt(float32.get('val_mean_iou'), 4)} | {_fmt(bfloat16.get('val_mean_iou'), 4)} | "
            f"{'—' if difference is None else f'{difference:+.4f}'} | "
            f"{_fmt(float32.get('seconds'), 0)} / {_fmt(bfloat16.get('seconds'), 0)} |"
            + (f" {problems}" if problems else ""),
        ]
    return lines


def _memory_rows(results: dict) -> list[str]:
    """The "memory" table: each recipe's debug=fast peak RSS against a bare fit's."""
    lines = [
        "",
        "| peak host memory: `seg-train experiment=R debug=fast` vs a bare Keras fit of the same "
        "model | crop x batch | bare fit MB | debug=fast MB | debug=fast / bare (target ≤ 2) "
        "| holds | debug=fast s |",
        "|---|---|---|---|---|---|---|",
    ]
    for recipe, row in results["memory"].items():
        job, bare = row["job"], row["bare"]
        size = _crop_x_batch(row.get("crop"), row.get("batch"))
        failed_job = {"error": job.get("error") or job.get("output_tail")}
        problems = _errors({"bare": bare, "debug=fast": failed_job if failed_job["error"] else {}})
        holds = _holds(row["holds"])
        lines.append(
            f"| {recipe} | {size} | {_fmt(bare.get('peak_rss_mb'), 0)} | "
            f"{_fmt(job.get('peak_rss_mb'), 0)} | {_fmt(row['ratio'], 2)}x | {holds} | "
            f"{_fmt(job.get('seconds'), 0)} |" + (f" {problems}" if problems else "")
        )
    return lines


def _source_rows(results: dict) -> list[str]:
    """The "seg-train / source" table: each pair's img/s, the ratio, GFLOP/s, matmul share."""
    matmul = results.get("matmul", {})
    lines = [
        "",
        f"| seg-train / source (synthetic batch in memory; matmul 2048² float32: "
        f"{_fmt(matmul.get('gflops_per_s'))} GFLOP/s) | crop x batch | source img/s "
        "| ours img/s | seg-train / source (target ≥ 1.0) | holds | train GFLOP/image "
        "| ours GFLOP/s | share of matmul |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, pair in results["sources"].items():
        source, mine = pair["source"], pair["ours"]
        size = _crop_x_batch(
            mine.get("crop") or source.get("crop"), mine.get("batch") or source.get("batch")
        )
        errors = _errors({"source": source, "ours": mine})
        holds = _holds(pair["holds"])
        lines.append(
            f"| {name} | {size} | {_fmt(source.get('images_per_s'), 2)} | "
            f"{_fmt(mine.get('images_per_s'), 2)} | {_fmt(pair['ratio'], 2)}x | {holds} | "
            f"{_fmt(pair['train_gflops_per_image'], 2)} | {_fmt(pair['gflops_per_s'], 1)} | "
            f"{_fmt(None if pair['share_of_matmul'] is None else 100 * pair['share_of_matmul'])}%"
            " |" + (f" {errors}" if errors else "")
        )
    return lines


def _crf_rows(results: dict) -> list[str]:
    """The dense-CRF table."""
    lines = []
    one = results["crf"].get("workers=1", {}).get("ms_per_image")
    lines += [
        "| dense CRF, 500x375, 21 classes, 10 iterations | ms/image | speed-up "
        "(target ≥ 1.8x on 2 cores) | peak RSS MB (largest process) |",
        "|---|---|---|---|",
    ]
    for key, result in results["crf"].items():
        ms = result.get("ms_per_image")
        lines.append(
            f"| {key} ({result.get('workers', '?')}) | {_fmt(ms, 0)} | "
            f"{_fmt(_ratio(one, ms), 2)}x | {_fmt(result.get('peak_rss_mb'), 0)} |"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (about 65 min on 2 cores)")
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "benchmarks" / "results",
        help="where table.md, results.json and the generated files go",
    )
    parser.add_argument(
        "--recipe",
        action="append",
        help="run `seg-train benchmark RECIPE` (quoted overrides) instead; may repeat",
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=SECTIONS,
        help="run only this section (may repeat); inference runs with train",
    )
    args = parser.parse_args(argv)
    if args.recipe:
        for recipe, report in run_recipes(args.recipe, args.out).items():
            if "error" in report:
                print(f"{recipe}: error: {report['error']}")
                continue
            train, evaluation = report["train"], report["eval"]
            print(
                f"{recipe}: train {train['images_per_s']:.2f} img/s "
                f"({train['seconds_per_step']:.3f} s/step), eval "
                f"{evaluation['images_per_s'] or 0:.2f} img/s, peak host "
                f"{report['memory']['peak_host_mb']:.0f} MiB"
            )
        return
    results = (
        run(args.quick, args.out, tuple(args.only)) if args.only else run(args.quick, args.out)
    )
    print(render(results))


if __name__ == "__main__":
    main()
