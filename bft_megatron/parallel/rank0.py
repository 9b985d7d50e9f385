"""Run a step on global rank 0 only and let every rank fail together if it fails.

Used where one rank must do file work the others then depend on (first-use data preparation and its check,
the HF export's metadata): a rank-0 error that the others never heard of would leave them waiting in the next
collective until the process-group timeout. Pass ``ParallelGroups.control`` as the group where rank 0's work
can take long (its timeout is hours, not ``parallel.timeout_minutes``).
"""

from __future__ import annotations

import torch.distributed as dist

from bft_megatron.config.base import ConfigError

__all__ = ["on_rank0", "rank0_value"]

# Exception types the other ranks re-raise as themselves, with the same message (ConfigError also for its
# subclasses: the CLI exits 2 on every rank); anything else becomes a RuntimeError that names it.
_KINDS = {cls.__name__: cls for cls in (ConfigError, FileExistsError, FileNotFoundError, ValueError, KeyError)}


def _describe(error: Exception) -> tuple[str, str]:
    return ("ConfigError" if isinstance(error, ConfigError) else type(error).__name__), str(error)


def on_rank0(fn, what: str, group: dist.ProcessGroup | None = None, cleanup=None) -> None:
    """Call ``fn()`` on global rank 0; one broadcast over ``group`` (a world-sized group; None: the default
    group) carries its outcome. It is also a barrier: the others go on only once rank 0 is done, waiting up to
    ``group``'s timeout. Every rank raises if ``fn`` raised; ``cleanup()`` runs on rank 0 after a failure.
    Without a process group it is the same minus the broadcast."""
    _run_on_rank0(fn, what, group, cleanup, share=False)


def rank0_value(fn, what: str, group: dist.ProcessGroup | None = None):
    """``fn()`` on global rank 0, its (small, picklable) result returned on every rank in the same single
    broadcast; failures as :func:`on_rank0`. For decisions every rank must share, such as which checkpoint
    ``latest`` names: read on each node, a filesystem that caches metadata per node (NFS after a quick requeue)
    could answer differently."""
    return _run_on_rank0(fn, what, group, None, share=True)


def _run_on_rank0(fn, what: str, group, cleanup, share: bool):
    distributed = dist.is_initialized()
    error = value = None
    if not distributed or dist.get_rank() == 0:
        try:
            value = fn()
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the other ranks know
            error = exc
            if cleanup is not None:
                cleanup()
    box = [(None if error is None else _describe(error), value if share else None)]
    if distributed:
        dist.broadcast_object_list(box, src=0, group=group)
    if error is not None:
        raise error
    failure, shared = box[0]
    if failure is not None:
        kind, message = failure
        if kind in _KINDS:
            raise _KINDS[kind](message)
        raise RuntimeError(f"{what} failed on rank 0: {kind}: {message}")
    return shared
