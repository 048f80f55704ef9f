"""`report.html`: one self-contained page per train / eval run, built from its run dir.

Everything the page shows was already written by the run (metrics.json, confusion_matrix.csv,
history.csv, training_curves.png, worst/, devices.json, the log, .hydra/); the page adds no
number of its own except the process's peak memory and the recipe comparison. Images are
embedded as base64 PNG data URIs and the styles are inline, so the file opens offline, can be
mailed or attached to an issue, and never fetches anything.
"""

from __future__ import annotations

import base64
import html
import importlib.metadata
import json
import logging
import platform
import re
import resource
import sys
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from seg_train.files import write_atomic
from seg_train.runtime import CONFIG_DIR
from seg_train.viz import full_palette

log = logging.getLogger(__name__)

REPORT_FILE = "report.html"
# Marks the pages we write: a report.html without it is the user's, and is never replaced.
GENERATOR = "seg-train report"
# Packages whose versions the environment section lists (distribution names).
PACKAGES = (
    "seg-train",
    "tensorflow",
    "keras",
    "numpy",
    "hydra-core",
    "omegaconf",
    "pillow",
    "matplotlib",
)
# The DataStallMonitor's per-epoch log line (seg_train/training/callbacks.py): the run's only
# record of step time and input stall, so the speed section reads it back from the run's log.
STALL_LINE = re.compile(
    r"Epoch (\d+): data stall ([\d.]+)% of step time \(([\d.]+) ms of ([\d.]+) ms per step\)"
)


def write_report(run_dir: Path, cfg: DictConfig) -> Path | None:
    """Writes `run_dir/report.html` for a finished train or eval run; returns its path.

    Never raises: the report summarises files the run has already written, so a failure
    here (a bug, a full disk) is a warning and must not fail a run whose results are safe.
    A `report.html` that this module did not write is left alone (warning, None returned).

    Args:
        run_dir: The run's output dir, holding its metrics.json.
        cfg: The run's config as used (after `mode=eval` adopted the training run's sections).
    """
    path = Path(run_dir) / REPORT_FILE
    try:
        if path.exists() and GENERATOR not in path.read_text(errors="replace")[:2000]:
            log.warning("%s exists and was not written by seg-train; not replacing it", path)
            return None
        page = build_report(Path(run_dir), cfg)
        write_atomic(path, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    except Exception as exc:  # noqa: BLE001 - see the docstring: the run's results are written
        log.warning("Could not write %s: %s: %s", path, type(exc).__name__, exc)
        return None
    log.info("Report: %s", path)
    return path


def build_report(run_dir: Path, cfg: DictConfig) -> str:
    """The report page of `run_dir` as one HTML string (see the module docstring)."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    names = list(cfg.data.class_names)
    palette = full_palette(cfg.data.get("palette"))
    mode = OmegaConf.select(cfg, "mode.name", default="train")
    # mode=eval of a run dir: curves, speed and recipe come from the training run.
    training_dir = _training_run(cfg) if mode == "eval" else run_dir
    title = f"seg-train {mode}: {metrics.get('dataset', cfg.data.name)} / {metrics.get('split')}"
    sections = [
        f"<h1>{_e(title)}</h1>",
        "<p>Run dir <code>{}</code>, written {}. Checkpoint <code>{}</code>.</p>".format(
            _e(run_dir.resolve()),
            datetime.now().strftime("%Y-%m-%d %H:%M"),
            _e(metrics.get("checkpoint", "-")),
        ),
        _result_section(metrics, _recipe(cfg, run_dir, training_dir)),
        _per_class_section(metrics, names, palette),
        _confusion_section(run_dir / "confusion_matrix.csv", names, palette),
        _curves_section(training_dir, run_dir),
        _worst_section(run_dir, metrics, names, palette),
        _speed_section(training_dir, cfg, metrics),
        _memory_section(),
        _config_section(cfg, run_dir, training_dir),
        _environment_section(run_dir),
    ]
    return PAGE.format(
        generator=GENERATOR, title=_e(title), body="\n".join(s for s in sections if s)
    )


# Inline styles only: a <link> or a web font would make the page depend on the network.
PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="generator" content="{generator}">
<title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; max-width: 1400px; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1em; }}
th, td {{ border: 1px solid #ccc; padding: 2px 8px; text-align: right; }}
th {{ background: #f2f2f2; }}
td.name, th.name {{ text-align: left; }}
.swatch {{ display: inline-block; width: 0.9em; height: 0.9em; border: 1px solid #000;
  vertical-align: middle; margin-right: 0.4em; }}
figure {{ margin: 0.5em 0 1.5em; }}
img {{ max-width: 100%; }}
pre {{ background: #f7f7f7; padding: 0.5em; overflow-x: auto; }}
.note {{ color: #666; }}
</style>
</head>
<body>
{body}
</body>
</html>
"""


def _e(value) -> str:
    return html.escape(str(value))


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _swatch(colour: Sequence[int]) -> str:
    r, g, b = (int(c) for c in colour)
    return f'<span class="swatch" style="background: rgb({r}, {g}, {b})"></span>'


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], name_columns: int = 1) -> str:
    """An HTML table; cells are HTML already (escape before), the first column(s) left-aligned."""

    def cells(tag: str, values: Sequence[str]) -> str:
        return "".join(
            f"<{tag}{' class=name' if i < name_columns else ''}>{v}</{tag}>"
            for i, v in enumerate(values)
        )

    body = "".join(f"<tr>{cells('td', r)}</tr>" for r in rows)
    return f"<table><tr>{cells('th', header)}</tr>{body}</table>"


