"""The one entry-point wrapper of every command: an expected failure is one line, never a traceback.

``run_main(main)`` calls ``main(argv)`` and turns an expected error into ``error: FILE[, record][, field]: reason``
on stderr and exit status 2 (the message of every toolkit error already starts with the file it is about):

* :class:`~data_process.core.records.DataError` (a bad record), :class:`~data_process.core.settings.ConfigError`
  (a bad setting), :class:`~data_process.core.safe_paths.UnsafePath` and every other ``ValueError``;
* ``OSError``: a missing, unreadable or read-only file, a full disk (the path is added when the error has one);
* ``KeyboardInterrupt``: exit status 130, no traceback.

``--debug`` anywhere on the command line (removed before ``main`` sees it) lets the traceback through instead.
"""

from __future__ import annotations

import errno
import sys
from typing import Callable, NoReturn, Sequence

DEBUG_FLAG = "--debug"


def error_line(exc: BaseException) -> str:
    """``error: ...`` for an expected failure: the message of the toolkit's errors, the path and reason of an
    ``OSError`` (``No space left on device`` is said so)."""
    if isinstance(exc, OSError) and exc.strerror:          # raised by the OS: errno, reason and maybe a path
        where = exc.filename or ""
        reason = exc.strerror
        if exc.errno == errno.ENOSPC:
            reason = "no space left on device (free some space and rerun: finished work is kept)"
        elif exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            reason = f"{reason} (cannot write or read here)"
        text = f"{where}: {reason}" if where else reason
        return f"error: {text}"
    msg = str(exc) or type(exc).__name__
    return msg if msg.startswith("error:") else f"error: {msg}"


def run_main(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> NoReturn:
    """Run ``main`` as a command (see the module docstring) and exit with its status."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in args
    args = [a for a in args if a != DEBUG_FLAG]
    if debug:
        sys.exit(main(args) or 0)
    try:
        code = main(args)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except (ValueError, OSError) as exc:      # DataError, ConfigError, UnsafePath, RunError are ValueErrors
        print(error_line(exc), file=sys.stderr)
        print(f"(rerun with {DEBUG_FLAG} for the traceback)", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)
