"""Crash safety: kill -9 and SIGTERM then resume, atomic checkpoints, the NaN guard."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

import seg_train.training.losses  # noqa: F401  (registers the loss saved with the model)
from seg_train.data import pipeline
from seg_train.data.base import Source
from seg_train.data.options import PipelineOptions
from seg_train.data.readers import Pair
from seg_train.errors import Preempted
from seg_train.training import backup, fit, preemption
from seg_train.training.callbacks import AtomicModelCheckpoint, BackupCallback, NaNGuard
from tests.helpers import cli_command, cli_env, error_lines, run_cli

EPOCHS, STEPS = 3, 8
RESUMABLE = [
    "data.source.num_train=32",
    "data.source.num_val=8",
    "data.source.image_size=32",
    "data.crop_size=[32,32]",
    "data.batch_size=4",
    "model.base_filters=4",
    "model.depth=3",
    f"trainer.epochs={EPOCHS}",
    f"trainer.steps_per_epoch={STEPS}",
    "trainer.backup_every_steps=3",
    "eval.num_samples=0",
    "callbacks.tensorboard=null",
    "callbacks.prediction_images=null",
]


def start(args, cache, cwd):
    return subprocess.Popen(
        cli_command(args),
        cwd=cwd,
        env=cli_env(cache),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def backup_state(run_dir):
    found = backup.load_state(run_dir)
    return found[0] if found else None


def finish(run_dir, cache, cwd):
    """Resumes (or restarts, if no backup was written yet) until the run completes."""
    args = (
        [f"trainer.resume={run_dir}"]
        if backup_state(run_dir)
        else [*RESUMABLE, f"hydra.run.dir={run_dir}"]
    )
    result = run_cli(args, cache, cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def assert_completed(run_dir):
    state = backup_state(run_dir)
    assert state.finished and state.epoch == EPOCHS
    # Every optimizer step was done exactly once overall: no restart from zero, none skipped.
    assert state.global_step == EPOCHS * STEPS
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert 0.0 <= metrics["mean_iou"] <= 1.0
    keras.saving.load_model(run_dir / "checkpoints" / "best.keras", safe_mode=True)
    return metrics["mean_iou"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache_dir):
    work = tmp_path_factory.mktemp("plain")
    result = run_cli([*RESUMABLE, f"hydra.run.dir={work / 'run'}"], cache_dir, work)
    assert result.returncode == 0, result.stderr[-3000:]
    return assert_completed(work / "run")


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(5))
def test_kill_9_at_a_random_moment_then_resume(seed, uninterrupted, cache_dir, tmp_path):
    run_dir = tmp_path / "run"
    process = start([*RESUMABLE, f"hydra.run.dir={run_dir}"], cache_dir, tmp_path)
    # TensorFlow takes a few seconds to start; training itself a few more.
    time.sleep(random.Random(seed).uniform(6.0, 13.0))
    process.send_signal(signal.SIGKILL)
    process.communicate()
    finish(run_dir, cache_dir, tmp_path)
    # The data order continues across a resume, but without trainer.deterministic the float
    # results may drift; test_tasks_train_resume_kills.py compares deterministic runs exactly.
    assert assert_completed(run_dir) == pytest.approx(uninterrupted, abs=0.2)


@pytest.mark.slow
def test_sigterm_mid_epoch_writes_a_backup_and_resume_continues(cache_dir, tmp_path):
    run_dir = tmp_path / "run"
    process = start([*RESUMABLE, f"hydra.run.dir={run_dir}"], cache_dir, tmp_path)
    deadline = time.time() + 120
    # Wait until training is under way (the first step backup), then stop it mid-epoch.
    while backup_state(run_dir) is None and time.time() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == Preempted.exit_code, stderr[-3000:]
    assert "stopped by SIGTERM" in stderr and f"trainer.resume={run_dir}" in stderr
    stopped = backup_state(run_dir)
    assert 0 < stopped.global_step < EPOCHS * STEPS
    result = finish(run_dir, cache_dir, tmp_path)
    assert f"optimizer step {stopped.global_step}" in result.stdout + result.stderr
    assert_completed(run_dir)
    # Asking a finished run to resume says so and succeeds.
    again = run_cli([f"trainer.resume={run_dir}"], cache_dir, tmp_path)
    assert again.returncode == 0 and "is complete" in again.stdout + again.stderr
    # Asking it for more epochs is refused in one line, before anything is written.
    report = (run_dir / "metrics.json").read_bytes()
    config = (run_dir / "config_resolved.yaml").read_bytes()
    longer = run_cli(
        [f"trainer.resume={run_dir}", f"trainer.epochs={EPOCHS + 1}"], cache_dir, tmp_path
    )
    assert longer.returncode == 2
    (line,) = error_lines(longer)
    assert f"finished after {EPOCHS} epochs" in line and f"trainer.epochs={EPOCHS + 1}" in line
    assert (run_dir / "metrics.json").read_bytes() == report
    assert (run_dir / "config_resolved.yaml").read_bytes() == config


def test_more_epochs_for_a_finished_run_are_refused_fewer_or_equal_are_not(tmp_path):
    """The refusal reads the run's backup state (written here by hand: 3 epochs done)."""
    from seg_train.cli import _refuse_extending_a_finished_run
    from seg_train.errors import UserError

    folder = tmp_path / "backup"
    folder.mkdir()
    (folder / "state.weights.h5").write_bytes(b"")
    for finished in (True, False):
        (folder / "state.json").write_text(json.dumps({"epoch": 3, "finished": finished}))
        for asked in (2, 3):
            _refuse_extending_a_finished_run(tmp_path, [], [f"trainer.epochs={asked}"])
        if finished:
            with pytest.raises(UserError, match="finished after 3 epochs"):
                _refuse_extending_a_finished_run(tmp_path, [], ["trainer.epochs=4"])
        else:  # an unfinished run may be given more epochs
            _refuse_extending_a_finished_run(tmp_path, [], ["trainer.epochs=4"])
    # A run sized by trainer.total_steps is not compared in epochs.
    (folder / "state.json").write_text(json.dumps({"epoch": 3, "finished": True}))
    saved = ["trainer.total_steps=100"]
    _refuse_extending_a_finished_run(tmp_path, saved, ["trainer.epochs=4"])


