"""kill -9 at every phase of a training run, then `trainer.resume`: the run ends as if never
interrupted. One run per run dir. A resume never rewrites the run's config.

The kills are placed exactly, not by timing: a driver process patches the function of the
chosen phase to SIGKILL itself at its n-th call, then runs the real CLI. The uninterrupted
reference and the interrupted run use the same seed in deterministic mode, so their
validation numbers agree up to float noise.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from seg_train.tasks import run_lock
from seg_train.training import backup
from tests.helpers import TINY_TRAIN, cli_command, cli_env, error_lines, run_cli

EPOCHS, STEPS = 3, 3  # TINY_TRAIN: 24 images in batches of 8
# A backup every 2 batches: mid-epoch ones (steps 2, 4, 8) and one at an epoch's last batch
# (step 6, the end of epoch 2), besides the epoch-end backups (steps 3, 6, 9).
RUN = [
    *TINY_TRAIN,
    f"trainer.epochs={EPOCHS}",
    "trainer.backup_every_steps=2",
    "trainer.deterministic=true",
    "trainer.verbose=0",
    "eval.num_samples=0",
    "callbacks.tensorboard=null",
    "callbacks.prediction_images=null",
]

# Runs the CLI with one function patched to SIGKILL the process at its n-th call, before
# ("before") or after ("after") the original runs: argv = PHASE N CLI-ARGS...
DRIVER = """
import os, signal, sys

phase, nth = sys.argv[1], int(sys.argv[2])
sys.argv = ["seg-train", *sys.argv[3:]]
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if phase == "start-up":  # before training starts: no backup yet
    from seg_train.training import fit as owner
    name, when = "fit_from", "before"
elif phase == "checkpoint":  # best.keras written under its temporary name, not renamed
    import keras
    owner, name, when = keras.Model, "save", "after"
elif phase == "history":  # the epoch's CSV row written, its epoch-end backup not
    import keras
    owner, name, when = keras.callbacks.CSVLogger, "on_epoch_end", "after"
elif phase == "backup":  # a backup's weights written to its staging folder, no state.json
    import keras
    owner, name, when = keras.Model, "save_weights", "after"
elif phase == "validation":  # the epoch's validation, after its last batch's backup
    from seg_train.tasks.evaluate import SplitEvaluator as owner
    name, when = "confusion", "before"
original = getattr(owner, name)
calls = [0]

def dying(*args, **kwargs):
    calls[0] += 1
    if calls[0] == nth and when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    result = original(*args, **kwargs)
    if calls[0] == nth and when == "after":
        os.kill(os.getpid(), signal.SIGKILL)
    return result

setattr(owner, name, dying)
from seg_train.cli import main
main()
"""


def kill_at(phase, nth, args, cache, cwd):
    result = subprocess.run(
        [sys.executable, "-c", DRIVER, phase, str(nth), *args],
        cwd=cwd,
        env=cli_env(cache),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == -signal.SIGKILL, (phase, result.stderr[-3000:])


def val_history(run_dir):
    """history.csv as (epoch, val_mean_iou) rows."""
    lines = (run_dir / "history.csv").read_text().splitlines()
    header = lines[0].split(",")
    rows = [dict(zip(header, line.split(","))) for line in lines[1:]]
    return [(int(r["epoch"]), float(r["val_mean_iou"])) for r in rows]


def leftovers(run_dir):
    """Temporary files a killed process left."""
    return sorted(
        str(p.relative_to(run_dir))
        for pattern in (".backup.tmp-*", "checkpoints/.tmp-*", ".*.tmp-*")
        for p in run_dir.glob(pattern)
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
    work = tmp_path_factory.mktemp("reference")
    result = run_cli([*RUN, f"hydra.run.dir={work / 'run'}"], cache_dir, work, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "DataStallMonitor: not measured with trainer.deterministic=true" in (
        result.stdout + result.stderr
    )
    return work / "run"


@pytest.mark.slow
def test_kill_9_at_every_phase_then_resume_equals_the_uninterrupted_run(
    reference, cache_dir, tmp_path
):
    run_dir = tmp_path / "run"
    resume_args = [f"trainer.resume={run_dir}"]
    # 1. Killed at start-up, before any backup: the resume starts it again in the same dir.
    kill_at("start-up", 1, [*RUN, f"hydra.run.dir={run_dir}"], cache_dir, tmp_path)
    assert backup.load_state(run_dir) is None
    overrides = (run_dir / ".hydra" / "overrides.yaml").read_bytes()
    # 2. Killed while writing epoch 1's best.keras: the temporary stays; backup (epoch 1, 2).
    kill_at("checkpoint", 1, resume_args, cache_dir, tmp_path)
    assert leftovers(run_dir) and leftovers(run_dir)[0].startswith("checkpoints/.tmp-")
    # 3. Killed after epoch 1's CSV row, before its epoch-end backup: the row is there.
    kill_at("history", 1, resume_args, cache_dir, tmp_path)
    assert [epoch for epoch, _ in val_history(run_dir)] == [0]
    # 4. Killed mid-backup (the one at step 4): a staging folder with weights only.
    kill_at("backup", 2, resume_args, cache_dir, tmp_path)
    assert any(name.startswith(".backup.tmp-") for name in leftovers(run_dir))
    # 5. Killed in epoch 2's validation, after the backup written at its last batch.
    kill_at("validation", 1, resume_args, cache_dir, tmp_path)
    state, _ = backup.load_state(run_dir)
    assert (state.epoch, state.step) == (2, 0)
    assert "loss" in state.pending_epoch_end  # epoch 2's training logs, as Keras keeps them
    # 6. The last resume finishes: within minutes, not forever.
    result = run_cli(resume_args, cache_dir, tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    final, _ = backup.load_state(run_dir)
    assert final.finished and final.epoch == EPOCHS
    assert final.global_step == EPOCHS * STEPS  # every step once: none lost, none repeated
    assert leftovers(run_dir) == []
    history, expected = val_history(run_dir), val_history(reference)
    assert [epoch for epoch, _ in history] == list(range(EPOCHS))  # each epoch once
    for (_, value), (_, reference_value) in zip(history, expected):
        assert value == pytest.approx(reference_value, abs=1e-5)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    reference_metrics = json.loads((reference / "metrics.json").read_text())
    print(
        f"val mIoU per epoch: killed 5 times {history}, uninterrupted {expected}; final "
        f"mIoU {metrics['mean_iou']} vs {reference_metrics['mean_iou']}"
    )
    assert metrics["mean_iou"] == pytest.approx(reference_metrics["mean_iou"], abs=1e-5)
    # The resumes left the run's config alone and logged themselves separately.
    assert (run_dir / ".hydra" / "overrides.yaml").read_bytes() == overrides
    assert (run_dir / "resume_overrides.yaml").read_text().count("overrides: []") == 5


def test_a_resume_that_changes_the_model_is_refused_and_changes_nothing(cache_dir, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    saved = b"- model.base_filters=8\n- data.crop_size=[64,64]\n"
    (run_dir / ".hydra" / "overrides.yaml").write_bytes(saved)
    before = sorted(p.name for p in run_dir.rglob("*"))
    result = run_cli(
        [f"trainer.resume={run_dir}", "model.base_filters=16"], cache_dir, tmp_path, timeout=120
    )
    assert result.returncode == 2
    (line,) = error_lines(result)
    assert "model.base_filters=16" in line and "model.base_filters=8" in line
    assert (run_dir / ".hydra" / "overrides.yaml").read_bytes() == saved
    assert sorted(p.name for p in run_dir.rglob("*")) == before


def _finished_yaml(path: Path) -> bytes:
    """A YAML file's bytes once its writer is done (YAML dumps end with a newline), else b""."""
    content = path.read_bytes() if path.is_file() else b""
    return content if content.endswith(b"\n") else b""