def _image(path: Path, alt: str) -> str:
    """An <img> holding the PNG at `path` as a data URI."""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{_e(alt)}">'


# --- result and recipe -------------------------------------------------------------------------


def _recipe(cfg: DictConfig, run_dir: Path, training_dir: Path | None) -> dict | None:
    """{name, target} of the experiment recipe the run used, None for none."""
    name = _choice("experiment", run_dir) or (
        _choice("experiment", training_dir) if training_dir else None
    )
    if not name:
        return None

    file = Path(CONFIG_DIR) / "experiment" / f"{name}.yaml"
    return {"name": name, "target": recipe_target(file) if file.is_file() else None}


def recipe_target(recipe: Path) -> str | None:
    """The `# Target:` paragraph of a recipe's header comment, on one line."""
    lines, inside = [], False
    for line in recipe.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line[1:].strip()
        if re.match(r"[A-Z][\w ]*:", text):  # the next header field ends the paragraph
            inside = text.startswith("Target:")
            text = text.removeprefix("Target:").strip()
        if inside and text:
            lines.append(text)
    return " ".join(lines) or None


def _result_section(metrics: dict, recipe: dict | None) -> str:
    rows = [
        ("mean IoU", metrics.get("mean_iou")),
        ("pixel accuracy", metrics.get("pixel_accuracy")),
        ("mean accuracy", metrics.get("mean_accuracy")),
        ("mean Dice", metrics.get("mean_dice")),
        ("frequency-weighted IoU", metrics.get("fw_iou")),
    ]
    table = _table(["metric", "this run (%)"], [(_e(n), _pct(v)) for n, v in rows])
    protocol = metrics.get("protocol", {})
    parts = [
        "<h2>Result</h2>",
        f"<p>{_e(metrics.get('num_images'))} images of split <b>{_e(metrics.get('split'))}</b>"
        f", {_e(metrics.get('num_pixels'))} labelled pixels; prediction: "
        f"<code>{_e(json.dumps(protocol))}</code>.</p>",
    ]
    if protocol.get("max_images"):
        parts.append(
            f'<p class="note">Only the split\'s first {_e(protocol["max_images"])} images were '
            "evaluated (eval.max_images): a quick look, not a result to compare.</p>"
        )
    if recipe is None:
        parts.append('<p class="note">No experiment recipe (experiment=null): no target.</p>')
    else:
        target = recipe["target"] or "(the recipe names no target)"
        ours = _pct(metrics.get("mean_iou"))
        parts.append(
            _table(
                ["recipe", "target (the source's number)", "this run: mIoU (%)"],
                [(f"<code>{_e(recipe['name'])}</code>", _e(target), ours)],
                name_columns=2,
            )
        )
    parts.append(table)
    if metrics.get("protocol_change"):
        parts.append(f"<p><b>Protocol change:</b> {_e(metrics['protocol_change'])}</p>")
    if metrics.get("selection"):
        sel = metrics["selection"]
        parts.append(
            f"<p>best.keras selected on <code>{_e(sel.get('metric'))}</code> = "
            f"{_e(_pct(sel.get('value')))}% ({_e(sel.get('description'))}).</p>"
        )
    return "\n".join(parts)


# --- per class and confusion matrix ------------------------------------------------------------


