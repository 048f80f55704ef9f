"""No lost work: full disks and Ctrl-C in eval / infer (issue 19, items 4 and 7).

A full disk is simulated two ways: a writer patched to raise OSError(ENOSPC) (what the kernel
returns) and, where this process may mount one, a real 2 MiB tmpfs. Either way the write must
end in one `DiskFull` line naming the path and the space, leave no partial file, and keep the
last good backup / checkpoint / output byte for byte.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from seg_train import files
from seg_train.errors import UserError
from seg_train.files import DiskFull
from seg_train.tasks import infer, infer_files
from seg_train.training import backup
from seg_train.training.callbacks import AtomicModelCheckpoint
from tests.helpers import cli_command, cli_env, error_lines, run_cli


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tiny_model(units: int = 4) -> keras.Model:
    """A 4-class per-pixel model (the synthetic dataset's class count)."""
    inputs = keras.Input((None, None, 3))
    hidden = keras.layers.Conv2D(units, 1)(inputs)
    model = keras.Model(inputs, keras.layers.Conv2D(4, 1)(hidden))
    model.compile(optimizer="adam", loss="mse")
    return model


def leftovers(folder: Path) -> list[str]:
    """Temporary files or staging folders anywhere under `folder`."""
    return sorted(p.name for p in folder.rglob("*") if ".tmp-" in p.name)


# --- atomic writes ---------------------------------------------------------------------------


def test_write_atomic_out_of_space_keeps_the_old_file(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text('{"mean_iou": 0.5}\n')

    def half_then_enospc(path: Path) -> None:
        path.write_text('{"mean_iou": 0.7')  # a partial write, then the disk is full
        enospc()

    with pytest.raises(DiskFull) as caught:
        files.write_atomic(target, half_then_enospc)
    message = str(caught.value)
    assert str(target) in message and "No space left on device" in message
    assert "free there" in message and "\n" not in message
    assert target.read_text() == '{"mean_iou": 0.5}\n'
    assert leftovers(tmp_path) == []


def test_write_json_atomic_out_of_space(tmp_path, monkeypatch):
    target = tmp_path / "history.json"
    monkeypatch.setattr(Path, "write_text", enospc)
    with pytest.raises(DiskFull, match="history.json"):
        files.write_json_atomic(target, {"loss": [1.0]})
    monkeypatch.undo()
    assert not target.exists() and leftovers(tmp_path) == []


def test_other_os_errors_are_not_disk_full(tmp_path):
    def denied(path: Path) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    with pytest.raises(PermissionError):
        files.write_atomic(tmp_path / "a.png", denied)
    assert leftovers(tmp_path) == []


def test_human_bytes():
    assert files.human_bytes(512) == "512 B"
    assert files.human_bytes(1536) == "1.5 KiB"
    assert files.human_bytes(3 * 1024**3) == "3.0 GiB"


# --- backups and checkpoints -------------------------------------------------------------------


def test_backup_out_of_space_keeps_the_last_good_backup(tmp_path, monkeypatch):
    model = tiny_model()
    backup.write_backup(tmp_path, model, backup.TrainingState(epoch=1, step=3))
    weights = tmp_path / "backup" / "state.weights.h5"
    before = digest(weights)

    def partial_then_enospc(path, *args, **kwargs):
        Path(path).write_bytes(b"\x89HDF partial")
        enospc()

    monkeypatch.setattr(model, "save_weights", partial_then_enospc)
    with pytest.raises(DiskFull) as caught:
        backup.write_backup(tmp_path, model, backup.TrainingState(epoch=2, step=0))
    assert "last good backup was kept" in str(caught.value)
    assert digest(weights) == before
    state, _ = backup.load_state(tmp_path)
    assert (state.epoch, state.step) == (1, 3)
    assert leftovers(tmp_path) == [] and not (tmp_path / "backup.prev").exists()


def test_backup_refused_before_writing_when_free_space_is_short(tmp_path, monkeypatch):
    """h5py crashes after an out-of-space error, so the space is checked before the write."""
    model = tiny_model(units=64)
    backup.write_backup(tmp_path, model, backup.TrainingState(epoch=1))
    weights = tmp_path / "backup" / "state.weights.h5"
    size, before = weights.stat().st_size, digest(weights)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(files.shutil, "disk_usage", lambda path: usage._replace(free=size // 2))
    saved = []
    monkeypatch.setattr(model, "save_weights", lambda *a, **k: saved.append(a))
    with pytest.raises(DiskFull) as caught:
        backup.write_backup(tmp_path, model, backup.TrainingState(epoch=2))
    message = str(caught.value)
    assert saved == [], "the weights writer ran although the space was short"
    # needed: the previous backup's size plus the 1 MiB head room kept free
    assert files.human_bytes(size + (1 << 20)) in message
    assert str(tmp_path / "backup") in message
    assert files.human_bytes(size // 2) in message  # what is free
    assert digest(weights) == before and leftovers(tmp_path) == []


def _mount_tmpfs(where: Path, size: str) -> None:
    where.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")


@pytest.fixture
def small_disk(tmp_path):
    """A real 2 MiB file system (tmpfs; skipped where mounting is not allowed)."""
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "2m")
    yield disk
    subprocess.run(["umount", str(disk)], check=False)


def test_backup_on_a_real_full_disk(small_disk):
    """Two backups of a ~0.7 MiB model (the old one is kept while the new one is written) do
    not fit with 1 MiB of head room on 2 MiB: the second is refused before h5py starts."""
    inputs = keras.Input((8, 8, 3))
    head = keras.layers.Dense(900)(keras.layers.Flatten()(inputs))  # 192 x 900 + 900 floats
    model = keras.Model(inputs, head)
    model.compile(optimizer="sgd", loss="mse")
    backup.write_backup(small_disk, model, backup.TrainingState(epoch=1))
    weights = small_disk / "backup" / "state.weights.h5"
    assert weights.stat().st_size >= (192 * 900 + 900) * 4  # 0.66 MiB of float32 weights
    before = digest(weights)
    with pytest.raises(DiskFull) as caught:
        backup.write_backup(small_disk, model, backup.TrainingState(epoch=2))
    assert "last good backup was kept" in str(caught.value)
    assert digest(weights) == before and leftovers(small_disk) == []
    assert backup.load_state(small_disk)[0].epoch == 1


def test_checkpoint_out_of_space_keeps_the_previous_best(tmp_path, monkeypatch):
    model = tiny_model()
    best = tmp_path / "best.keras"
    model.save(best)
    before = digest(best)
    callback = AtomicModelCheckpoint(str(best), monitor="loss", save_best_only=False)
    callback.set_model(model)

    def partial_then_enospc(filepath, *args, **kwargs):
        Path(filepath).write_bytes(b"PK partial zip")
        enospc()

    monkeypatch.setattr(model, "save", partial_then_enospc)
    with pytest.raises(DiskFull) as caught:
        callback._save_model(epoch=0, batch=None, logs={"loss": 1.0})
    assert "best.keras" in str(caught.value)
    assert "previous checkpoint was kept" in str(caught.value)
    assert digest(best) == before and leftovers(tmp_path) == []


# --- infer outputs -------------------------------------------------------------------------------


def test_infer_outputs_out_of_space_leave_nothing_partial(tmp_path, monkeypatch):
    paths = (tmp_path / "a.png", tmp_path / "a_overlay.jpg", tmp_path / "a_prob.npy")
    ids = np.zeros((4, 4), np.uint8)
    image = np.zeros((4, 4, 3), np.uint8)
    probs = np.ones((4, 4, 4), np.float32) / 4
    palette = np.zeros((256, 3), np.uint8)
    original_save = Image.Image.save

    def save_then_fail(self, fp, *args, **kwargs):
        if str(fp).endswith(".png"):
            original_save(self, fp, *args, **kwargs)  # the mask is written whole, then...
            enospc()
        return original_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save_then_fail)
    with pytest.raises(DiskFull, match="a.png"):
        infer.write_outputs(paths, image, ids, probs, palette, 0.5)
    # The overlay and probabilities were renamed into place, the mask was not: the image does
    # not count as done.
    assert not paths[0].exists() and leftovers(tmp_path) == []
    assert infer_files.pending([tmp_path / "in" / "a.jpg"], [paths]) != []


def test_resume_skips_only_complete_outputs(tmp_path):
    images = [tmp_path / "in" / f"{s}.jpg" for s in ("a", "b", "c")]
    out = tmp_path / "out"
    out.mkdir()
    suffixes = (".png", "_overlay.jpg", None)  # as mode=infer names them
    plan = infer_files.plan_outputs(images, out, suffixes, overwrite=False, resume=True)
    for path in plan[0][:2]:  # a: done
        path.write_bytes(b"x")
    plan[1][1].write_bytes(b"x")  # b: overlay only (its mask was never renamed into place)
    (out / f".tmp-999999-{plan[2][0].name}").write_bytes(b"partial")  # c: a temporary only
    assert [image.stem for image, _ in infer_files.pending(images, plan)] == ["b", "c"]
    with pytest.raises(UserError, match="infer.resume"):
        infer_files.plan_outputs(images, out, suffixes, overwrite=False, resume=False)
    with pytest.raises(UserError, match="only one"):
        infer_files.plan_outputs(images, out, suffixes, overwrite=True, resume=True)
    infer_files.remove_stale_temporaries(out)  # PID 999999 is not running
    assert leftovers(out) == []


def test_infer_refuses_outputs_that_would_overwrite_each_other_or_the_inputs(tmp_path):
    suffixes = ("_alpha.png", None)
    clash = [tmp_path / "a" / "x.jpg", tmp_path / "b" / "x.png"]  # two outputs named x_alpha.png
    with pytest.raises(UserError, match="share the name 'x'"):
        infer_files.plan_outputs(clash, tmp_path / "out", suffixes, overwrite=True)
    inputs = [tmp_path / "a" / "x.jpg"]
    with pytest.raises(UserError, match="is an input directory"):
        infer_files.plan_outputs(inputs, tmp_path / "a", suffixes, overwrite=True)
    plan = infer_files.plan_outputs(inputs, tmp_path / "out", suffixes, overwrite=False)
    assert plan == [(tmp_path / "out" / "x_alpha.png", None)]  # nothing exists yet: allowed


# --- the CLI: disk full and Ctrl-C ----------------------------------------------------------------


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny.keras"
    tiny_model().save(path)
    return path


def _photos(folder: Path, count: int, size: int = 48) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index in range(count):
        pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"p{index:03d}.png")
    return folder


@pytest.mark.slow
def test_infer_into_a_full_disk_exits_2(tmp_path, model_file, cache_dir):
    photos = _photos(tmp_path / "photos", 12, size=96)
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "64k")
    try:
        result = run_cli(
            [
                "mode=infer",
                f"ckpt_path={model_file}",
                f"infer.input={photos}",
                f"infer.output_dir={disk / 'preds'}",
                f"hydra.run.dir={tmp_path / 'run'}",
            ],
            cache_dir,
            cwd=tmp_path,
        )
        lines = error_lines(result)
        assert result.returncode == 2, result.stderr[-3000:]
        assert len(lines) == 1 and "No space left on device" in lines[0], lines
        assert str(disk / "preds") in lines[0] and "free there" in lines[0]
        assert "Traceback" not in result.stderr
        written = sorted(p.name for p in (disk / "preds").iterdir())
        assert leftovers(disk) == []
        # whatever was written is whole: every PNG opens
        for name in written:
            if name.endswith(".png"):
                with Image.open(disk / "preds" / name) as image:
                    image.load()
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def _interrupt(
    args: list[str], cache_dir: Path, cwd: Path, ready, group: bool = False
) -> subprocess.CompletedProcess:
    """Runs the CLI and sends SIGINT (as Ctrl-C does) once `ready()` is true.

    With `group`, the signal goes to the whole process group, as a terminal sends it: worker
    processes (the CRF pool) get it too.
    """
    process = subprocess.Popen(
        cli_command(args),
        cwd=cwd,
        env=cli_env(cache_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A shell's background jobs ignore SIGINT; a terminal's foreground job does not.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        start_new_session=group,
    )
    deadline = time.monotonic() + 300
    while not ready() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if group:
        os.killpg(process.pid, signal.SIGINT)
    else:
        process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.mark.slow
def test_ctrl_c_in_infer_then_resume(tmp_path, model_file, cache_dir):
    photos = _photos(tmp_path / "photos", 150)
    out = tmp_path / "preds"
    command = ["mode=infer", f"ckpt_path={model_file}", f"infer.input={photos}"]
    result = _interrupt(
        [*command, f"infer.output_dir={out}", f"hydra.run.dir={tmp_path / 'run1'}"],
        cache_dir,
        tmp_path,
        ready=lambda: (out / "p005.png").exists(),
    )
    lines = error_lines(result)
    assert result.returncode == 130, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("seg-train: interrupted: mode=infer"), lines
    assert "infer.resume=true" in lines[0] and f"infer.output_dir={out}" in lines[0]
    assert "Traceback" not in result.stderr and leftovers(out) == []
    done = sorted(p.stem for p in out.glob("p*.png"))
    assert 6 <= len(done) < 150, done
    stamps = {
        name: (out / name).stat().st_mtime_ns
        for stem in done
        for name in (f"{stem}.png", f"{stem}_overlay.jpg")
    }

    again = run_cli(
        [*command, f"infer.output_dir={out}", "infer.resume=true", f"hydra.run.dir={tmp_path}/r2"],
        cache_dir,
        cwd=tmp_path,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{len(done)} of 150 images already have their outputs" in again.stdout + again.stderr
    names = {p.name for p in out.iterdir()}
    assert names == {f"p{i:03d}{s}" for i in range(150) for s in (".png", "_overlay.jpg")}
    for name, stamp in stamps.items():  # finished outputs were not redone
        assert (out / name).stat().st_mtime_ns == stamp, name


@pytest.mark.slow
def test_ctrl_c_in_eval(tmp_path, model_file, cache_dir):
    run_dir = tmp_path / "eval"
    result = _interrupt(
        [
            "mode=eval",
            f"ckpt_path={model_file}",
            "data.source.num_train=2",
            "data.source.num_val=300",
            "data.source.image_size=32",
            "eval.num_samples=2",
            f"hydra.run.dir={run_dir}",
        ],
        cache_dir,
        tmp_path,
        ready=lambda: (run_dir / "samples" / "val_0001.png").exists(),
    )
    lines = error_lines(result)
    assert result.returncode == 130, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("seg-train: interrupted: mode=eval"), lines
    assert "Traceback" not in result.stderr
    assert not (run_dir / "metrics.json").exists()


@pytest.mark.slow
def test_ctrl_c_in_infer_with_crf_workers(tmp_path, model_file, cache_dir):
    """The terminal's Ctrl-C reaches the CRF worker processes too: still one line."""
    photos = _photos(tmp_path / "photos", 60)
    out = tmp_path / "preds"
    result = _interrupt(
        [
            "mode=infer",
            f"ckpt_path={model_file}",
            f"infer.input={photos}",
            f"infer.output_dir={out}",
            "postprocess=crf",
            "postprocess.workers=2",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cache_dir,
        tmp_path,
        ready=lambda: (out / "p003.png").exists(),
        group=True,
    )
    lines = error_lines(result)
    assert result.returncode == 130, result.stderr[-3000:]
    assert len(lines) == 1 and "infer.resume=true" in lines[0], lines
    assert "Traceback" not in result.stderr and leftovers(out) == []
