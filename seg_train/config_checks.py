"""Validation of the composed config before anything runs.

Hydra already rejects unknown keys (the config is in struct mode); these checks add types and
ranges for the keys that scripts rely on, and the cross-key rules of each mode, so a mistake
fails at once with a message naming the key instead of deep inside TensorFlow. One table
(`RULES`) holds every key's rule, the data keys' included. This module must stay free of
TensorFlow: the CLI checks the config before TensorFlow is imported.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from seg_train.errors import UserError

# A rule takes (key, value) and raises `UserError` naming the key and a valid example.
Rule = Callable[[str, Any], None]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def positive_int(key: str, value: Any) -> None:
    if not (_is_int(value) and value > 0):
        raise UserError(f"config key {key} must be a positive integer, got {value!r}; e.g. {key}=8")


def optional_positive_int(key: str, value: Any) -> None:
    if value is not None:
        positive_int(key, value)


def any_int(key: str, value: Any) -> None:
    if not _is_int(value):
        raise UserError(f"config key {key} must be an integer, got {value!r}; e.g. {key}=0")


def label_value(key: str, value: Any) -> None:
    if not (_is_int(value) and 0 <= value <= 255):
        raise UserError(f"config key {key} must be an integer in 0..255, got {value!r}")


def positive_number(key: str, value: Any) -> None:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
        raise UserError(
            f"config key {key} must be a positive number, got {value!r}; e.g. {key}=1e-3"
        )


def non_negative_int(key: str, value: Any) -> None:
    if not (_is_int(value) and value >= 0):
        raise UserError(f"config key {key} must be an integer >= 0, got {value!r}; e.g. {key}=0")


def share(key: str, value: Any) -> None:
    if not (_is_number(value) and 0.0 <= value <= 1.0):
        raise UserError(
            f"config key {key} must be a share in 0..1, got {value!r}; e.g. {key}=0.999"
        )


def boolean(key: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise UserError(f"config key {key} must be true or false, got {value!r}")


def auto_or_boolean(key: str, value: Any) -> None:
    if value != "auto" and not isinstance(value, bool):
        raise UserError(f"config key {key} must be auto, true or false, got {value!r}")


def size_hw(key: str, value: Any) -> None:
    ok = OmegaConf.is_list(value) and len(value) == 2 and all(_is_int(v) and v > 0 for v in value)
    if not ok:
        raise UserError(
            f"config key {key} must be [height, width] in pixels, got {value!r}; "
            f"e.g. '{key}=[256,256]'"
        )


def scale_range(key: str, value: Any) -> None:
    ok = (
        OmegaConf.is_list(value)
        and len(value) == 2
        and all(isinstance(v, (int, float)) and v > 0 for v in value)
        and value[0] <= value[1]
    )
    if not ok:
        raise UserError(
            f"config key {key} must be [min, max] with 0 < min <= max, got {value!r}; "
            f"e.g. '{key}=[0.5,2.0]'"
        )


def _channel_value(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 255


def pad_value(key: str, value: Any) -> None:
    """data.pad_value: 0 or an [r, g, b] colour in 0..255 (numbers, e.g. a mean colour)."""
    black = _channel_value(value) and value == 0
    colour = OmegaConf.is_list(value) and len(value) == 3 and all(map(_channel_value, value))
    if not (black or colour):
        raise UserError(
            f"config key {key} must be 0 or an [r, g, b] colour in 0..255, got {value!r}; "
            f"e.g. '{key}=[123.68,116.78,103.94]' (an ImageNet mean colour)"
        )


def device_list(key: str, value: Any) -> None:
    ok = value is None or (OmegaConf.is_list(value) and all(_is_int(v) and v >= 0 for v in value))
    if not ok:
        raise UserError(
            f"config key {key} must be a list of GPU ids such as [0,1], [] or null, got {value!r}"
        )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def one_of(*choices: str) -> Rule:
    """A rule accepting exactly one of `choices`."""

    def rule(key: str, value: Any) -> None:
        if value not in choices:
            raise UserError(
                f"config key {key} must be one of {', '.join(choices)}, got "
                f"{value!r}; e.g. {key}={choices[0]}"
            )

    return rule


def fraction(upper: float) -> Rule:
    """A rule accepting numbers in [0, upper] (jitter strengths)."""

    def rule(key: str, value: Any) -> None:
        if not (_is_number(value) and 0 <= value <= upper):
            raise UserError(
                f"config key {key} must be a number in 0..{upper} (0 = off), got "
                f"{value!r}; e.g. {key}=0.1"
            )

    return rule


def matte_threshold(key: str, value: Any) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 254):
        raise UserError(
            f"config key {key} must be an alpha value in 0..254 (pixels above it are "
            f"person), got {value!r}; e.g. {key}=127"
        )


def flip_pairs(key: str, value: Any) -> None:
    ok = OmegaConf.is_list(value) and all(
        OmegaConf.is_list(pair)
        and len(pair) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 255 for v in pair)
        and pair[0] != pair[1]
        for pair in value
    )
    if ok:
        labels = [v for pair in value for v in pair]
        ok = len(labels) == len(set(labels))
    if not ok:
        raise UserError(
            f"config key {key} must list [left, right] class-id pairs that swap on a "
            f"horizontal flip, each id once, got {value!r}; e.g. "
            f"'{key}=[[14,15],[16,17]]' or '{key}=[]'"
        )


def decoder_node(key: str, value: Any) -> None:
    if not (OmegaConf.is_dict(value) and "_target_" in value):
        hint = ""
        if value in ("raw", "tfds"):
            hint = f" (for Oxford-IIIT Pet use data.format={value})"
        raise UserError(
            f"config key {key} must be the dataset decoder (a node with _target_), "
            f"got {value!r}{hint}; pick a dataset with data=NAME instead"
        )


def split_names(key: str, value: Any) -> None:
    ok = value is None or (
        OmegaConf.is_list(value) and len(value) > 0 and all(isinstance(v, str) and v for v in value)
    )
    if not ok:
        raise UserError(
            f"config key {key} must be null (every split) or a list of split names, "
            f"got {value!r}; e.g. '{key}=[train,val]'"
        )


def split_specs(key: str, value: Any) -> None:
    ok = (
        OmegaConf.is_dict(value)
        and len(value) > 0
        and all(isinstance(v, str) and v for v in value.values())
    )
    if not ok or "train" not in value or "val" not in value:
        raise UserError(
            f"config key {key} must map split names (at least train and val) to "
            f"their source, got {value!r}; e.g. {key}.val=test"
        )


# The loggers that need an optional package (pyproject.toml extras of the same names).
LOGGER_PACKAGES = ("mlflow", "wandb")


def missing_logger_package(name: str, error: ImportError | None = None) -> str:
    """The one line for a `logger=NAME` whose package is not installed (or fails to import)."""
    install = f"pip install 'seg-train[{name}]'"
    if error is not None and error.name not in (None, name):  # the package is there, broken
        return f"logger={name}: importing {name} failed ({error}); reinstall it: {install}"
    return f"logger={name} needs the {name} package: {install}"


def logger_packages(loggers: Any) -> None:
    """Refuses a logger whose package is missing before any data is read or model built."""
    import importlib.util

    for name in loggers or ():
        if name in LOGGER_PACKAGES:
            try:
                found = importlib.util.find_spec(name) is not None
            except ValueError:  # a module placed in sys.modules without a spec (tests)
                found = True
            if not found:
                raise UserError(missing_logger_package(name))


RULES: dict[str, Rule] = {
    "seed": any_int,
    "data.num_classes": positive_int,
    "data.ignore_label": label_value,
    "data.batch_size": positive_int,
    "data.crop_size": size_hw,
    "data.scale_range": scale_range,
    "data.hflip": boolean,
    "data.transform": one_of("crop", "resize"),
    "data.pad_value": pad_value,
    "data.cache": auto_or_boolean,
    "data.shuffle_buffer": positive_int,
    "data.num_parallel_calls": optional_positive_int,
    "optimizer.learning_rate": positive_number,
    "trainer.epochs": positive_int,
    "trainer.steps_per_epoch": optional_positive_int,
    "trainer.total_steps": optional_positive_int,
    "trainer.validation_freq": positive_int,
    "trainer.val_protocol": one_of("original", "resized"),
    "trainer.steps_per_execution": positive_int,
    "eval.num_samples": lambda k, v: v == 0 or positive_int(k, v),
    "eval.report_worst": lambda k, v: v == 0 or positive_int(k, v),
    "eval.max_images": optional_positive_int,
    "infer.overwrite": boolean,
    "infer.resume": boolean,
    "infer.recursive": boolean,
    "trainer.deterministic": boolean,
    "trainer.backups": boolean,
    "trainer.jit_compile": auto_or_boolean,
    "hardware.devices": device_list,
    "hardware.cpu_logical_devices": optional_positive_int,
    "hardware.gpus_per_job": optional_positive_int,
    "trainer.overfit_batches": lambda k, v: v == 0 or positive_int(k, v),
    "trainer.backup_every_steps": lambda k, v: v == 0 or positive_int(k, v),
    "logger": lambda k, v: logger_packages(v),
    # Dataset-specific keys (not every data config has them).
    "data.source": decoder_node,
    "data.on_error": one_of("raise", "skip"),
    "data.flip_pairs": flip_pairs,
    "data.jitter.brightness": fraction(1.0),
    "data.jitter.contrast": fraction(0.99),
    "data.jitter.saturation": fraction(0.99),
    "data.jitter.hue": fraction(0.5),
    "data.aug": boolean,
    "data.format": one_of("tfds", "raw"),
    "data.border_as_ignore": boolean,
    "data.splits": split_specs,
    "data.tfds.download": boolean,
    "data.matte_threshold": matte_threshold,
    "check.splits": split_names,
    "check.max_printed": positive_int,
    "benchmark.warmup_steps": positive_int,
    "benchmark.steps": positive_int,
    "benchmark.eval_images": lambda k, v: v == 0 or positive_int(k, v),
    "export.format": one_of("saved_model", "tflite"),
    # 0 skips the parity check of the exported artefact.
    "export.parity_images": non_negative_int,
    "export.parity_threshold": share,
    "export.with_probabilities": boolean,
    "export.overwrite": boolean,
}


def check_config(cfg: DictConfig) -> None:
    """Raises `UserError` naming the first key whose value is missing, mistyped or inconsistent."""
    container = OmegaConf.to_container(cfg, resolve=False)
    container.pop("hydra", None)  # Hydra's own node (present when composed by tests)
    missing = _missing_keys(container)
    if not missing and _needs_root(container.get("data", {})):
        missing = ["data.root"]  # e.g. data=oxford_pets data.format=raw without data.root
    if missing:
        key = missing[0]
        hint = container.get("data", {}).get("root_hint") if key == "data.root" else None
        if hint:  # where the dataset comes from, its layout and the prepare_data.sh command
            raise UserError(f"data={container['data'].get('name')} needs data.root: {hint}")
        raise UserError(f"config key {key} is required but has no value; set it, e.g. {key}=...")
    for key, rule in RULES.items():
        if OmegaConf.select(cfg, key, default="<absent>") != "<absent>":
            rule(key, OmegaConf.select(cfg, key))
    _check_classes(cfg.data)
    _check_mode(cfg)


def _needs_root(data: dict) -> bool:
    """A dataset of files (not read through TFDS) whose data.root is null."""
    reads_root = "root" in data.get("source", {}) and data.get("format") != "tfds"
    return reads_root and "root" in data and data["root"] is None


def _missing_keys(node: Any, prefix: str = "") -> list[str]:
    """Keys whose value is `???`, found without resolving interpolations (which would fail)."""
    if isinstance(node, dict):
        items = node.items()
    elif isinstance(node, list):
        items = enumerate(node)
    else:
        return []
    found = []
    for key, value in items:
        if value == "???":
            found.append(f"{prefix}{key}")
        else:
            found += _missing_keys(value, f"{prefix}{key}.")
    return found


# Masks are uint8: class ids 0..254 and one ignore value; 256 values in all.
MAX_CLASSES = 255


def _check_classes(data: DictConfig) -> None:
    _check_label_space(data)
    names = data.class_names
    if not OmegaConf.is_list(names) or len(names) != data.num_classes:
        count = len(names) if OmegaConf.is_list(names) else "not a list"
        raise UserError(
            f"data.class_names must list data.num_classes={data.num_classes} names, got {count}; "
            "fix one of the two"
        )
    seen: set[str] = set()
    for index, name in enumerate(names):
        if str(name) in seen:
            # metrics.json and per_class.csv are keyed by name: one class would hide the other.
            raise UserError(
                f"data.class_names has '{name}' twice (class {index} and an earlier one); "
                "give every class its own name"
            )
        seen.add(str(name))
    _check_palette(data)


def _check_label_space(data: DictConfig) -> None:
    """Class ids 0..num_classes-1 fit uint8 masks and never include the ignore label."""
    num_classes, ignore = data.num_classes, data.get("ignore_label")
    if num_classes > MAX_CLASSES:
        raise UserError(
            f"data.num_classes={num_classes} does not fit the uint8 masks (class ids 0..254, "
            "255 = ignore); at most data.num_classes=255"
        )
    if ignore is not None and ignore < num_classes:
        raise UserError(
            f"data.ignore_label={ignore} is also class id {ignore} of data.num_classes="
            f"{num_classes} (ids 0..{num_classes - 1}); use data.ignore_label=255, "
            "or renumber the masks so the ignored value is above the class ids"
        )


def _check_palette(data: DictConfig) -> None:
    palette = data.get("palette")
    if palette is not None and (
        not OmegaConf.is_list(palette)
        or len(palette) < data.num_classes
        or any(not OmegaConf.is_list(c) or len(c) != 3 for c in palette)
    ):
        raise UserError(
            "data.palette must be null or one [r, g, b] per class "
            f"({data.num_classes} classes); fix data.palette"
        )
    for index, colour in enumerate(palette or []):
        if not all(_is_int(c) and 0 <= c <= 255 for c in colour):
            raise UserError(
                f"data.palette[{index}] is {list(colour)}: colour values must be integers in "
                "0..255; fix data.palette"
            )


def _check_mode(cfg: DictConfig) -> None:
    mode = cfg.mode.name
    if mode in ("eval", "infer", "export"):
        if cfg.ckpt_path is None:
            raise UserError(
                f"mode={mode} needs a checkpoint: pass ckpt_path=RUN_DIR (a training run dir) "
                "or ckpt_path=path/to/model.keras"
            )
        if not Path(str(cfg.ckpt_path)).expanduser().exists():
            raise UserError(
                f"ckpt_path {cfg.ckpt_path} does not exist; pass a training run dir "
                "or a .keras file"
            )
    if mode == "infer" and not cfg.infer.input:
        raise UserError(
            "mode=infer needs infer.input=FILE|DIR|GLOB, e.g. infer.input='photos/*.jpg'"
        )


def check_user_config_files(config_name: str, overrides: list[str], packaged: Path) -> None:
    """Refuses keys that user config files (`--config-dir`, `hydra.searchpath`) misspell.

    Hydra closes the config (struct mode) only after merging every file, so a typo such as
    `trainer: {epoch: 3}` in an experiment file would silently add a new, unused key, while the
    same typo on the command line is refused. This replays Hydra's composition and checks each
    user file's keys against the config merged before it, with Hydra's own loader (call it from
    inside the running app). A user file that defines a node nothing before it has (a new
    dataset option without a parent, say) and nodes that set their own `_target_` may hold any
    keys.

    Args:
        config_name: The primary config's name ("config").
        overrides: The run's Hydra and task overrides, as given on the command line.
        packaged: seg-train's own config dir (its files are not checked).

    Raises:
        UserError: Naming the first unknown key, its file and the keys known there.
    """
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    loader = GlobalHydra.instance().config_loader()
    user_sources = [
        s
        for s in loader.get_sources()
        if s.scheme() == "file" and Path(s.path).resolve() != packaged.resolve()
    ]
    if not user_sources:
        return
    from hydra._internal.config_repository import CachingConfigRepository

    repo = CachingConfigRepository(loader.repository)
    defaults = loader.compute_defaults_list(config_name, overrides, RunMode.RUN).defaults
    merged = OmegaConf.create()
    # Packages that only `_*.yaml` blocks (data/_pipeline.yaml) have filled so far: a user's
    # option including such a block still defines its node afresh.
    from_blocks: set[str] = set()
    for default in defaults:
        loaded = loader._load_single_config(default=default, repo=repo)
        scheme, _, path = loaded.path.partition("://")
        source = Path(path).resolve() if scheme == "file" else None
        package = default.package or ""
        if (
            not default.primary
            and source is not None
            and source != packaged.resolve()
            and isinstance(loaded.config, DictConfig)
            and package not in from_blocks
        ):
            file = source / f"{default.config_path}.yaml"
            _check_keys_known(loaded.config, merged, file, package)
        if Path(default.config_path or "").name.startswith("_"):
            if OmegaConf.select(merged, package, default=None) is None:
                from_blocks.add(package)
        else:
            from_blocks.discard(package)
        merged.merge_with(loaded.config)


def _check_keys_known(new: DictConfig, merged: DictConfig, file: Path, package: str) -> None:
    """Raises `UserError` for the first key of `new` that `merged` does not have."""
    if package and package != "_global_":
        node = OmegaConf.select(merged, package, default=None)
        if not isinstance(node, DictConfig):
            return  # the file defines this node afresh (e.g. a new group option)
    _compare(new, merged, "", file)


def _compare(new: DictConfig, known: DictConfig, prefix: str, file: Path) -> None:
    if "_target_" in new and prefix:
        return  # a new object: its keys are its builder's arguments
    for key in new:
        key = str(key)
        if (not prefix and key in ("hydra", "defaults")) or key == "_target_":
            continue
        full_key = f"{prefix}{key}"
        if key not in known:
            section = prefix.rstrip(".")
            where = f" under '{section}'" if section else ""
            names = ", ".join(sorted(str(k) for k in known))
            raise UserError(
                f"unknown config key '{full_key}' in {file} (known keys{where}: {names}); "
                "fix the spelling in that file"
            )
        child, old = new._get_node(key), known._get_node(key)
        if (
            isinstance(child, DictConfig)
            and isinstance(old, DictConfig)
            and not (old._is_none() or old._is_missing() or old._is_interpolation())
        ):
            _compare(child, old, f"{full_key}.", file)


def is_matting_data(data) -> bool:
    """Whether a run's `data` config selects the matting task (`data.task=matting`)."""
    return data.get("task", "segmentation") == "matting"