def _per_class_section(metrics: dict, names: list[str], palette: np.ndarray) -> str:
    rows = []
    for index, name in enumerate(names):
        rows.append(
            (
                str(index),
                _swatch(palette[index]) + _e(name),
                _pct(metrics["per_class_iou"].get(name)),
                _pct(metrics["per_class_accuracy"].get(name)),
                _pct(metrics["per_class_dice"].get(name)),
            )
        )
    rows.append(
        (
            "",
            "<b>mean</b>",
            _pct(metrics.get("mean_iou")),
            _pct(metrics.get("mean_accuracy")),
            _pct(metrics.get("mean_dice")),
        )
    )
    return (
        "<h2>Per class</h2>"
        '<p class="note">In %; "-" = undefined (the class is in neither truth nor prediction, '
        "or, for accuracy, not in the truth).</p>"
        + _table(["id", "class", "IoU", "accuracy", "Dice"], rows, name_columns=2)
    )


def _confusion_section(csv_file: Path, names: list[str], palette: np.ndarray) -> str:
    if not csv_file.is_file():
        return ""
    matrix = np.loadtxt(csv_file, delimiter=",", dtype=np.int64, ndmin=2)
    totals = matrix.sum(1)
    rows = []
    for i, name in enumerate(names):
        cells = [_swatch(palette[i]) + _e(name)]
        for j in range(matrix.shape[1]):
            share = matrix[i, j] / totals[i] if totals[i] else 0.0
            # Shade by the row share, as confusion_matrix.png does: counts of big classes
            # would drown the small ones.
            level = int(255 - 160 * share)
            cells.append(
                f'<span title="{100 * share:.1f}% of truth {_e(name)}" '
                f'style="background: rgb({level}, {level}, 255); display: block">'
                f"{matrix[i, j]}</span>"
            )
        cells.append(str(totals[i]))
        rows.append(cells)
    header = ["truth \\ prediction", *(_e(n) for n in names), "total"]
    return (
        "<h2>Confusion matrix</h2>"
        '<p class="note">Pixel counts, rows = truth, columns = prediction (ignore label left '
        "out); shading = share of the row.</p>" + _table(header, rows)
    )


# --- training curves and worst images ----------------------------------------------------------


def _curves_section(training_dir: Path | None, run_dir: Path) -> str:
    if training_dir is None:
        return ""
    png = training_dir / "training_curves.png"
    history = training_dir / "history.csv"
    where = "" if training_dir == run_dir else f" of training run <code>{_e(training_dir)}</code>"
    intro = f"<h2>Training curves</h2><p class=note>From history.csv{where}.</p>"
    if png.is_file():
        return intro + f"<figure>{_image(png, 'training curves')}</figure>"
    if not history.is_file():
        return ""
    # Not plotted (e.g. a run stopped before its report): draw it here, into a temporary file,
    # never into another run's dir. matplotlib is a dependency already (viz.plot_history).
    import tempfile

    from seg_train.viz import plot_history

    with tempfile.TemporaryDirectory() as tmp:
        plot_history(history, Path(tmp) / "curves.png")
        if not (Path(tmp) / "curves.png").is_file():  # an empty history
            return ""
        return intro + f"<figure>{_image(Path(tmp) / 'curves.png', 'training curves')}</figure>"


def _legend(names: list[str], palette: np.ndarray) -> str:
    items = [f"{_swatch(palette[i])}{_e(n)}" for i, n in enumerate(names)]
    items.append(f"{_swatch(palette[255])}ignore")
    return "<p>" + " &nbsp; ".join(items) + "</p>"


def _worst_section(run_dir: Path, metrics: dict, names: list[str], palette: np.ndarray) -> str:
    worst = [w for w in metrics.get("worst_images", []) if (run_dir / w["file"]).is_file()]
    if not worst:
        return ""
    figures = [
        f"<figure>{_image(run_dir / w['file'], w['file'])}<figcaption>"
        f"{_e(metrics.get('split'))} image #{w['index']}: mIoU {_pct(w['mean_iou'])}% "
        f"(<code>{_e(w['file'])}</code>)</figcaption></figure>"
        for w in worst
    ]
    return (
        f"<h2>Worst {len(worst)} {_e(metrics.get('split'))} images</h2>"
        '<p class="note">Lowest per-image mIoU (over the classes in the image\'s truth or '
        "prediction); columns: image | truth | prediction overlays. Legend:</p>"
        + _legend(names, palette)
        + "\n".join(figures)
    )


# --- speed, memory, config, environment --------------------------------------------------------


