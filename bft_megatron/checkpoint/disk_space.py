"""Free space against a checkpoint's size: a warning before a save that cannot fit, a plain reason after one that
did not.

A full filesystem does not fail a torch_dist save with "No space left on device": the writer thread's error is
torch's zip writer's ``[enforce fail at inline_container.cc] unexpected pos 704 vs 598``, wrapped in megatron's
``CheckpointException ... Worker failure`` (seen on an H200 with four 17 GB checkpoints on a 64 GiB disk), hours
into a run. ``checkpoint.keep_last`` prunes only after a save is complete, so a run needs room for keep_last + 1.
"""

from __future__ import annotations

import contextlib
import os
import shutil

import torch
import torch.distributed as dist

from bft_megatron.utils.logging import get_logger

__all__ = ["state_bytes", "checkpoint_bytes", "free_bytes", "size_text", "space_warning", "keep_last_advice",
           "explain_failed_save"]

_log = get_logger(__name__)
_GIB = 1024 ** 3
_MARGIN = 1.02  # metadata, the HF files, rounding of file sizes


def state_bytes(sharded_state_dict: dict) -> int:
    """Bytes this rank's part of a ``sharded_state_dict`` adds to a checkpoint: its main replicas only (megatron
    writes one copy of what several ranks hold), tensors and the tensors behind factories; small objects (RNG,
    scheduler, train state) are in the margin."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory, is_main_replica

    total = 0
    for value in nested_values(sharded_state_dict):
        if isinstance(value, (ShardedTensor, ShardedTensorFactory)) and is_main_replica(value.replica_id):
            data = value.data
            if isinstance(data, torch.Tensor):
                total += data.numel() * data.element_size()
    return total


def checkpoint_bytes(sharded_state_dict: dict, group: dist.ProcessGroup | None) -> int:
    """The whole checkpoint's size, summed over ``group`` (a world-sized gloo group; None: no process group).
    A collective: every rank calls it at every save."""
    local = torch.tensor([state_bytes(sharded_state_dict)], dtype=torch.int64)
    if dist.is_initialized():
        dist.all_reduce(local, group=group)
    return int(local.item())


def free_bytes(directory: str) -> int | None:
    """Free bytes on ``directory``'s filesystem for this user (its nearest existing parent; None if unknown).
    Quotas (Lustre, GPFS) are not seen here: a quota can still end a save that this says fits."""
    path = os.path.abspath(directory)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def size_text(n: float) -> str:
    """``17.3 GiB``, ``2.5 MiB``: bytes in the largest binary unit that keeps a number >= 1."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def space_warning(where: str, need: int, free: int | None, advice: str) -> str | None:
    """The warning for writing ``need`` bytes at ``where`` (``"checkpoint.save=DIR"``, ``"--out DIR"``) with
    ``free`` bytes left on its filesystem, or None if it fits (or ``free`` is unknown)."""
    if free is None or free >= need * _MARGIN:
        return None
    return (f"{where}: {size_text(free)} free on its filesystem, but this checkpoint needs about {size_text(need)}: "
            f"the write will likely fail when the disk fills ({advice})")


def keep_last_advice(keep_last: int | None) -> str:
    """What to do about a save that does not fit, given ``checkpoint.keep_last``."""
    if keep_last:
        return (f"free space there; checkpoint.keep_last={keep_last} prunes only after a save is complete, so "
                f"{keep_last} + 1 checkpoints must fit")
    return "free space there, or set checkpoint.keep_last=N to prune old checkpoints"


@contextlib.contextmanager
def explain_failed_save(directory: str, need: int):
    """Re-raise a failed save's exception after logging, if the filesystem is (nearly) full, that this is why:
    torch's own message for it does not say so."""
    try:
        yield
    except Exception:
        free = free_bytes(directory)
        if free is not None and free < max(_GIB, need // 100):  # a write that hit the end filled the disk
            _log.error("checkpoint save into %s failed with %s free on its filesystem (the checkpoint needs about "
                       "%s): the disk is full, which torch reports as 'unexpected pos' or 'Worker failure'. 'latest' "
                       "still names the previous complete checkpoint", directory, size_text(free), size_text(need))
        raise
