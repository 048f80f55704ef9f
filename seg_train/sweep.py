"""The sweep leaderboard: a Hydra callback that ranks the jobs of a multirun.

After every job (so a crashed or partially failed sweep still leaves a summary, and parallel
launchers need no coordination) it records the job's status in `job_status.json` and rewrites
`sweep_summary.csv` and `sweep_summary.md` in the sweep dir from all job dirs found there,
ranked by the job's `optimized_metric` from its `metrics.json`. Imports no TensorFlow.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from seg_train.files import write_json_atomic

log = logging.getLogger(__name__)

STATUS_FILE = "job_status.json"
SUMMARY_COLUMNS = ("rank", "job", "status", "metric", "value", "overrides", "run_dir", "error")


def collect_jobs(sweep_dir: Path, metric: str) -> list[dict[str, Any]]:
    """One row per job dir under `sweep_dir` (named by job number), unranked."""
    rows = []
    for job_dir in sorted(
        (d for d in sweep_dir.iterdir() if d.name.isdigit()), key=lambda d: int(d.name)
    ):
        status_file, metrics_file = job_dir / STATUS_FILE, job_dir / "metrics.json"
        status = json.loads(status_file.read_text()) if status_file.is_file() else {}
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        overrides_file = job_dir / ".hydra" / "overrides.yaml"
        overrides = [
            line.removeprefix("- ").strip()
            for line in (
                overrides_file.read_text().splitlines() if overrides_file.is_file() else []
            )
        ]
        rows.append(
            {
                "job": int(job_dir.name),
                "status": status.get("status", "completed" if metrics else "unknown"),
                "metric": metric,
                "value": metrics.get(metric),
                "overrides": " ".join(overrides),
                "run_dir": str(job_dir),
                "error": status.get("error", ""),
            }
        )
    return rows


def varying_overrides(rows: list[dict[str, Any]]) -> list[str]:
    """Per row, only the overrides that differ between jobs (what the sweep is about)."""
    sets = [set(r["overrides"].split()) for r in rows]
    common = set.intersection(*sets) if len(sets) > 1 else set()
    return [" ".join(o for o in r["overrides"].split() if o not in common) for r in rows]


def rank_jobs(rows: list[dict[str, Any]], mode: str = "max") -> list[dict[str, Any]]:
    """Sorts completed jobs best first (failed and unscored last) and numbers their ranks."""
    scored = [r for r in rows if r["value"] is not None]
    unscored = [r for r in rows if r["value"] is None]
    scored.sort(key=lambda r: r["value"], reverse=(mode == "max"))
    for rank, row in enumerate(scored, start=1):
        row["rank"] = rank
    for row in unscored:
        row["rank"] = ""
    return scored + unscored


def write_summary(sweep_dir: Path, rows: list[dict[str, Any]]) -> None:
    """Writes sweep_summary.csv and sweep_summary.md atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    _write_atomic(sweep_dir / "sweep_summary.csv", buffer.getvalue())
    lines = [
        "| " + " | ".join(SUMMARY_COLUMNS) + " |",
        "|" + "---|" * len(SUMMARY_COLUMNS),
    ]
    # The table shows what varies between jobs; the CSV keeps every override.
    for row, swept in zip(rows, varying_overrides(rows)):
        value = row["value"]
        cells = {
            **row,
            "overrides": swept,
            "value": f"{value:.4f}" if isinstance(value, float) else "-",
        }
        lines.append(
            "| " + " | ".join(str(cells[c]).replace("|", "\\|") for c in SUMMARY_COLUMNS) + " |"
        )
    _write_atomic(sweep_dir / "sweep_summary.md", "\n".join(lines) + "\n")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class SweepSummary(Callback):
    """Hydra callback keeping `sweep_summary.{csv,md}` up to date in a multirun's sweep dir.

    Args:
        mode: "max" ranks larger metric values first, "min" smaller ones.
    """

    def __init__(self, mode: str = "max"):
        self.mode = mode

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        hydra_cfg = config.hydra
        if hydra_cfg.mode != RunMode.MULTIRUN:
            return
        job_dir = Path(hydra_cfg.runtime.output_dir)
        failed = job_return.status == JobStatus.FAILED
        error = job_return._return_value if failed else None
        write_json_atomic(
            job_dir / STATUS_FILE,
            {
                "status": "failed" if failed else "completed",
                "error": " ".join(str(error).split())[:300] if error is not None else "",
            },
        )
        sweep_dir = Path(hydra_cfg.sweep.dir)
        rows = rank_jobs(collect_jobs(sweep_dir, config.optimized_metric), self.mode)
        write_summary(sweep_dir, rows)
        log.info("Sweep summary: %s", sweep_dir / "sweep_summary.md")
