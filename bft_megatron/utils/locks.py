"""Advisory whole-file locks (``flock``) that say who holds them, for directories several jobs may share.

A lock file is opened, ``flock``-ed and, once held, overwritten with one JSON line naming its holder (host, pid,
SLURM job, start time), which a refused job reads to say who is in the way. The file is never removed:
unlinking a lock file lets two later holders lock two different inodes. The kernel drops a lock when every
descriptor of its open file is closed, so a killed holder (SIGKILL included) frees it, and a forked child (such
as megatron's asynchronous checkpoint writer) keeps it held until it has exited too. Descriptors are not
inherited across ``exec``.

Some file systems cannot lock: Lustre mounted without ``-o flock`` (ENOSYS), NFS without a lock daemon (ENOLCK),
some FUSE mounts (EOPNOTSUPP, EINVAL). :class:`LockUnsupported` lets the caller warn and carry on. NFS mounted
``-o nolock`` and Lustre ``-o localflock`` lock within one node only: a holder on another node goes unseen.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from collections.abc import Callable

__all__ = ["HeldLock", "LockUnsupported", "try_lock", "wait_for_lock", "holder_text"]

_UNSUPPORTED = {errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL}


class LockUnsupported(OSError):
    """The file system of the lock file does not implement ``flock``."""


class HeldLock:
    """A lock on ``path``, held until :meth:`release` or the process (and its forks) end."""

    def __init__(self, path: str, fd: int) -> None:
        self.path, self.fd = path, fd

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the descriptor drops the lock
            self.fd = -1


def _holder_record() -> str:
    return json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                       "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                       "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}) + "\n"


def try_lock(path: str, shared: bool = False) -> tuple[HeldLock | None, dict]:
    """``(lock, {})`` once ``path`` is locked by this process, else ``(None, holder)`` with the holder's record
    (empty if it has not written it yet). ``shared``: a shared lock, which other shared holders may hold too
    (the record is then the last one's). Raises :class:`LockUnsupported` where the file system cannot lock."""
    import fcntl

    try:
        fd, writable = os.open(path, os.O_RDWR | os.O_CREAT, 0o666), True  # the umask decides who else may write
    except PermissionError:  # another user's lock file: flock works on a read-only descriptor (no holder record)
        fd, writable = os.open(path, os.O_RDONLY), False
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except OSError as exc:
        holder = _read_holder(fd)
        os.close(fd)
        if exc.errno in _UNSUPPORTED:
            raise LockUnsupported(exc.errno, f"{path}: the file system cannot lock ({os.strerror(exc.errno)})") \
                from None
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise
        return None, holder
    if writable:
        os.ftruncate(fd, 0)
        os.pwrite(fd, _holder_record().encode(), 0)
    return HeldLock(path, fd), {}


def wait_for_lock(path: str, poll_s: float, may_wait: Callable[[dict, float], bool],
                  on_wait: Callable[[dict], None]) -> tuple[HeldLock | None, dict]:
    """:func:`try_lock` every ``poll_s`` until ``path`` is locked (``(lock, {})``) or ``may_wait(holder, waited
    seconds)`` is False (``(None, holder)``); ``on_wait(holder)`` once, when the waiting starts. Raises as
    :func:`try_lock`."""
    start, waiting = time.monotonic(), False
    while True:
        lock, holder = try_lock(path)
        if lock is not None or not may_wait(holder, time.monotonic() - start):
            return lock, holder
        if not waiting:
            on_wait(holder)
            waiting = True
        time.sleep(poll_s)


def _read_holder(fd: int) -> dict:
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode(errors="replace") or "{}")
    except ValueError:  # being written by its holder this instant
        return {}
    return record if isinstance(record, dict) else {}


def holder_text(holder: dict) -> str:
    """``host h, pid p, SLURM job j, since t`` (the parts known), or ``holder unknown``."""
    parts = [(label, holder.get(key)) for label, key in
             (("host", "host"), ("pid", "pid"), ("SLURM job", "slurm_job_id"), ("since", "since"))]
    return ", ".join(f"{label} {value}" for label, value in parts if value) or "holder unknown"
