"""Small file helpers shared by the checkpoint and data layers."""

from __future__ import annotations

import os
import tempfile

__all__ = ["atomic_write_text", "default_dir_mode", "default_file_mode", "file_in_the_way", "not_a_directory"]


def file_in_the_way(directory: str | None) -> str | None:
    """The path at or above ``directory`` that exists and is not a directory (``os.makedirs`` would fail on it):
    ``directory`` itself as given, or the absolute path of the file above it; None when nothing is in the way."""
    path = os.path.abspath(directory) if directory else None
    while path and not os.path.exists(path):
        parent = os.path.dirname(path)
        path = parent if parent != path else None
    if path is None or os.path.isdir(path):
        return None
    return directory if path == os.path.abspath(directory) else path


def not_a_directory(directory: str | None) -> str | None:
    """``"D exists and is not a directory"`` or ``"D: F exists and is not a directory"`` (F a file above D), for
    messages about a directory a command is about to create or write into; None when it can."""
    blocker = file_in_the_way(directory)
    if blocker is None:
        return None
    return f"{directory} exists and is not a directory" if blocker == directory else \
        f"{directory}: {blocker} exists and is not a directory"


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def default_file_mode() -> int:
    """What ``open(path, "w")`` gives a new file: 0o666 minus the process's umask."""
    return 0o666 & ~_umask()


def default_dir_mode() -> int:
    """What ``os.mkdir`` gives a new directory: 0o777 minus the process's umask."""
    return 0o777 & ~_umask()


def _new_file_mode(path: str) -> int:
    """The existing file's permission bits, else :func:`default_file_mode`."""
    try:
        return os.stat(path).st_mode & 0o777
    except FileNotFoundError:
        return default_file_mode()


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or all of the new one: a temporary file in
    the same directory (a unique name: jobs on several hosts may share the directory), fsynced, given the old
    file's permissions, renamed over ``path``, then the directory fsynced (the rename survives a crash)."""
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.tmp.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _new_file_mode(path))
        os.replace(tmp, path)
    except BaseException:
        try:  # a failed write leaves the old file and no stray temporary
            os.remove(tmp)
        except OSError:
            pass
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
