"""`seg-train mode=check`: the dataset doctor.

Reads every pair of the selected splits through the dataset's own decoder (so it sees exactly
what training would see, the dataset's label mapping and data.label_map included) and reports
missing or unpaired files, unreadable files, image/mask size mismatches, colour masks where ids
are expected, label values outside {0..num_classes-1, ignore}, 0/255 masks where 0/1 ids are
expected, the label histogram and the per-class pixel frequencies with median-frequency class
weights (Eigen & Fergus 2015, https://arxiv.org/abs/1411.4734; only for data without problems).
The report is printed, written to `check.json` in the run dir, and any problem makes the
command exit with status 1. The scan itself (`scan_split`, `Tally`) is `seg_train.data.stats`,
which training's `class_weights: auto` shares.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from seg_train.data.base import Source
from seg_train.data.stats import Tally, scan_split
from seg_train.errors import UserError
from seg_train.files import ensure_fresh_run_dir, write_json_atomic
from seg_train.tasks.sources import build_source

log = logging.getLogger(__name__)

REPORT_NAME = "check.json"
# Exit status when the data has problems; 2 stays reserved for usage errors.
EXIT_PROBLEMS_FOUND = 1


def check_dataset(
    source: Source, data: DictConfig, splits: list[str] | None = None, workers: int | None = None
) -> dict:
    """Scans the splits (default: all the dataset defines) and returns the report."""
    class_names = list(data.class_names)
    tally = Tally(data.num_classes)
    report: dict = {
        "dataset": data.name,
        "root": _root(data),
        "num_classes": data.num_classes,
        "ignore_label": source.ignore_label,
        "splits": {},
        "num_pairs": 0,
        "errors": [],
        "notes": [],
    }
    seen: dict[str, str] = {}
    for split in splits or list(source.splits):
        source.check_split(split)
        origin = source.describe_split(split)
        if origin in seen:  # e.g. Oxford-IIIT Pet validates on its test split by default
            report["notes"].append(
                f"split {split} is the same data as split {seen[origin]}; checked once"
            )
            continue
        seen[origin] = split
        try:
            checked, errors = scan_split(source, split, tally, workers or os.cpu_count() or 1)
        except UserError as exc:  # the split itself is missing or empty
            checked, errors = 0, [{"split": split, "file": origin, "problem": str(exc)}]
        report["splits"][split] = {
            "source": origin,
            "num_pairs": checked,
            "num_errors": len(errors),
        }
        report["num_pairs"] += checked
        report["errors"] += errors
    report["num_errors"] = len(report["errors"])
    _dataset_level_checks(report, tally, source.ignore_label, data.num_classes)
    report["label_histogram"] = {str(v): int(n) for v, n in enumerate(tally.histogram) if n}
    # Weights computed from data just called broken would only mislead (e.g. [1, 0] for 0/255
    # masks, which trains nothing): none are suggested until the check passes.
    weights = None if report["errors"] else tally.class_weights()
    if report["errors"]:
        report["notes"].append(
            "no class weights suggested while the data has problems; fix "
            "them and run the check again"
        )
    report["class_pixels"] = dict(zip(class_names, tally.class_pixels.tolist()))
    report["class_frequency"] = dict(zip(class_names, _nan_to_none(tally.class_frequency())))
    report["class_weights"] = (
        None if weights is None else dict(zip(class_names, [round(w, 6) for w in weights]))
    )
    palette = getattr(source, "palette", None)
    configured = data.get("palette")
    if (
        palette is not None
        and configured is not None
        and ([list(c) for c in configured][: len(palette)] != [list(c) for c in palette])
    ):
        report["notes"].append(
            f"the dataset's palette ({source.palette_origin}) differs from "
            "data.palette, which overlays use"
        )
    return report


def _dataset_level_checks(report: dict, tally: Tally, ignore: int, num_classes: int) -> None:
    present = set(np.flatnonzero(tally.histogram).tolist())
    if num_classes > 2 and ignore in present and present <= {0, ignore}:
        problem = (
            f"every mask holds only 0 and {ignore}: these look like 0/{ignore} binary "
            f"masks, but {ignore} is the ignore label; for two classes use "
            f"'data.label_map={{{ignore}:1}}' data.num_classes=2 with two "
            "data.class_names (or save the foreground as class ids)"
        )
        report["errors"].append({"split": "*", "file": str(report["root"]), "problem": problem})
        report["num_errors"] += 1
    labelled = tally.class_pixels.sum()
    if report["num_pairs"] and labelled == 0:
        report["notes"].append("no mask holds a valid class id")


def _nan_to_none(values) -> list[float | None]:
    return [None if np.isnan(v) else round(float(v), 6) for v in values]


def _root(data: DictConfig) -> str | None:
    root = OmegaConf.select(data, "root", default=None)
    return None if root is None else str(root)


def print_report(report: dict, class_names: list[str], max_printed: int, console: Console) -> None:
    """Prints the splits, the problems (up to `max_printed`), the labels and class weights."""
    splits = Table(title=f"data={report['dataset']}: {report['num_pairs']} pairs checked")
    for column in ("split", "source", "pairs", "problems"):
        splits.add_column(column, justify="right" if column in ("pairs", "problems") else "left")
    for name, info in report["splits"].items():
        splits.add_row(name, info["source"], str(info["num_pairs"]), str(info["num_errors"]))
    console.print(splits)

    if report["errors"]:
        problems = Table(title=f"{report['num_errors']} problems", show_lines=False)
        problems.add_column("file", overflow="fold")
        problems.add_column("problem", overflow="fold")
        for error in report["errors"][:max_printed]:
            problems.add_row(error["file"], error["problem"])
        if report["num_errors"] > max_printed:
            problems.add_row("...", f"{report['num_errors'] - max_printed} more in {REPORT_NAME}")
        console.print(problems)

    total = sum(report["label_histogram"].values())
    labels = Table(title="mask values (after the dataset's label mapping)")
    for column in ("value", "meaning", "pixels", "share"):
        labels.add_column(column, justify="left" if column == "meaning" else "right")
    for value, count in report["label_histogram"].items():
        index = int(value)
        if index == report["ignore_label"]:
            meaning = "ignore"
        else:
            meaning = class_names[index] if index < len(class_names) else "OUT OF RANGE"
        labels.add_row(value, meaning, f"{count:,}", f"{100 * count / total:.2f}%")
    console.print(labels)

    weights = Table(title="class frequency and median-frequency weights")
    for column in ("class", "pixels", "frequency", "weight"):
        weights.add_column(column, justify="left" if column == "class" else "right")
    class_weights = report["class_weights"] or {}
    for name in class_names:
        freq, weight = report["class_frequency"][name], class_weights.get(name)
        weights.add_row(
            name,
            f"{report['class_pixels'][name]:,}",
            "-" if freq is None else f"{freq:.4f}",
            "-" if weight is None else f"{weight:.3f}",
        )
    console.print(weights)
    if class_weights:
        suggested = ",".join(f"{w:.3g}" for w in class_weights.values())
        console.print(
            "Suggested class weights: loss=ce_weighted "
            f"'loss.class_weights=[{suggested}]' (its default class_weights=auto "
            "computes them from the train split)"
        )
    for note in report["notes"]:
        console.print(f"note: {note}")


def run(cfg: DictConfig) -> None:
    """Checks `cfg.data`; writes check.json and exits with status 1 if it found problems."""
    out_dir = Path(cfg.paths.output_dir)
    ensure_fresh_run_dir(out_dir, ignore=(".hydra",))
    if (out_dir / REPORT_NAME).exists():
        raise UserError(
            f"run dir {out_dir} already holds a {REPORT_NAME}; pick a new "
            "hydra.run.dir instead of overwriting it"
        )
    source = build_source(cfg.data)
    check = cfg.get("check") or {}
    splits = list(check.get("splits") or []) or None
    report = check_dataset(source, cfg.data, splits, cfg.data.num_parallel_calls)
    write_json_atomic(out_dir / REPORT_NAME, report)
    print_report(report, list(cfg.data.class_names), int(check.get("max_printed", 20)), Console())
    where = out_dir / REPORT_NAME
    if not report["errors"]:
        log.info(
            "No problems in %d pairs of data=%s; report in %s",
            report["num_pairs"],
            report["dataset"],
            where,
        )
        return
    first = report["errors"][0]
    print(
        f"seg-train: check: {report['num_errors']} problems in data={report['dataset']} "
        f"({report['num_pairs']} pairs checked; first: {first['file']}: {first['problem']}); "
        f"full list in {where}",
        file=sys.stderr,
    )
    sys.exit(EXIT_PROBLEMS_FOUND)
