"""Checks that every rank of a job agrees, run on the world group before megatron's model-parallel groups exist.

Each node's launcher reads its own command line: a node started with another override (``train.lr``,
``train.global_batch_size``) trained on silently with mixed settings (mixed step counts in the logs), and another
``parallel.tp`` hung in megatron's group creation until the collective timeout (30 minutes) with a store error
naming neither. ``checkpoint.save`` must be one directory every rank writes into: a relative path started from
another working directory, or a file system not shared between nodes, left a checkpoint committed as complete
with some ranks' shards elsewhere (the resume then failed on a missing ``.distcp`` file).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
import uuid

import torch.distributed as dist

from bft_megatron.config.base import ConfigError, format_value, to_dict

__all__ = ["check_job", "check_same_config", "check_shared_directory"]

_SHOWN = 8  # differences named in the error
SHARED_WAIT_S = 10.0


def _flatten(data: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _gather(value, group) -> list:
    everyone = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, value, group=group)
    return everyone


def check_same_config(cfg, group=None) -> None:
    """Raise :class:`ConfigError` on every rank if the ranks' resolved configs differ, naming the fields, ranks and
    hosts (first a hash per rank; the configs themselves only when the hashes differ)."""
    flat = _flatten(to_dict(cfg))
    digest = hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()
    if len(set(_gather(digest, group))) == 1:
        return
    everyone = _gather((socket.gethostname(), flat), group)
    _, first = everyone[0]
    differences = []
    for rank, (host, mine) in enumerate(everyone[1:], start=1):
        for key in sorted(set(first) | set(mine)):
            if first.get(key) != mine.get(key):
                differences.append(f"rank {rank} ({host}): {key}={format_value(mine.get(key))} "
                                   f"(rank 0: {format_value(first.get(key))})")
    more = f"; and {len(differences) - _SHOWN} more" if len(differences) > _SHOWN else ""
    raise ConfigError(f"the ranks were started with different configs: {'; '.join(differences[:_SHOWN])}{more}. "
                      "Start every node with the same --config and overrides")


def check_shared_directory(path: str, field: str, group=None) -> None:
    """Raise :class:`ConfigError` on every rank unless every rank sees the file global rank 0 writes into ``path``
    (one shared directory). Waits up to :data:`SHARED_WAIT_S` for a slow file system's view to catch up."""
    rank = dist.get_rank()
    written = None
    if rank == 0:
        written = (f".shared-check-{uuid.uuid4().hex}", None)
        try:
            os.makedirs(path, exist_ok=True)
            with open(os.path.join(path, written[0]), "w", encoding="utf-8") as fh:
                fh.write(written[0])
        except OSError as exc:
            written = (written[0], f"{type(exc).__name__}: {exc}")
    name, error = _gather(written, group)[0]  # after rank 0's write (and the others learn whether it failed)
    if error:
        raise ConfigError(f"{field}={path}: global rank 0 cannot write there ({error})")
    probe = os.path.join(path, name)
    deadline = time.monotonic() + SHARED_WAIT_S
    seen = os.path.isfile(probe)
    while not seen and time.monotonic() < deadline:
        time.sleep(0.5)
        seen = os.path.isfile(probe)
    views = _gather((seen, socket.gethostname(), os.path.abspath(path)), group)
    if rank == 0:
        os.unlink(probe)
    blind = [f"rank {r} ({host}, {where})" for r, (ok, host, where) in enumerate(views) if not ok]
    if blind:
        shown = ", ".join(blind[:_SHOWN]) + (f" and {len(blind) - _SHOWN} more" if len(blind) > _SHOWN else "")
        raise ConfigError(f"{field}={path} is not one directory shared by every rank: {shown} do not see the file "
                          f"rank 0 ({views[0][1]}, {views[0][2]}) wrote there. Every rank writes its shards into it: "
                          "use an absolute path on a file system every node mounts")


def check_job(cfg, group=None, writes: bool = True) -> None:
    """The trainer's agreement checks (a no-op in a one-process job); ``writes`` false (``--eval-only``): nothing
    will be written into ``checkpoint.save``, so it is not probed."""
    if dist.get_world_size(group) == 1:
        return
    check_same_config(cfg, group)
    if cfg.checkpoint.save and writes:
        check_shared_directory(cfg.checkpoint.save, "checkpoint.save", group)