def training_speed(log_text: str, batch_size: int) -> list[dict]:
    """Per epoch {epoch, stall, wait_ms, step_ms, images_per_second} from a run's log.

    A resumed run appends to the same log: the last line of an epoch wins.
    """
    epochs = {}
    for match in STALL_LINE.finditer(log_text):
        epoch, stall, wait, step = match.groups()
        step_ms = float(step)
        epochs[int(epoch)] = {
            "epoch": int(epoch),
            "stall": float(stall) / 100,
            "wait_ms": float(wait),
            "step_ms": step_ms,
            "images_per_second": batch_size * 1000 / step_ms if step_ms > 0 else None,
        }
    return [epochs[e] for e in sorted(epochs)]


def _speed_section(training_dir: Path | None, cfg: DictConfig, metrics: dict) -> str:
    parts = ["<h2>Speed</h2>"]
    logs = sorted(training_dir.glob("*.log")) if training_dir else []
    epochs = training_speed(
        "\n".join(f.read_text(errors="replace") for f in logs), int(cfg.data.batch_size)
    )
    if epochs:
        parts.append(
            f"<p>Training, global batch {int(cfg.data.batch_size)} (steady state: the first "
            "step of each fit call, with its tracing, is left out):</p>"
        )
        parts.append(
            _table(
                ["epoch", "train img/s", "step (ms)", "input wait (ms)", "data stall (%)"],
                [
                    (
                        str(e["epoch"]),
                        "-" if e["images_per_second"] is None else f"{e['images_per_second']:.1f}",
                        f"{e['step_ms']:.1f}",
                        f"{e['wait_ms']:.1f}",
                        f"{100 * e['stall']:.1f}",
                    )
                    for e in epochs
                ],
            )
        )
    elif training_dir is not None:
        parts.append(
            '<p class="note">Training speed not recorded (no DataStallMonitor line in the log: '
            "the callback is off, or it cannot measure under XLA, op determinism or several "
            "replicas).</p>"
        )
    speed = metrics.get("eval_speed") or {}
    if speed.get("images_per_second"):
        parts.append(
            f"<p>Evaluation: {speed['images_per_second']:.2f} img/s "
            f"({metrics.get('num_images')} images in {speed['seconds']:.1f} s, prediction, "
            "post-processing and counting together).</p>"
        )
    return "".join(parts)


def peak_memory() -> dict:
    """{host_rss_bytes, gpus: {name: peak bytes}} of this process so far."""
    # ru_maxrss is KiB on Linux and bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = {"host_rss_bytes": rss if sys.platform == "darwin" else rss * 1024, "gpus": {}}
    tf = sys.modules.get("tensorflow")  # only if the run loaded it: importing costs seconds
    if tf is not None:
        try:
            for index, _ in enumerate(tf.config.list_logical_devices("GPU")):
                info = tf.config.experimental.get_memory_info(f"GPU:{index}")
                peak["gpus"][f"GPU:{index}"] = int(info["peak"])
        except Exception:  # noqa: BLE001 - memory stats are best-effort (some builds lack them)
            pass
    return peak


def _memory_section() -> str:
    from seg_train.files import human_bytes

    peak = peak_memory()
    rows = [("host (peak RSS of this process)", human_bytes(peak["host_rss_bytes"]))]
    rows += [(f"{name} (TensorFlow peak)", human_bytes(b)) for name, b in peak["gpus"].items()]
    return "<h2>Peak memory</h2>" + _table(["where", "peak"], [(_e(a), b) for a, b in rows])


def _overrides(run_dir: Path | None) -> list[str]:
    file = run_dir / ".hydra" / "overrides.yaml" if run_dir else None
    if file is None or not file.is_file():
        return []
    return [str(o) for o in (OmegaConf.load(file) or [])]


def _choice(group: str, run_dir: Path | None) -> str | None:
    """The option of config group `group` that a run dir's command line chose."""
    for override in _overrides(run_dir):
        key, _, value = override.lstrip("+~").partition("=")
        if key == group and value and value != "null":
            return value
    return None


def _training_run(cfg: DictConfig) -> Path | None:
    """The training run dir behind `cfg.ckpt_path` (mode=eval), None for a bare .keras file."""
    if not cfg.get("ckpt_path"):
        return None
    from seg_train.tasks.checkpoint import resolve_checkpoint

    try:
        return resolve_checkpoint(cfg.ckpt_path)[1]
    except Exception:  # noqa: BLE001 - the run already loaded it; a report section is optional
        return None


def _flatten(node, prefix: str = "") -> dict[str, object]:
    """Leaf values of a config container by dotted key (lists are leaves)."""
    if isinstance(node, dict):
        flat = {}
        for key, value in node.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): node}


