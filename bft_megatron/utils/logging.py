"""Rank-aware logging: library code logs through here, never with bare prints.

By default only global rank 0 emits INFO records; every rank emits warnings and errors,
prefixed with its rank, so a failure on rank 17 of 256 is still visible.
"""

from __future__ import annotations

import logging
import os
import sys

_CONFIGURED = False


def _global_rank() -> int:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass
    return int(os.environ.get("RANK", "0"))


class _RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        rank = _global_rank()
        record.rank = rank
        return rank == 0 or record.levelno >= logging.WARNING or getattr(record, "all_ranks", False)


def get_logger(name: str = "bft_megatron") -> logging.Logger:
    """Return a logger under the ``bft_megatron`` hierarchy, configuring the root handler once."""
    global _CONFIGURED
    root = logging.getLogger("bft_megatron")
    if not _CONFIGURED:
        handler = logging.StreamHandler(sys.stderr)
        handler.addFilter(_RankFilter())
        handler.setFormatter(logging.Formatter("[%(asctime)s r%(rank)s %(levelname)s] %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False
        _CONFIGURED = True
    return logging.getLogger(name) if name.startswith("bft_megatron") else root.getChild(name)
