"""The errors tinyswin reports to a user as one line (the CLI turns each into one line and exit code 2).

Anything else that escapes is a bug and keeps its traceback. A write that ran out of room is recognised in one
place (`disk_full_cause`) and reported as a `DiskFullError` (`disk_full_error`).
"""

from __future__ import annotations

import errno
import os

# the errors of a write that ran out of room: no space, over quota, or over the file size limit (RLIMIT_FSIZE)
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG})


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (runs of whitespace joined), or its type's name when it has none."""
    return " ".join(str(exc).split()) or type(exc).__name__


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


class TinyswinError(Exception):
    """A problem with what the user asked for or gave (a value, a file, a run directory); the message says
    what, where, and what to do."""


class ConfigError(TinyswinError, ValueError):
    """A config key with a value outside its range, an unknown key, or a file that is not a config."""


class FieldError(ValueError):
    """A field of a config dataclass refused: `field`, the `value` it had and the `reason`, so that a caller
    names the field without reading the message. Each config has its own subclass, whose `template` makes
    the message from the three.
    """

    template = "{field}={value!r}: {reason}"

    def __init__(self, field: str, value: object, reason: str) -> None:
        super().__init__(self.template.format(field=field, value=value, reason=reason))
        self.field, self.value, self.reason = field, value, reason


class SwinConfigError(FieldError):
    """A `model.SwinConfig` field refused; the message is "SwinConfig.<field>=<value>: <reason>"."""

    template = "SwinConfig.{field}={value!r}: {reason}"


class AugmentConfigError(FieldError):
    """A `data.AugmentConfig` field refused; the message is "augment config: <field> <reason>"."""

    template = "augment config: {field} {reason}"


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


def disk_full_cause(exc: BaseException) -> OSError | None:
    """The out-of-space `OSError` behind `exc` (itself, or one it was raised from or during), or None.

    Of several in the chain, the first that carries the system's text (`strerror`) wins.
    """
    found: list[OSError] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError) and current.errno in DISK_FULL_ERRNOS:
            found.append(current)
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return next((e for e in found if e.strerror), found[0] if found else None)


def disk_full_error(message: str, cause: OSError | None = None) -> DiskFullError:
    """A `DiskFullError` whose text is `message` alone (one line) and whose errno is the cause's (ENOSPC
    without one)."""
    error = DiskFullError(message)
    error.errno = cause.errno if cause is not None else errno.ENOSPC
    return error


def disk_full_reason(cause: OSError) -> str:
    """The system's words for an out-of-space error ('No space left on device')."""
    return cause.strerror or os.strerror(cause.errno or 0)