def config_differences(run: DictConfig, baseline: DictConfig) -> list[tuple[str, object, object]]:
    """(key, baseline value, run value) for each leaf that differs; "(absent)" if missing.

    Compared unresolved, so `${...}` interpolations (paths, the run dir) are not differences.
    """
    trees = [OmegaConf.to_container(c, resolve=False) for c in (baseline, run)]
    flat = [_flatten(tree) for tree in trees]
    differing = {
        key
        for key in set(flat[0]) | set(flat[1])
        if flat[0].get(key, _ABSENT) != flat[1].get(key, _ABSENT) and not key.startswith("hydra.")
    }
    # A section one side switched off (`callbacks.tensorboard: null`) is one row, not a row
    # per key of the other side: report the shortest prefix that is a leaf on either side.
    rows = {}
    for key in differing:
        parts = key.split(".")
        prefix = next(
            ".".join(parts[:n])
            for n in range(1, len(parts) + 1)
            if any(".".join(parts[:n]) in side for side in flat)
        )
        rows[prefix] = tuple(_lookup(tree, prefix) for tree in trees)
    return [(key, *rows[key]) for key in sorted(rows)]


_ABSENT = "(absent)"


def _lookup(tree, dotted: str):
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return _ABSENT
        tree = tree[part]
    return tree


def _baseline(run_dir: Path, training_dir: Path | None) -> tuple[DictConfig, str]:
    """The config that the run's recipe (or the defaults) composes to, and its name."""
    keep = ("experiment", "mode")
    overrides = [o for o in _overrides(run_dir) if o.lstrip("+~").partition("=")[0] in keep]
    if not any(o.startswith("experiment=") for o in overrides):
        recipe = _choice("experiment", training_dir)
        if recipe:
            overrides.append(f"experiment={recipe}")
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():  # inside the seg-train command
        baseline = compose(config_name="config", overrides=overrides)
    else:
        with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
            baseline = compose(config_name="config", overrides=overrides)
    recipe = next((o.partition("=")[2] for o in overrides if o.startswith("experiment=")), None)
    return baseline, f"recipe {recipe}" if recipe else "defaults"


def _value(value) -> str:
    """A config value as the YAML command line writes it (null, true, [1, 2])."""
    return value if isinstance(value, str) else json.dumps(value)


def _config_section(cfg: DictConfig, run_dir: Path, training_dir: Path | None) -> str:
    parts = ["<h2>Config</h2>"]
    overrides = _overrides(run_dir)
    parts.append(
        "<p>Command-line overrides: "
        + (", ".join(f"<code>{_e(o)}</code>" for o in overrides) or "none")
        + "</p>"
    )
    try:
        baseline, name = _baseline(run_dir, training_dir)
        diffs = config_differences(cfg, baseline)
    except Exception as exc:  # noqa: BLE001 - e.g. configs edited since the run started
        parts.append(f'<p class="note">Could not compose the defaults to compare: {_e(exc)}</p>')
    else:
        parts.append(f"<p>{len(diffs)} value(s) differ from the {_e(name)}:</p>")
        if diffs:
            parts.append(
                _table(
                    ["key", _e(name), "this run"],
                    [(f"<code>{_e(k)}</code>", _e(_value(a)), _e(_value(b))) for k, a, b in diffs],
                    name_columns=3,
                )
            )
    yaml = OmegaConf.to_yaml(cfg, resolve=False)
    parts.append(f"<details><summary>Full config</summary><pre>{_e(yaml)}</pre></details>")
    return "".join(parts)


def _environment_section(run_dir: Path) -> str:
    rows = [("python", sys.version.split()[0]), ("platform", platform.platform())]
    for package in PACKAGES:
        try:
            rows.append((package, importlib.metadata.version(package)))
        except importlib.metadata.PackageNotFoundError:
            continue
    devices_file = run_dir / "devices.json"
    if devices_file.is_file():
        info = json.loads(devices_file.read_text())
    else:  # mode=eval does not record devices; describe those of this process
        from seg_train.training import devices

        info = devices.describe()
    gpus = info.get("gpus") or []
    described = "; ".join(
        f"{g.get('name')}: {g.get('model')} (compute capability {g.get('compute_capability')}, "
        f"{g.get('memory_gb') or '?'} GB)"
        for g in gpus
    )
    rows += [
        ("devices", described or f"CPU only ({info.get('cpu_cores')} cores)"),
        ("CUDA / cuDNN (build)", f"{info.get('cuda_version')} / {info.get('cudnn_version')}"),
        ("CUDA_VISIBLE_DEVICES", str(info.get("cuda_visible_devices"))),
    ]
    return "<h2>Environment</h2>" + _table(
        ["", "version / value"], [(_e(a), _e(b)) for a, b in rows], name_columns=2
    )
