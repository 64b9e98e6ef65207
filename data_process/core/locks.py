"""One writer per output: an advisory lock beside every file or folder a command writes to.

``with output_lock(path):`` takes an exclusive ``flock`` on ``PATH.lock`` (created if absent, never deleted: deleting
a lock file another process holds open would let a third one in). The kernel drops a ``flock`` when its process
dies, kill -9 included, so a dead writer never leaves the output stuck; the file's content (the holder's pid and
command) only serves the message a second process gets. A second writer of the same output gets
:class:`OutputLocked` at once (a ``ValueError``: one ``error:`` line, exit status 2), or with ``wait`` it blocks
until the first one is done.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from pathlib import Path
from typing import Iterator


LOCK_SUFFIX = ".lock"


class OutputLocked(ValueError):
    """Another process is writing the same output; the message names the output and the holder."""


def lock_path(output: str | Path) -> Path:
    """The lock file of an output (``OUT.lock`` beside ``OUT``; for a folder ``FOLDER.lock`` beside it)."""
    p = Path(output)
    return p.with_name(p.name + LOCK_SUFFIX)


@contextlib.contextmanager
def output_lock(output: str | Path, wait: bool = False) -> Iterator[Path]:
    """Hold the one-writer lock of ``output`` for the ``with`` block (module docstring)."""
    path = lock_path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "another process"
            raise OutputLocked(f"{output}: another process is writing it ({holder}); wait for it to finish or stop "
                               f"it, then rerun (the lock is {path}; a process that died holds no lock)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}: {' '.join(sys.argv)[:400]}\n".encode("utf-8", "replace"), 0)
        yield path
    finally:
        os.close(fd)        # closing the descriptor releases the flock
