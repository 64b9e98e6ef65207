"""The one path guard: every reader and every step that opens a file named by a dataset goes through it.

A dataset names its images and side files by relative paths. Those names are data, and data can be hostile: an
absolute path, ``../`` segments, a symlink inside the folder that points outside it, a FIFO or a device that blocks
the first read forever, a NUL byte. :func:`resolve_inside` turns a name into a real path inside a root folder or
raises :class:`UnsafePath` (a ``ValueError`` whose message says why); :func:`check_regular_file` tells whether a path
is a regular file without opening it for reading (``stat``, never ``open``: opening a FIFO for reading blocks),
:func:`check_output_file` whether a path may be written as an output (absent or a regular file);
:func:`open_regular_file` opens one, refusing anything else (``O_NONBLOCK`` so a FIFO swapped in after the check
cannot block, then ``fstat`` of the descriptor actually opened).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO


class UnsafePath(ValueError):
    """A path a dataset names that the toolkit refuses to read; the message says why."""


def _has_nul(name: str | os.PathLike) -> bool:
    return "\x00" in os.fspath(name)


def is_inside(path: str | Path, root: str | Path) -> bool:
    """Whether the real path of ``path`` (symlinks resolved) lies in the real path of ``root``."""
    real, base = os.path.realpath(path), os.path.realpath(root)
    return real == base or real.startswith(base.rstrip(os.sep) + os.sep)


def resolve_inside(root: str | Path, name: str | Path, *, allow_absolute: bool = False) -> Path:
    """The real path of ``name`` taken relative to ``root``, which must stay inside ``root`` once every symlink is
    resolved. ``allow_absolute``: an absolute ``name`` is accepted when it, too, lies inside ``root``."""
    if _has_nul(name):
        raise UnsafePath(f"{name!r}: the path contains a NUL byte")
    p = Path(name)
    if p.is_absolute() and not allow_absolute:
        raise UnsafePath(f"{name}: absolute paths are not allowed (paths are relative to {root})")
    full = p if p.is_absolute() else Path(root) / p
    if not is_inside(full, root):
        why = "a symlink that leads" if os.path.realpath(full) != os.path.abspath(full) else "it leads"
        raise UnsafePath(f"{name}: {why} outside {root}")
    return Path(os.path.realpath(full))


def resolve_in_dataset(root: str | Path, name: str | Path, *, folder_links: int = 2) -> Path:
    """The real path of ``name`` inside a dataset folder ``root`` (:func:`resolve_inside`), where the toolkit's own
    image placement is trusted: a folder link on the way to the file (``images -> ../source/images`` at the top,
    or one level down, ``images/mention -> /release/images``; at most ``folder_links`` of them) is an image source of
    its own, and the file must stay inside that link's target. Any other symlink (a file link, a link deeper down)
    must stay inside the folder it is in; absolute paths, ``..`` and NUL bytes are refused."""
    if _has_nul(name):
        raise UnsafePath(f"{name!r}: the path contains a NUL byte")
    p = Path(name)
    if p.is_absolute():
        raise UnsafePath(f"{name}: absolute paths are not allowed (paths are relative to {root})")
    if ".." in p.parts:
        raise UnsafePath(f"{name}: '..' leads outside {root}")
    base, parts, i = Path(root), list(p.parts), 0
    while i < len(parts) - 1 and folder_links > 0:
        head = base.joinpath(*parts[:i + 1])
        if head.is_symlink() and head.is_dir():      # a placed image folder: the file stays inside its target
            base, parts, i, folder_links = head, parts[i + 1:], 0, folder_links - 1
        elif head.is_dir():
            i += 1
        else:
            break
    try:
        return resolve_inside(base, Path(*parts))
    except UnsafePath as exc:
        raise UnsafePath(f"{name}: {str(exc).split(': ', 1)[1]}") from None


def regular_file_problem(path: str | Path) -> str | None:
    """``None`` for an existing regular file (after symlinks), else the reason: ``"missing: file not found"`` or
    ``"not a regular file: <kind>"`` (directory, FIFO, socket, device). Never opens the file."""
    if _has_nul(path):
        return "not a regular file: the path contains a NUL byte"
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "missing: file not found"
    except OSError as exc:
        return f"unreadable: {type(exc).__name__}: {exc.strerror or exc}"
    return None if stat.S_ISREG(st.st_mode) else f"not a regular file: {_kind(st.st_mode)}"


def check_regular_file(path: str | Path) -> Path:
    """``path`` when it is a regular file, else :class:`UnsafePath` (``FileNotFoundError`` when missing)."""
    problem = regular_file_problem(path)
    if problem is None:
        return Path(path)
    if problem.startswith("missing"):
        raise FileNotFoundError(f"{path}: file not found")
    raise UnsafePath(f"{path}: {problem}")


def check_output_file(path: str | Path) -> Path:
    """``path`` when it may be written as an output file: absent, or a regular file; else :class:`UnsafePath` (a
    FIFO would block the writer forever, a device or a directory is no file). Every writer of an output path
    checks it (``core.durable_io``, the appending writers)."""
    if _has_nul(path):
        raise UnsafePath(f"{path!r}: the path contains a NUL byte")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return Path(path)
    except OSError as exc:
        raise UnsafePath(f"{path}: cannot write it ({type(exc).__name__}: {exc.strerror or exc})") from None
    if not stat.S_ISREG(st.st_mode):
        raise UnsafePath(f"{path}: not a regular file: {_kind(st.st_mode)} (an output must be a file path)")
    return Path(path)


def open_regular_file(path: str | Path, root: str | Path | None = None) -> BinaryIO:
    """Open ``path`` for binary reading when it is a regular file (inside ``root``, when given); never blocks on a
    FIFO or a device, never follows a symlink out of ``root``."""
    if root is not None:
        path = resolve_inside(root, path, allow_absolute=True)
    check_regular_file(path)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):       # swapped between the check and the open
            raise UnsafePath(f"{path}: not a regular file: {_kind(st.st_mode)}")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a file"
