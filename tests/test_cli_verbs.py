"""`seg-train VERB ...` is `seg-train mode=VERB ...`: parsing, the CLI, multirun and --help."""

from __future__ import annotations

import json

import pytest

from seg_train import cli
from seg_train.errors import UserError
from tests.helpers import TINY_TRAIN, error_lines, run_cli


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (["eval", "ckpt_path=RUN"], ["mode=eval", "ckpt_path=RUN"]),
        (["check", "data=folder"], ["mode=check", "data=folder"]),
        (["train"], ["mode=train"]),
        (
            ["infer", "ckpt_path=R", "infer.input=x.jpg"],
            ["mode=infer", "ckpt_path=R", "infer.input=x.jpg"],
        ),
        (["export", "ckpt_path=R"], ["mode=export", "ckpt_path=R"]),
        # multirun: the verb may follow -m / --multirun
        (["-m", "eval", "ckpt_path=a,b"], ["-m", "mode=eval", "ckpt_path=a,b"]),
        (["--multirun", "check", "seed=1,2"], ["--multirun", "mode=check", "seed=1,2"]),
        # the mode= form and flag values are left as they are
        (["mode=eval", "ckpt_path=RUN"], ["mode=eval", "ckpt_path=RUN"]),
        (["--cfg", "job", "seed=3"], ["--cfg", "job", "seed=3"]),
        (["--cfg", "job", "eval", "ckpt_path=R"], ["--cfg", "job", "mode=eval", "ckpt_path=R"]),
        (["--help"], ["--help"]),
        ([], []),
    ],
)
def test_a_verb_becomes_its_mode(given, expected):
    assert cli.prepare_args(list(given)) == expected


@pytest.mark.parametrize(
    ("given", "message"),
    [
        (
            ["evaluate", "ckpt_path=R"],
            "unknown command 'evaluate'; the verbs are train, eval, infer, export, check, "
            "benchmark",
        ),
        (["eval", "mode=train"], "'eval' and a mode= override both choose the mode"),
    ],
)
def test_a_bad_verb_is_one_line(given, message):
    with pytest.raises(UserError, match=message):
        cli.prepare_args(list(given))


def test_unknown_verb_through_the_cli(tmp_path, cache_dir):
    result = run_cli(["tain", "seed=1"], cache_dir, cwd=tmp_path)
    assert result.returncode == 2
    assert error_lines(result) == [
        "seg-train: error: unknown command 'tain'; the verbs are train, eval, infer, export, "
        "check, benchmark (e.g. seg-train eval ckpt_path=RUN_DIR), and overrides are key=value"
    ]


def test_help_shows_both_forms(tmp_path, cache_dir):
    result = run_cli(["--help"], cache_dir, cwd=tmp_path)
    assert result.returncode == 0
    assert "seg-train eval ckpt_path=" in result.stdout
    assert "mode=eval ckpt_path=" in result.stdout
    assert "train (the default), eval, infer, export, check or benchmark" in result.stdout


def test_eval_verb_used_to_fail_with_missing_equal(tmp_path, cache_dir):
    """Hydra alone reads `eval` as a broken override ("missing EQUAL"); now it is mode=eval."""
    result = run_cli(["eval", f"ckpt_path={tmp_path / 'absent'}"], cache_dir, cwd=tmp_path)
    assert result.returncode == 2
    (line,) = error_lines(result)
    assert "EQUAL" not in line and line.startswith(f"seg-train: error: ckpt_path {tmp_path}")


@pytest.mark.slow
def test_check_verb_single_and_multirun(tmp_path, cache_dir):
    tiny = [a for a in TINY_TRAIN if a.startswith("data.source.")]
    run_dir = tmp_path / "single"
    result = run_cli(["check", *tiny, f"hydra.run.dir={run_dir}"], cache_dir, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((run_dir / "check.json").read_text())["errors"] == []
    assert (run_dir / ".hydra" / "config.yaml").read_text().count("name: check") == 1

    sweep = tmp_path / "sweep"
    result = run_cli(
        ["-m", "check", *tiny, "check.max_printed=1,2", f"hydra.sweep.dir={sweep}"],
        cache_dir,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in sweep.iterdir() if (p / "check.json").is_file()) == ["0", "1"]


def test_train_verb_on_a_resume_is_no_change(tmp_path):
    """`seg-train train trainer.resume=RUN` resumes a run started without mode=train."""
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text("- seed=5\n")
    args = cli.prepare_args(["train", f"trainer.resume={tmp_path}"])
    assert args == [
        "seed=5",
        f"hydra.run.dir={tmp_path}",
        f"trainer.resume={tmp_path}",
        "hydra.output_subdir=null",
    ]