def test_a_second_run_into_a_busy_run_dir_exits_2_naming_the_holder(cache_dir, tmp_path):
    run_dir = tmp_path / "run"
    first = subprocess.Popen(
        cli_command([*RUN, f"hydra.run.dir={run_dir}"]),
        cwd=tmp_path,
        env=cli_env(cache_dir),
        text=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.time() + 120
        # Once written: the file exists a moment before Hydra has written its YAML into it.
        while not (overrides := _finished_yaml(run_dir / ".hydra" / "overrides.yaml")):
            assert time.time() < deadline, "the first run never wrote .hydra/overrides.yaml"
            time.sleep(0.1)
        second = run_cli(
            [*RUN, "model.base_filters=8", f"hydra.run.dir={run_dir}"],
            cache_dir,
            tmp_path,
            timeout=120,
        )
        assert second.returncode == 2
        (line,) = error_lines(second)
        assert f"PID {first.pid} on {socket.gethostname()}" in line and str(run_dir) in line
        assert (run_dir / ".hydra" / "overrides.yaml").read_bytes() == overrides
    finally:
        first.send_signal(signal.SIGTERM)
        _, stderr = first.communicate(timeout=120)
    # SIGTERM in any phase: one line with the resume command, exit 75.
    assert first.returncode == 75, stderr[-3000:]
    assert f"continue with: seg-train trainer.resume={run_dir}" in stderr.splitlines()[-1]


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = tmp_path / run_lock.LOCK_NAME
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "since": "-"}))
    assert run_lock.acquire(tmp_path)
    try:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    finally:
        run_lock.release(tmp_path)
    assert not lock.exists()


def test_a_live_holder_keeps_the_lock_until_it_dies(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from seg_train.tasks import run_lock; "
            f"run_lock.acquire({str(tmp_path)!r}); print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(run_lock.RunDirInUse, match=f"PID {holder.pid} on "):
            run_lock.acquire(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    # SIGKILL left the lock file; the kernel dropped the lock with the process.
    assert (tmp_path / run_lock.LOCK_NAME).exists()
    assert run_lock.acquire(tmp_path)
    run_lock.release(tmp_path)


def test_a_resume_may_change_the_epochs_and_records_the_change(tmp_path):
    from omegaconf import OmegaConf

    from seg_train import cli

    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text("- trainer.epochs=3\n- seed=5\n")
    args = cli.prepare_args([f"trainer.resume={tmp_path}", "trainer.epochs=30", "seed=5"])
    # The run's own overrides, the change after them (it wins), and .hydra/ left alone.
    assert args.index("trainer.epochs=30") > args.index("trainer.epochs=3")
    assert args.count("seed=5") == 1 and "hydra.output_subdir=null" in args
    cli._record_resume(tmp_path, cli._resume_changes)
    cli._record_resume(tmp_path, [])
    log = OmegaConf.load(tmp_path / cli.RESUME_LOG)
    assert [list(entry.overrides) for entry in log] == [["trainer.epochs=30"], []]
