"""Small file helpers shared by the checkpoint and data layers."""

from __future__ import annotations

import os
import tempfile

__all__ = ["atomic_write_text", "default_file_mode"]


def default_file_mode() -> int:
    """What ``open(path, "w")`` gives a new file: 0o666 minus the process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


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
