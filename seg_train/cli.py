"""The `seg-train` command: the only `@hydra.main`, dispatching to train / eval / infer.

TensorFlow is imported only by the task modules, after `runtime.prepare_environment` has set
the environment variables that TensorFlow reads at import time, so `seg-train --help` stays fast.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import hydra
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import (
    OmegaConfBaseException,
)

from seg_train.errors import Preempted, UserError, describe_error, describe_yaml_error, is_no_space
from seg_train.files import RESTARTABLE, ensure_fresh_run_dir
from seg_train.runtime import CONFIG_DIR
from seg_train.tasks import run_lock
from seg_train.training import preemption

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C
# What `trainer.resume=RUN_DIR KEY=VALUE` may change: how long and how the run goes on and
# where it is tracked (logger=mlflow may join later), never what it trains (model, data,
# loss, optimizer) or how it is saved.
RESUME_SAFE_KEYS = ("trainer.epochs", "trainer.backup_every_steps", "trainer.verbose")
RESUME_SAFE_PREFIXES = ("hardware.", "logger.")
RESUME_SAFE_GROUPS = ("hardware", "logger")
# Every resume of a run is appended here (time, PID, the overrides it changed); the run's own
# .hydra/ is never rewritten by a resume.
RESUME_LOG = "resume_overrides.yaml"
# `seg-train VERB ...` is `seg-train mode=VERB ...` (configs/mode/ holds one file per verb).
VERBS = ("train", "eval", "infer", "export", "check", "benchmark")
# Hydra's flags that take the next argument as their value (so it is not read as a verb).
_VALUE_FLAGS = (
    "--cfg",
    "-c",
    "--package",
    "-p",
    "--config-path",
    "-cp",
    "--config-name",
    "-cn",
    "--config-dir",
    "-cd",
    "--info",
    "-i",
    "--experimental-rerun",
)
log = logging.getLogger("seg_train")
# Whether the user asked for tracebacks (HYDRA_FULL_ERROR=1); set by main().
_show_tracebacks = False


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def _run_task(cfg: DictConfig) -> float | None:
    """Checks the composed config, prepares the process, and runs `cfg.mode.task`."""
    from seg_train import runtime
    from seg_train.config_checks import check_config, check_user_config_files
    from seg_train.training import devices

    try:
        hydra_cfg = HydraConfig.get()
        check_user_config_files(
            "config", [*hydra_cfg.overrides.hydra, *hydra_cfg.overrides.task], CONFIG_DIR
        )
        check_config(cfg)
        if _is_training(cfg):
            preemption.stop_on_signals(Path(cfg.paths.output_dir))
            if cfg.trainer.resume and _resume_changes is not None:
                _record_resume(Path(cfg.trainer.resume).expanduser(), _resume_changes)
        runtime.prepare_environment(cfg)
        # hardware=gpu without a GPU: one line, before anything is built
        devices.prepare(OmegaConf.to_container(cfg.hardware, resolve=True))
        runtime.print_and_save_config(cfg, Path(cfg.paths.output_dir))
        task = hydra.utils.get_method(cfg.mode.task)
        return task(cfg)
    except Preempted as exc:
        print(f"seg-train: {exc}", file=sys.stderr)
        sys.exit(Preempted.exit_code)
    except (UserError, HydraException, OmegaConfBaseException, OSError) as exc:
        if _is_unexpected_os_error(exc):
            raise  # not about a path the user chose: a bug or the machine, keep the traceback
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            # Let Hydra mark this job failed and run the others; main() reports it at the end.
            log.error("seg-train: error: %s", describe_error(exc))
            raise
        # Reported here rather than in main(): Hydra adds its own lines to errors leaving a job.
        _exit_with_one_line(exc)


def main() -> None:
    """Console-script entrypoint: runs Hydra and turns user errors into one-line messages."""
    # Hydra prints multi-line reports of its own unless this is set; with it set, Hydra re-raises
    # and we print exactly one line for errors the user can fix.
    global _show_tracebacks
    _show_tracebacks = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        args = expand_verb(sys.argv[1:])
    except UserError as exc:
        _exit_with_one_line(exc)
    if _trains(args):
        preemption.stop_on_signals()  # SIGTERM/SIGINT from here on: one line, exit 75
    hide_private_options()
    try:
        lock_named_run_dir(args)
        sys.argv[1:] = prepare_args(args)
        _run_task()
    except Preempted as exc:
        print(f"seg-train: {exc}", file=sys.stderr)
        sys.exit(Preempted.exit_code)
    except KeyboardInterrupt as exc:  # Ctrl-C outside training (eval, infer, start-up)
        detail = f": {exc}" if str(exc) else ""  # e.g. how to continue an interrupted infer
        print(f"seg-train: interrupted{detail}", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except yaml.YAMLError as exc:  # a user config file that is not valid YAML
        _exit_with_one_line(UserError(describe_yaml_error(exc)))
    except (UserError, HydraException, OmegaConfBaseException, OSError) as exc:
        if _is_unexpected_os_error(exc):
            raise
        _exit_with_one_line(exc)
    finally:
        run_lock.release_all()


def hide_private_options() -> None:
    """Leaves config files named `_*.yaml` (e.g. data/_pipeline.yaml, a block that options
    include through their defaults list) out of the options Hydra lists: `--help`, the
    "available:" of an unknown option, tab completion and `glob()` sweeps. They still load as
    defaults of other files."""
    from hydra._internal.config_repository import CachingConfigRepository

    listed = CachingConfigRepository.get_group_options
    if getattr(listed, "hides_private", False):
        return

    def get_group_options(self, *args, **kwargs) -> list[str]:
        return [name for name in listed(self, *args, **kwargs) if not name.startswith("_")]

    get_group_options.hides_private = True  # type: ignore[attr-defined]
    CachingConfigRepository.get_group_options = get_group_options


def expand_verb(args: list[str]) -> list[str]:
    """Turns a leading verb (`seg-train eval ckpt_path=RUN`) into `mode=eval`.

    The verb is the first argument that is neither a flag, a flag's value nor an override; it
    may follow flags such as `-m`. Without a verb the arguments are returned unchanged.

    Raises:
        UserError: for a word that is not a verb, listing the verbs.
    """
    for index, arg in enumerate(args):
        if arg.startswith("-") or _is_override(arg):
            continue
        if index and args[index - 1] in _VALUE_FLAGS:
            continue  # e.g. the `job` of `--cfg job`
        if arg not in VERBS:
            raise UserError(
                f"unknown command '{arg}'; the verbs are {', '.join(VERBS)} "
                "(e.g. seg-train eval ckpt_path=RUN_DIR), and overrides are key=value"
            )
        if any(_key_value(a)[0] == "mode" for a in args if _is_override(a)):
            raise UserError(f"'{arg}' and a mode= override both choose the mode; give one")
        return [*args[:index], f"mode={arg}", *args[index + 1 :]]
    return args


def _trains(args: list[str]) -> bool:
    """Whether a command line runs training (the default mode) as a single run."""
    modes = [_key_value(a)[1] for a in args if _key_value(a)[0] == "mode"]
    return modes in ([], ["train"]) and "-m" not in args and "--multirun" not in args


def _is_training(cfg: DictConfig) -> bool:
    return cfg.mode.get("name") == "train" and HydraConfig.get().mode != RunMode.MULTIRUN


def lock_named_run_dir(args: list[str]) -> None:
    """Takes the lock of the run dir a single run names, before Hydra writes `.hydra/` into it.

    A second process for the same run dir (a new run or a resume) then stops with one line
    naming the holder and leaves the run dir as it was. Run dirs made from the clock are
    unique and locked by the training itself; the workers of a multi-worker job share theirs.
    """
    if "-m" in args or "--multirun" in args or _multi_worker_process():
        return
    values = dict(_key_value(a) for a in args if "=" in a)
    named = values.get("trainer.resume") or values.get("hydra.run.dir")
    if named and named != "null" and "${" not in named:
        run_lock.acquire(Path(named).expanduser())


def _multi_worker_process() -> bool:
    """One of several workers of a job (TF_CONFIG, or a Slurm step of several tasks)."""
    tasks = os.environ.get("SLURM_STEP_NUM_TASKS", "1")
    return "TF_CONFIG" in os.environ or (tasks.isdigit() and int(tasks) > 1)


def prepare_args(args: list[str]) -> list[str]:
    """Turns verbs and resume requests into plain Hydra arguments and protects used run dirs.

    * A leading verb becomes its mode: `seg-train eval ...` is `seg-train mode=eval ...`
      (`expand_verb`).
    * `trainer.resume=RUN_DIR` replays that run's saved overrides into RUN_DIR. Overrides
      given now may only change `RESUME_SAFE_KEYS` (anything else is refused with one line);
      the changes are appended to RUN_DIR/resume_overrides.yaml, and the run's `.hydra/` is
      left as it was (`hydra.output_subdir=null`).
    * Re-running the same command with `hydra.run.dir=RUN_DIR`, where RUN_DIR holds a backup,
      resumes it.
    * Any other command naming a used run or sweep dir is refused before Hydra writes
      `.hydra/` into it, so that run's saved config and outputs stay intact.
    """
    global _resume_changes
    args = expand_verb(args)
    values = dict(_key_value(a) for a in args if "=" in a)
    resume_dir = values.get("trainer.resume")
    if resume_dir and resume_dir != "null":
        run_path = Path(resume_dir).expanduser()
        saved = _saved_overrides(run_path)
        given = [a for a in args if _key_value(a)[0] not in ("trainer.resume", "hydra.run.dir")]
        _resume_changes = _changes_on_resume(run_path, saved, given)
        _refuse_extending_a_finished_run(run_path, saved, _resume_changes)
        flags = [a for a in given if not _is_override(a)]
        return [
            *flags,
            *saved,
            *_resume_changes,
            f"hydra.run.dir={resume_dir}",
            f"trainer.resume={resume_dir}",
            "hydra.output_subdir=null",  # the run's .hydra/ stays as it was
        ]
    run_dir = values.get("hydra.run.dir")
    if run_dir and "-m" not in args and "--multirun" not in args:
        run_path = Path(run_dir).expanduser()
        if (run_path / "backup").is_dir() or (run_path / "backup.prev").is_dir():
            saved = _saved_overrides(run_path)
            given = [a for a in args if _key_value(a)[0] != "hydra.run.dir" and "=" in a]
            if sorted(given) != sorted(saved):
                raise UserError(
                    f"run dir {run_path} holds a run with other overrides ({' '.join(saved)}); "
                    f"continue it with trainer.resume={run_path} or choose a new hydra.run.dir"
                )
            _resume_changes = []
            return [*args, f"trainer.resume={run_dir}", "hydra.output_subdir=null"]
    for key in ("hydra.run.dir", "hydra.sweep.dir"):
        if values.get(key):
            # A run killed before its first backup left only .hydra/ and logs: start it anew.
            ensure_fresh_run_dir(Path(values[key]).expanduser(), ignore=RESTARTABLE)
    return args


def _key_value(arg: str) -> tuple[str, str]:
    key, _, value = arg.partition("=")
    return key.lstrip("+~"), value


# The overrides a resume changes (set by prepare_args, recorded once the config is composed).
_resume_changes: list[str] | None = None


def _is_override(arg: str) -> bool:
    """A Hydra override (key=value, +key=value, ~key), not a flag such as --cfg or its value."""
    return not arg.startswith("-") and ("=" in arg or arg.startswith("~"))


def _changes_on_resume(run_dir: Path, saved: list[str], given: list[str]) -> list[str]:
    """The overrides of a resume command that change the run's own; refuses unsafe ones."""
    own = {_key_value(o)[0]: o for o in saved}
    changes = []
    for override in filter(_is_override, given):
        key = _key_value(override)[0]
        if own.get(key) == override:
            continue  # the run's own setting, given again (e.g. by a requeue script)
        if override == "mode=train" and key not in own:
            continue  # `seg-train train trainer.resume=RUN`: train is every run's default mode
        safe = (
            key in RESUME_SAFE_KEYS
            or key.startswith(RESUME_SAFE_PREFIXES)
            or (key in RESUME_SAFE_GROUPS and not override.startswith("~"))
        )
        if not safe:
            was = f"it was started with {own[key]}" if key in own else f"{key} was not set"
            raise UserError(
                f"trainer.resume={run_dir} cannot change {override} ({was}): a resume may "
                f"only change {', '.join(RESUME_SAFE_KEYS)}, hardware and logger; start a new run "
                "(a new hydra.run.dir) to train something else"
            )
        changes.append(override)
    return changes


