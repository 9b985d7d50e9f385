"""Checkpoint directory layout and the atomic ``latest`` pointer.

``<save>/iter_0000042/`` holds one megatron dist checkpoint (torch_dist). ``<save>/latest`` is a
one-line text file naming the newest *complete* checkpoint; it is written to a temporary file,
fsynced and renamed over the old one (atomic on POSIX) only after every rank finished writing. A
crash or kill during a save therefore leaves ``latest`` at the previous complete checkpoint and the
half-written ``iter_`` directory is ignored (and removed by the next successful save's cleanup).
"""

from __future__ import annotations

import os
import re
import shutil

__all__ = ["iter_dirname", "read_latest", "write_latest", "resolve_load_dir", "list_iterations", "prune"]

LATEST = "latest"
_ITER_RE = re.compile(r"^iter_(\d{7,})$")


def iter_dirname(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def read_latest(run_dir: str) -> str | None:
    """Absolute path of the checkpoint ``latest`` names, or None if there is none."""
    path = os.path.join(run_dir, LATEST)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as fh:
        name = fh.read().strip()
    return os.path.join(run_dir, name) if name else None


def write_latest(run_dir: str, iteration: int) -> None:
    """Atomically point ``latest`` at ``iter_<iteration>`` (call on one rank, after all ranks saved)."""
    tmp = os.path.join(run_dir, f".{LATEST}.tmp.{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(iter_dirname(iteration) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, os.path.join(run_dir, LATEST))
    dir_fd = os.open(run_dir, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def resolve_load_dir(path: str) -> str | None:
    """``checkpoint.load`` may name a run directory (use its ``latest``) or one ``iter_`` directory."""
    if _ITER_RE.match(os.path.basename(os.path.normpath(path))):
        return path if os.path.isdir(path) else None
    return read_latest(path)


def list_iterations(run_dir: str) -> list[int]:
    if not os.path.isdir(run_dir):
        return []
    return sorted(int(m.group(1)) for m in map(_ITER_RE.match, os.listdir(run_dir)) if m)


def prune(run_dir: str, keep_last: int | None, current: int) -> list[int]:
    """Remove checkpoints older than the newest ``keep_last`` complete ones, and stale partial ones.

    Partial directories are those newer than nothing we know is complete: anything not ``<= current``
    is left alone (another save may be in flight); older-than-kept ones are deleted. Returns removed
    iterations.
    """
    its = [i for i in list_iterations(run_dir) if i <= current]
    keep = set(its[-keep_last:]) if keep_last else set(its)
    keep.add(current)
    removed = [i for i in its if i not in keep]
    for i in removed:
        shutil.rmtree(os.path.join(run_dir, iter_dirname(i)), ignore_errors=True)
    return removed
