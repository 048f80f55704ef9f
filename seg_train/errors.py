"""The one exception type for problems the user can fix (bad config, missing files, ...).

The CLI prints a `UserError` as a single line and exits with status 2; anything else is a bug
and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input; the message names the culprit and says how to fix it."""


class Preempted(Exception):
    """Training stopped on SIGTERM/SIGINT after writing a backup; the run can be resumed."""

    exit_code = 75  # EX_TEMPFAIL: try again later
