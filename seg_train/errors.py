"""The exception types for problems the user can fix, and their one-line descriptions.

The CLI prints a `UserError` (bad config, missing files, ...), a config error from Hydra or
OmegaConf, or a full disk as a single line naming the key or file and the fix
(`describe_error`), and exits with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import os
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import yaml
    from omegaconf.errors import OmegaConfBaseException

# Write failures that mean "the disk is full" (or failing), not a bug: one line and exit 2.
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EIO)


class UserError(Exception):
    """A problem with the user's input; the message names the culprit and says how to fix it."""


class Preempted(Exception):
    """Training stopped on SIGTERM/SIGINT after writing a backup; the run can be resumed."""

    exit_code = 75  # EX_TEMPFAIL: try again later


def is_no_space(exc: BaseException) -> bool:
    """Whether `exc` is a full disk, an exceeded quota or an I/O error (h5py's included)."""
    return isinstance(exc, OSError) and exc.errno in NO_SPACE_ERRNOS


def describe_error(exc: BaseException) -> str:
    """Returns a one-line explanation of a user error, naming the config key and the fix."""
    # Imported here: every layer imports this module, and only the CLI describes errors.
    from hydra.errors import MissingConfigException
    from omegaconf.errors import (
        ConfigAttributeError,
        ConfigKeyError,
        MissingMandatoryValue,
        OmegaConfBaseException,
    )

    cause = exc.__cause__ if isinstance(exc.__cause__, (OmegaConfBaseException, UserError)) else exc
    if isinstance(cause, UserError):  # e.g. raised by a builder inside hydra.utils.instantiate
        return str(cause)
    first_line = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and "not in struct" in first_line:
        return _describe_unknown_key(cause)
    missing = re.search(r"Missing mandatory value: ([\w.]+)", str(cause))
    if isinstance(cause, MissingMandatoryValue) or missing:
        key = missing.group(1) if missing else getattr(cause, "full_key", "?")
        return f"config key '{key}' is required but has no value; set it, e.g. {key}=..."
    if isinstance(exc, MissingConfigException) and exc.missing_cfg_file:
        group, _, option = exc.missing_cfg_file.rpartition("/")
        available = ", ".join(exc.options or []) or "none"
        return (
            f"config group '{group}' has no option '{option}' (available: {available}); "
            "see seg-train --help"
        )
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        return f"config key '{cause.full_key}': {first_line}"
    if is_no_space(exc):  # a write site without its own DiskFull check (e.g. a CSV row)
        where = exc.filename or "a file of the run dir"
        return (
            f"cannot write {where}: {os.strerror(exc.errno)}; free some space or choose "
            "another location (hydra.run.dir, infer.output_dir), then run again"
        )
    if isinstance(exc, OSError) and exc.filename:  # e.g. a run dir that cannot be written
        return (
            f"cannot use {exc.filename}: {exc.strerror}; choose a writable location "
            "(hydra.run.dir, infer.output_dir, export.output_dir) or fix its permissions"
        )
    lexer = re.search(r"LexerNoViableAltException: ([^=\s]+)=(.*?)\s+\^", str(exc))
    if lexer:  # e.g. a path with non-ASCII letters, which Hydra's override grammar rejects
        key, value = lexer.groups()
        return (
            f"cannot read the value of {key} ({value!r}): Hydra's override grammar takes "
            f"unquoted values in ASCII only; quote it, e.g. '{key}=\"{value}\"' (the outer "
            "single quotes are for the shell)"
        )
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def describe_yaml_error(exc: yaml.YAMLError) -> str:
    """`FILE:LINE:COLUMN: problem` for a YAML syntax error (PyYAML's marks count from 0)."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    if mark is None:
        return f"a config file is not valid YAML: {' '.join(str(exc).split())}"
    problem = getattr(exc, "problem", None) or "syntax error"
    context, start = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and start is not None and start.line != mark.line:
        context = f"{context} opened at line {start.line + 1}"
    what = f"{problem} ({context})" if context else problem
    return (
        f"{mark.name}:{mark.line + 1}:{mark.column + 1}: YAML syntax error: {what}; "
        "fix this config file"
    )


def _describe_unknown_key(error: OmegaConfBaseException) -> str:
    from omegaconf import OmegaConf

    parent = getattr(error, "parent_node", None)
    section, _, _ = error.full_key.rpartition(".")
    known = ""
    if OmegaConf.is_dict(parent):
        where = f" under '{section}'" if section else ""
        known = f" (known keys{where}: " + ", ".join(sorted(str(k) for k in parent)) + ")"
    return (
        f"unknown config key '{error.full_key}'{known}; fix the spelling, "
        f"or add a new key on purpose with +{error.full_key}=..."
    )
