"""Rank-aware logging: library code logs through here, never with bare prints.

By default only global rank 0 emits INFO records; every rank emits warnings and errors,
prefixed with its rank, so a failure on rank 17 of 256 is still visible.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

from tqdm import tqdm

_CONFIGURED = False

# Third-party warnings every run of ours would print on every rank, none of them actionable for a user:
# megatron-core's notices that apex / TE are absent (our own warning already says which layer spec runs), its
# default CUDA-graph scope's deprecation, torch's deprecation of the collectives megatron calls, and torch's
# notice when megatron reads ``.grad`` of a non-leaf tensor, its notice that an NCCL barrier uses the current
# device (ours: each rank's own GPU, set before the process group), and its deprecations of the checkpoint APIs
# megatron's torch_dist loader calls (``load_state_dict``, ShardedTensor), printed at every resume and export; with
# megatron-core 0.19 also torch's notes that a distributed-checkpoint load runs in one process (the export and the
# pre-flight read checkpoints without a process group, on purpose) and that its ``load`` argument order changed.
_KNOWN_NOISE = (
    (UserWarning, r"Transformer Engine and Apex are not installed"),
    (UserWarning, r"Apex is not installed"),
    (UserWarning, r"full scope is deprecated"),
    (FutureWarning, r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"),
    (UserWarning, r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed"),
    (UserWarning, r"barrier\(\): using the device under current context"),
    (FutureWarning, r"`load_state_dict` is deprecated and will be removed in future versions"),
    (FutureWarning, r"Please use DTensor instead and we are deprecating ShardedTensor"),
    (UserWarning, r"torch\.distributed is disabled, unavailable or uninitialized, assuming the intent is to load in "
                  r"a single process"),
    (UserWarning, r"The argument order of load has been changed"),
)


# Third-party log records, by logger: megatron-core >= 0.19's DDP asks its callers to pass the distributed
# optimizer's parameter layout and warns when they do not; it then computes the layout itself with the bucket size
# and data-parallel group it uses (the same computation Megatron-LM's caller makes), so there is nothing to act on.
_KNOWN_LOG_NOISE = (
    ("megatron.core.distributed.distributed_data_parallel", "full_param_layout not provided"),
)


class _DropMessage(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def quiet_known_warnings() -> None:
    """Hide :data:`_KNOWN_NOISE` and :data:`_KNOWN_LOG_NOISE` (entry points only: a library does not change the
    process's filters)."""
    for category, message in _KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, text in _KNOWN_LOG_NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.text == text for f in logger.filters):
            logger.addFilter(_DropMessage(text))


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


class _BarAwareHandler(logging.StreamHandler):
    """Writes each record through ``tqdm.write``, which clears the progress bars drawn on the same stream first and
    redraws them after; written directly, a record landed on a bar's line (``0 rec [00:00, ? rec/s][19:39:31 r0
    INFO] reading ...``)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:  # noqa: BLE001 - logging's own contract: report through handleError, never raise
            self.handleError(record)


def get_logger(name: str = "bft_megatron") -> logging.Logger:
    """Return a logger under the ``bft_megatron`` hierarchy, configuring the root handler once."""
    global _CONFIGURED
    root = logging.getLogger("bft_megatron")
    if not _CONFIGURED:
        handler = _BarAwareHandler(sys.stderr)
        handler.addFilter(_RankFilter())
        handler.setFormatter(logging.Formatter("[%(asctime)s r%(rank)s %(levelname)s] %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False
        _CONFIGURED = True
    return logging.getLogger(name) if name.startswith("bft_megatron") else root.getChild(name)
