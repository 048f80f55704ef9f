"""The GPU path end to end in a few minutes: `bash scripts/gpu_check.sh` runs this.

1. TensorFlow must see a GPU (otherwise one line with the likely cause, exit 2).
2. Training steps of each model family at its recipe's crop and batch, in float32,
   mixed_float16 and float32 under XLA (each in a fresh process, through seg-train's own
   training path as `benchmarks/worker.py` measures it): img/s and peak GPU memory per row,
   and the mixed/float32 and XLA/no-XLA ratios; beside each, what the uncached input pipeline
   delivers per CPU core at that recipe and how many cores the GPU's img/s needs.
3. The CLI on the GPUs: a short training with `MirroredStrategy` on every visible GPU, eval of
   its checkpoint with multi-scale + flip TTA, and export with its parity check (run on the
   GPU in a fresh process).

Writes `gpu_check.json` and `gpu_check.md` into --out and prints the table.
Usage: python benchmarks/gpu_check.py [--out DIR] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import run_all  # noqa: E402

EXIT_NO_GPU = 2
# Model families at their recipes' crop and batch (ImageNet weights are not needed to time).
MODELS = {
    "unet_mobilenetv2": ["experiment=pets_unet_mobilenetv2"],
    "unet (portrait)": ["experiment=portrait_unet"],
    "deeplabv3plus (keras-io)": ["experiment=cihp_deeplabv3plus"],
    "deeplabv2 (R101)": ["experiment=voc_deeplabv2", "model.freeze_bn=false"],
    "fcn8s": ["experiment=voc_fcn8s"],
}
VARIANTS = {
    "float32": (["trainer.precision=float32"], False),
    "mixed_float16": (["trainer.precision=mixed_float16"], False),
    "float32 + XLA": (["trainer.precision=float32"], True),
}


def visible_gpus() -> tuple[int, str]:
    """How many GPUs TensorFlow sees, and if none, the one-line reason."""
    import tensorflow as tf

    from seg_train.training import devices

    count = len(tf.config.list_physical_devices("GPU"))
    return count, "" if count else f"TensorFlow sees no GPU: {devices.missing_gpu_causes()}"


def train_rows(quick: bool) -> dict:
    """Training img/s and peak GPU memory per model and precision / XLA variant."""
    rows = {}
    for name, recipe in MODELS.items():
        overrides = recipe + run_all.COMMON + (run_all.QUICK if quick else [])
        for variant, (extra, jit) in VARIANTS.items():
            spec = {
                "name": name,
                "variant": variant,
                "overrides": overrides + extra,
                "jit": jit,
                "warmup": 3,
                "steps": 5 if quick else 20,
                "min_seconds": 0 if quick else 3.0,
                "max_steps": 400,
            }
            rows[f"{name}/{variant}"] = run_all.run_worker("train", spec, timeout=900)
    return rows


def pipeline_rows(quick: bool, out: Path) -> dict:
    """What the input pipeline alone delivers per CPU core for each model's recipe (crop,
    batch, augmentation), uncached (a real dataset of 10k+ images is not cached), on generated
    500x375 VOC files: the GPU rows divide by it to say how many cores keep the GPU fed."""
    from omegaconf import OmegaConf

    from benchmarks.worker import compose

    root = out / "pipeline_data"
    run_all.generate_voc_like(root, 16 if quick else 64)
    rows = {}
    for name, recipe in MODELS.items():
        cfg = compose(recipe + (run_all.QUICK if quick else []))
        data = OmegaConf.to_container(cfg.data, resolve=True) | {"cache": False}
        spec = {
            "name": name,
            "layout": "voc",
            "variant": "ours_no_cache",
            "data": data,
            "root": str(root / "voc"),
            "steps": 4 if quick else 10,
            "warmup": 2 if quick else 4,
            "min_seconds": 1.0 if quick else 5.0,
        }
        row = run_all.run_worker("input", spec)
        if "error" not in row:
            row["images_per_s_per_core"] = row["images_per_s"] / os.cpu_count()
        rows[name] = row
    return rows


def cores_to_feed(gpu_images_per_s: float | None, pipeline: dict) -> float | None:
    """CPU cores the uncached pipeline needs to keep up with the GPU's training img/s."""
    per_core = pipeline.get("images_per_s_per_core")
    return gpu_images_per_s / per_core if gpu_images_per_s and per_core else None