def _refuse_extending_a_finished_run(run_dir: Path, saved: list[str], changes: list[str]) -> None:
    """Refuses `trainer.epochs=N` on a run that finished fewer epochs, before anything is
    written: the run would otherwise report "complete" and train nothing. A finished run's
    learning-rate schedule has ended and its final report is written; it is not extended."""
    from seg_train.training import backup  # no Keras: this runs before TensorFlow loads

    asked = dict(_key_value(c) for c in changes).get("trainer.epochs")
    if asked is None or any(_key_value(o)[0] == "trainer.total_steps" for o in saved):
        return
    found = backup.load_state(run_dir)
    if found is None or not found[0].finished or not asked.isdigit():
        return
    done = found[0].epoch
    if int(asked) > done:
        raise UserError(
            f"trainer.resume={run_dir} finished after {done} epochs (its final report is "
            f"written), so trainer.epochs={asked} cannot extend it; start a new run (a new "
            "hydra.run.dir) to train longer"
        )


def _record_resume(run_dir: Path, changes: list[str]) -> None:
    """Appends this resume (time, PID, overrides changed) to RUN_DIR/resume_overrides.yaml."""
    entry = OmegaConf.to_yaml(
        [{"time": time.strftime("%F %T"), "pid": os.getpid(), "overrides": list(changes)}]
    )
    with open(run_dir / RESUME_LOG, "a") as log_file:
        log_file.write(entry)


def _saved_overrides(run_dir: Path) -> list[str]:
    """The command-line overrides a run was started with (without resume bookkeeping)."""
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        raise UserError(
            f"{run_dir} is not a training run dir (no {path}); "
            "pass the run dir of the training run to resume"
        )
    overrides = OmegaConf.load(path)
    bookkeeping = ("trainer.resume", "hydra.output_subdir")
    return [str(o) for o in overrides if _key_value(str(o))[0] not in bookkeeping]


def _exit_with_one_line(exc: BaseException) -> None:
    """Prints `seg-train: error: ...` and exits 2, or re-raises if the user wants tracebacks."""
    if _show_tracebacks:
        raise exc
    print(f"seg-train: error: {describe_error(exc)}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


def _is_unexpected_os_error(exc: BaseException) -> bool:
    """An OSError that is not about a path (Hydra's config errors are OSErrors too)."""
    return (
        isinstance(exc, OSError)
        and not isinstance(exc, HydraException)
        and not exc.filename
        and not is_no_space(exc)  # a full disk: one line (describe_error), not a traceback
    )


if __name__ == "__main__":
    main()