def test_resume_without_a_backup_is_a_clear_error(cache_dir, tmp_path):
    result = run_cli([f"trainer.resume={tmp_path}"], cache_dir, tmp_path)
    assert result.returncode == 2
    (line,) = error_lines(result)
    assert "not a training run dir" in line and str(tmp_path) in line


def tiny_model():
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="mse")
    return model


def test_backup_round_trip_restores_weights_and_optimizer_slots(tmp_path):
    model = tiny_model()
    model.fit(np.ones((8, 4)), np.ones((8, 2)), epochs=3, verbose=0)
    backup.write_backup(tmp_path, model, backup.TrainingState(epoch=2, step=5, best=0.5))
    backup.write_backup(tmp_path, model, backup.TrainingState(epoch=3, step=1, best=0.6))
    state, weights = backup.load_state(tmp_path)
    assert (state.epoch, state.step, state.best) == (3, 1, 0.6)
    assert not (tmp_path / backup.PREVIOUS).exists()
    fresh = tiny_model()
    fresh.optimizer.build(fresh.trainable_variables)
    fresh.load_weights(weights)
    assert int(fresh.optimizer.iterations.numpy()) == 3
    for a, b in zip(model.optimizer.variables, fresh.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_previous_backup_is_used_when_the_swap_was_interrupted(tmp_path):
    model = tiny_model()
    backup.write_backup(tmp_path, model, backup.TrainingState(epoch=1))
    # A kill between the two renames leaves only backup.prev/.
    (tmp_path / backup.BACKUP).rename(tmp_path / backup.PREVIOUS)
    state, weights = backup.load_state(tmp_path)
    assert state.epoch == 1 and weights.parent.name == backup.PREVIOUS


def test_failed_checkpoint_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = tiny_model()
    path = tmp_path / "best.keras"
    checkpoint = AtomicModelCheckpoint(str(path), monitor="loss", save_best_only=False)
    checkpoint.set_model(model)
    checkpoint._save_model(epoch=0, batch=None, logs={"loss": 1.0})
    before = path.read_bytes()

    def crash_mid_write(filepath, *args, **kwargs):
        with open(filepath, "wb") as f:
            f.write(b"half a zip file")
        raise OSError("disk full")

    monkeypatch.setattr(model, "save", crash_mid_write)
    with pytest.raises(OSError):
        checkpoint._save_model(epoch=1, batch=None, logs={"loss": 0.5})
    assert path.read_bytes() == before
    keras.saving.load_model(path)
    assert list(tmp_path.iterdir()) == [path]  # no temporary left behind


def test_nan_guard_stops_at_the_first_non_finite_loss():
    model = tiny_model()
    x = np.ones((8, 4), np.float32)
    y = np.full((8, 2), np.inf, np.float32)
    guard = NaNGuard("optimizer.learning_rate=0.1")
    with pytest.raises(backup.NonFiniteLoss, match=r"epoch 1, batch 1 \(step 1\).*learning rate"):
        model.fit(x, y, epochs=2, batch_size=4, callbacks=[guard], verbose=0)
    assert int(model.optimizer.iterations.numpy()) == 1


# --- A backup is never "at the end" of an epoch; resume runs the pending end once -------------


class Died(Exception):
    """Stands for a kill between an epoch's CSV row and its epoch-end backup."""


class DieAtFirstEpochEnd(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        raise Died


def csv_rows(path):
    lines = path.read_text().splitlines()
    header = lines[0].split(",")
    return [dict(zip(header, line.split(","))) for line in lines[1:]]


def test_backup_after_the_last_batch_records_the_next_epoch_and_resume_runs_its_end_once(
    tmp_path,
):
    x = np.arange(48, dtype=np.float32).reshape(12, 4) / 48
    y = np.ones((12, 2), np.float32)
    csv = tmp_path / "history.csv"
    # 12 samples in batches of 4: 3 batches per epoch; a backup every 3 batches falls on the
    # epoch's last batch, before the CSV row; the process then dies before the epoch-end backup.
    first = tiny_model()
    callbacks = [
        keras.callbacks.CSVLogger(str(csv)),
        DieAtFirstEpochEnd(),
        BackupCallback(tmp_path, 3, None, backup.TrainingState(), steps_per_epoch=3),
    ]
    with pytest.raises(Died):
        first.fit(x, y, batch_size=4, epochs=2, callbacks=callbacks, shuffle=False, verbose=0)
    state, weights = backup.load_state(tmp_path)
    # Epoch 1 (0-based 0) is trained: the position is epoch 2, batch 0, with epoch 1's end due.
    assert (state.epoch, state.step, state.global_step) == (1, 0, 3)
    assert set(state.pending_epoch_end) == {"loss"}
    (row,) = csv_rows(csv)
    assert row["epoch"] == "0"

    second = tiny_model()
    callbacks = [
        keras.callbacks.CSVLogger(str(csv)),
        BackupCallback(tmp_path, 3, None, state, steps_per_epoch=3),
    ]
    fit.restore(second, weights, state, callbacks)
    starts = []

    def batches(start_batch):
        starts.append(start_batch)
        return tf.data.Dataset.from_tensor_slices((x, y)).batch(4).repeat()

    fit.fit_from(second, batches, None, state, 3, 2, callbacks, validation_freq=1, verbose=0)
    rows = csv_rows(csv)
    assert [r["epoch"] for r in rows] == ["0", "1"]  # each epoch once
    # Epoch 1's row was written again from the saved logs: the first process's numbers.
    assert rows[0]["loss"] == row["loss"]
    assert starts == [3]  # the second epoch's data starts after the 3 batches of the first
    final, _ = backup.load_state(tmp_path)
    assert (final.epoch, final.step, final.global_step, final.pending_epoch_end) == (2, 0, 6, None)


def test_an_old_backup_at_the_end_of_an_epoch_is_read_as_the_next_epoch():
    # Written by earlier versions at the last of 20 batches: "epoch 1, batch 20 of 20".
    old = backup.TrainingState(epoch=0, step=20, global_step=20)
    state = backup.normalise(old, steps_per_epoch=20)
    assert (state.epoch, state.step, state.pending_epoch_end) == (1, 0, {})
    assert backup.normalise(backup.TrainingState(0, 19), 20) == backup.TrainingState(0, 19)


def test_stale_temporaries_of_any_process_are_removed(tmp_path):
    keep = [tmp_path / "backup" / "state.json", tmp_path / "checkpoints" / "best.keras"]
    stale = [
        tmp_path / ".backup.tmp-4242" / "state.weights.h5",  # killed mid-backup
        tmp_path / "checkpoints" / ".tmp-4243-best.keras",  # killed mid-checkpoint
        tmp_path / "backup" / ".state.json.tmp-4244",  # killed in mark_finished
        tmp_path / ".metrics.json.tmp-4245",  # killed writing metrics.json
    ]
    for path in keep + stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    backup.remove_stale_temporaries(tmp_path)
    assert all(path.exists() for path in keep)
    assert not any(path.exists() for path in stale)
    assert not (tmp_path / ".backup.tmp-4242").exists()


# --- The data order is a function of (seed, position): a resume continues it ----------------


class IndexSource(Source):
    """Six 8x8 examples; channel 0 holds the example's index, channel 1 a column ramp (so
    crops and flips show), the mask is index % 3."""

    def records(self, split):
        names = [str(i) for i in range(6)]
        return tf.data.Dataset.from_tensor_slices((names, names, names))

    def load(self, name, image, mask):
        index = int(name)
        pixels = np.zeros((8, 8, 3), np.uint8)
        pixels[..., 0] = index
        pixels[..., 1] = np.arange(8) * 30
        return Pair(pixels, np.full((8, 8), index % 3, np.uint8), f"{name}.jpg", f"{name}.png")


def stream_config(cache):
    return PipelineOptions.from_mapping(
        dict(
            crop_size=[6, 6],
            scale_range=[0.8, 1.2],
            hflip=True,
            ignore_label=255,
            batch_size=4,
            cache=cache,
            shuffle_buffer=8,
            num_parallel_calls=None,
            flip_pairs=[],
            transform="crop",
            pad_value=0,
            jitter=dict(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0),
        )
    )


@pytest.mark.parametrize("cache", [False, True])
def test_a_stream_started_at_a_batch_is_the_uninterrupted_stream_from_there(cache):
    data = stream_config(cache)

    def batches(start, count):
        stream = pipeline.train_dataset(IndexSource(), data, 7, repeat=True, start_batch=start)
        return [(i.numpy(), m.numpy()) for i, m in stream.take(count)]

    whole = batches(0, 9)
    # Batch 5 starts at example 20 of the stream: pass 4 (of 6 examples), 2 examples in.
    for (image, mask), (expected_image, expected_mask) in zip(batches(5, 4), whole[5:]):
        np.testing.assert_array_equal(image, expected_image)
        np.testing.assert_array_equal(mask, expected_mask)
    # Each pass of 6 consecutive examples holds every example once, and the passes differ.
    order = np.concatenate([image[:, 0, 0, 0] for image, _ in whole]).astype(int)
    passes = [order[k : k + 6] for k in range(0, 36, 6)]
    assert all(sorted(p) == list(range(6)) for p in passes)
    assert len({tuple(p) for p in passes}) > 1


# --- SIGTERM / SIGINT at every phase: a backup where one is due, then Preempted (exit 75) ----


@pytest.fixture
def own_signal_handlers():
    """Puts the test process's SIGTERM/SIGINT handlers back (a Preempted fit leaves ours)."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


class SigtermAt(keras.callbacks.Callback):
    """Sends this process SIGTERM at the first call of the named hook."""

    def __init__(self, hook):
        super().__init__()
        self.sent = False
        setattr(self, hook, self._send)

    def _send(self, *args, **kwargs):
        if not self.sent:
            self.sent = True
            signal.raise_signal(signal.SIGTERM)


def fit_until_preempted(tmp_path, hook, **fit_args):
    x = np.ones((12, 4), np.float32)
    y = np.ones((12, 2), np.float32)
    model = tiny_model()
    callbacks = [
        SigtermAt(hook),
        BackupCallback(tmp_path, 0, None, backup.TrainingState(), steps_per_epoch=3),
    ]
    with pytest.raises(Preempted) as stopped:
        model.fit(x, y, batch_size=4, epochs=2, callbacks=callbacks, verbose=0, **fit_args)
    return str(stopped.value), backup.load_state(tmp_path)[0]


def test_sigterm_in_an_epoch_end_callback_stops_after_the_epoch_end_backup(
    tmp_path, own_signal_handlers
):
    # e.g. the original-resolution validation, the checkpoint or the CSV row of the last epoch
    message, state = fit_until_preempted(tmp_path, "on_epoch_end")
    assert "stopped by SIGTERM at the end of epoch 1" in message
    assert f"trainer.resume={tmp_path}" in message
    assert (state.epoch, state.step, state.pending_epoch_end) == (1, 0, None)


def test_sigterm_during_fit_validation_stops_at_once_with_the_epoch_end_pending(
    tmp_path, own_signal_handlers
):
    x = np.ones((4, 4), np.float32)
    y = np.ones((4, 2), np.float32)
    message, state = fit_until_preempted(
        tmp_path, "on_test_batch_begin", validation_data=(x, y), validation_batch_size=1
    )
    assert "stopped by SIGTERM during the validation of epoch 1" in message
    assert (state.epoch, state.step, state.global_step) == (1, 0, 3)
    assert "loss" in state.pending_epoch_end


def test_sigterm_outside_training_stops_at_once_with_the_resume_command(
    tmp_path, own_signal_handlers
):
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text("[]\n")
    preemption.stop_on_signals(tmp_path, "the final evaluation")
    with pytest.raises(Preempted) as stopped:
        signal.raise_signal(signal.SIGTERM)
    message = str(stopped.value)
    assert message.startswith("stopped by SIGTERM during the final evaluation")
    assert message.endswith(f"continue with: seg-train trainer.resume={tmp_path}")