def cli_rows(out: Path, gpus: int) -> dict:
    """The CLI on the GPUs: train (MirroredStrategy over all of them), eval with TTA, export."""
    run_dir = out / "cli_run"
    seg_train = [str(Path(sys.executable).parent / "seg-train")]
    hardware = ["hardware=multi_gpu", f"hardware.devices=[{','.join(map(str, range(gpus)))}]"]
    steps = {
        "train (MirroredStrategy, all GPUs)": [
            *hardware,
            "debug=fast",
            "data.batch_size=8",
            f"hydra.run.dir={run_dir}",
        ],
        "eval with TTA (scales 0.75/1/1.25 + flip)": [
            "mode=eval",
            f"ckpt_path={run_dir}",
            "hardware=gpu",
            "eval.tta.scales=[0.75,1.0,1.25]",
            "eval.tta.flip=true",
            f"hydra.run.dir={out / 'cli_eval'}",
        ],
        "export + parity on the GPU": [
            "mode=export",
            f"ckpt_path={run_dir}",
            "hardware=gpu",
            f"export.output_dir={out / 'cli_export'}",
            f"hydra.run.dir={out / 'cli_export_run'}",
        ],
    }
    rows = {}
    for name, args in steps.items():
        started = time.perf_counter()
        proc = subprocess.run(
            seg_train + args, capture_output=True, text=True, cwd=ROOT, timeout=900
        )
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
        rows[name] = {
            "exit_code": proc.returncode,
            "seconds": round(time.perf_counter() - started, 1),
            "last_line": tail[0][:200],
        }
        print(f"  cli {name}: exit {proc.returncode} in {rows[name]['seconds']} s", flush=True)
    return rows


def _ratio(rows: dict, name: str, variant: str, base: str = "float32") -> float | None:
    a = rows.get(f"{name}/{variant}", {}).get("images_per_s")
    b = rows.get(f"{name}/{base}", {}).get("images_per_s")
    return a / b if a and b else None


def render(results: dict) -> str:
    """The markdown table: one row per model and variant, then the CLI checks."""
    info = results["machine"]
    lines = [
        f"**GPU check**: {', '.join(info['gpu_models']) or 'no GPU'}; TensorFlow "
        f"{info['tensorflow']} (CUDA {info['cuda_version']}, cuDNN {info['cudnn_version']}); "
        f"run: {info['mode']}.",
        "",
        "| model | crop x batch | variant | img/s | peak GPU MB | vs float32 | input pipeline "
        "img/s per CPU core (uncached) | CPU cores to feed the GPU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = results["train"]
    pipelines = results.get("pipeline", {})
    for key, row in rows.items():
        name, variant = key.split("/", 1)
        if "error" in row:
            lines.append(f"| {name} | | {variant} | {row['error'][:80]} |||||")
            continue
        crop = "x".join(map(str, row["crop"]))
        ratio = _ratio(rows, name, variant)
        pipeline = pipelines.get(name, {})
        lines.append(
            f"| {name} | {crop} x {row['batch']} | {variant} | {row['images_per_s']:.1f} | "
            f"{run_all._fmt(row.get('peak_gpu_mb'), 0)} | "
            f"{'' if variant == 'float32' else run_all._fmt(ratio, 2) + 'x'} | "
            f"{run_all._fmt(pipeline.get('images_per_s_per_core'))} | "
            f"{run_all._fmt(cores_to_feed(row['images_per_s'], pipeline))} |"
        )
    lines += ["", "| CLI on the GPU | exit | seconds |", "|---|---|---|"]
    for name, row in results["cli"].items():
        lines.append(f"| {name} | {row['exit_code']} | {row['seconds']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64x64 inputs, batch 2")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "gpu_results")
    args = parser.parse_args(argv)
    gpus, reason = visible_gpus()
    if not gpus:
        print(f"gpu_check: {reason}", file=sys.stderr)
        return EXIT_NO_GPU
    from seg_train.training import devices

    described = devices.describe()
    info = {
        "mode": "quick" if args.quick else "default",
        "gpu_models": [g["model"] for g in described["gpus"]],
        "tensorflow": described["tensorflow"],
        "cuda_version": described["cuda_version"],
        "cudnn_version": described["cudnn_version"],
        "gpus": described["gpus"],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    results = {
        "machine": info,
        "train": train_rows(args.quick),
        "pipeline": pipeline_rows(args.quick, args.out),
        "cli": cli_rows(args.out, gpus),
    }
    (args.out / "gpu_check.json").write_text(json.dumps(results, indent=2) + "\n")
    table = render(results)
    (args.out / "gpu_check.md").write_text(table)
    print(table)
    failed = [k for k, r in results["cli"].items() if r["exit_code"]]
    failed += [k for k, r in results["train"].items() if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
