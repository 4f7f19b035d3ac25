"""The errors tinyswin reports to a user as one line (the CLI turns each into one line and exit code 2).

Anything else that escapes is a bug and keeps its traceback.
"""


class TinyswinError(Exception):
    """A problem with what the user asked for or gave (a value, a file, a run directory); the message says
    what, where, and what to do."""


class ConfigError(TinyswinError, ValueError):
    """A config key with a value outside its range, an unknown key, or a file that is not a config."""


class RunDirError(TinyswinError, ValueError):
    """A run directory that cannot be used as asked: another training holds it, it is not a run, it holds a
    run already, or there is nothing to resume."""


class DiskFullError(TinyswinError, OSError):
    """A write failed for lack of space (ENOSPC) or quota (EDQUOT); the files written before stay valid."""


class Interrupted(TinyswinError):
    """Training stopped by SIGINT or SIGTERM between two steps; nothing half-written, `--resume` continues.

    Args:
        message: the one line for the user.
        signum: the signal received (the CLI exits with 128 + signum).
    """

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
