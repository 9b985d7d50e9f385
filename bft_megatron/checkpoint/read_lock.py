"""Readers of a checkpoint keep a run's ``keep_last`` pruning away from it.

A run saving with ``checkpoint.keep_last`` deletes its older ``iter_`` directories at each commit. Another job
reading one of them at that moment (``convert export`` of an intermediate checkpoint, a run fine-tuning from a
live run's ``latest``) lost its files midway. A reader now holds a shared ``flock`` on ``<iter_dir>/.readers.lock``
while it reads; the pruner takes the same file exclusively (non-blocking) before it deletes the directory, and
keeps a directory somebody reads for a later commit (which prunes it by age once it is free). A directory to delete
is first renamed aside, under the lock, so that no reader can start on it while it is being deleted.

Races, all resolved toward "the reader sees the directory gone": a pruner holding the file exclusively (deleting
now), a lock file unlinked between the reader's open and its lock, a directory renamed aside between them, a lock
file created in a directory whose other files are already deleted (where it could not be renamed: the completeness
check after locking). Where the lock cannot be taken (a read-only directory or file system, a file system without
``flock``) the reader reads unprotected, as before, and the pruner deletes as before.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager

from bft_megatron.utils.locks import HeldLock, LockUnsupported, try_lock
from bft_megatron.utils.logging import get_logger

__all__ = ["READ_LOCK", "CheckpointRemoved", "reading", "remove_unless_read", "remove_pruning_leftovers", "moved_aside"]

READ_LOCK = ".readers.lock"
PRUNING = ".pruning-"  # a directory renamed aside for deletion: .iter_N.pruning-<pid>
_MARKER = "metadata.json"  # megatron's: written with the checkpoint, gone once a deletion reached it
_log = get_logger(__name__)


class CheckpointRemoved(FileNotFoundError):
    """The checkpoint directory was deleted (pruned) before or while it was being read."""


@contextmanager
def reading(ckpt_dir: str) -> Iterator[None]:
    """Hold ``ckpt_dir``'s read lock for the body. Raises :class:`CheckpointRemoved` when the directory is gone
    or being deleted."""
    lock = _acquire(ckpt_dir)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _acquire(ckpt_dir: str) -> HeldLock | None:
    path = os.path.join(ckpt_dir, READ_LOCK)
    try:
        lock, _ = try_lock(path, shared=True)
    except LockUnsupported:
        return None
    except OSError as exc:
        if not os.path.isdir(ckpt_dir):
            raise CheckpointRemoved(f"{ckpt_dir} was deleted") from exc
        _log.debug("%s: not locked for reading (%s)", ckpt_dir, exc)  # read-only: read it as before
        return None
    if lock is None:  # a pruner holds it exclusively: it is deleting the directory
        raise CheckpointRemoved(f"{ckpt_dir} was being deleted")
    if not _same_file(path, lock.fd) or not os.path.isfile(os.path.join(ckpt_dir, _MARKER)):
        lock.release()  # unlinked between our open and our lock, or created in a half-deleted directory
        raise CheckpointRemoved(f"{ckpt_dir} was deleted")
    return lock


def _same_file(path: str, fd: int) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def remove_unless_read(ckpt_dir: str) -> dict | None:
    """Delete ``ckpt_dir`` unless a reader holds its read lock; returns that reader's record (possibly empty)
    when the directory is kept, None once it is deleted."""
    try:
        lock, holder = try_lock(os.path.join(ckpt_dir, READ_LOCK))
    except OSError:  # no flock here, a directory already gone or not writable: delete as before
        lock = None
    else:
        if lock is None:
            return holder
    try:
        shutil.rmtree(moved_aside(ckpt_dir), ignore_errors=True)
    finally:
        if lock is not None:
            lock.release()
    return None


def moved_aside(ckpt_dir: str) -> str:
    """Rename ``ckpt_dir`` to a hidden sibling (``.iter_N.pruning-<pid>``) before deleting it: ``rmtree`` deletes in
    listing order, and a reader arriving after the lock file went but before ``metadata.json`` did would create a
    new lock file, lock it and read a directory being deleted. Renamed, its path is gone at once (a reader's open
    fails: removed). Returns the path to delete (``ckpt_dir`` itself where it cannot be renamed)."""
    aside = os.path.join(os.path.dirname(os.path.normpath(ckpt_dir)),
                         f".{os.path.basename(os.path.normpath(ckpt_dir))}{PRUNING}{os.getpid()}")
    try:
        os.rename(ckpt_dir, aside)
    except OSError:
        return ckpt_dir
    return aside


def remove_pruning_leftovers(run_dir: str) -> None:
    """Directories a pruner killed mid-deletion left behind (``.iter_N.pruning-<pid>``)."""
    try:
        names = os.listdir(run_dir)
    except OSError:
        return
    for name in names:
        if name.startswith(".iter_") and PRUNING in name:
            shutil.rmtree(os.path.join(run_dir, name), ignore_errors=True)
