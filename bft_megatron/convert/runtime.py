"""Process-group plumbing for the offline converters (single process, gloo).

megatron's dist_checkpointing needs ``torch.distributed``; the CLI converters run as one process.
:func:`process_group` initialises a one-rank gloo group through a file store (no TCP port to
collide with other jobs) when none exists and tears it down afterwards; inside an already
initialised job (torchrun, tests) it does nothing.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator

import torch.distributed as dist

__all__ = ["process_group"]


@contextlib.contextmanager
def process_group() -> Iterator[bool]:
    """Yield True if this context created (and will destroy) the default process group.

    The offline converters are single-process tools: inside a job of several ranks every rank would
    write (or request) the same tensors, so that is refused.
    """
    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise RuntimeError(f"the offline converters run as one process, not inside a job of "
                               f"{dist.get_world_size()} ranks (use export_to_hf from a training job)")
        yield False
        return
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'store')}", rank=0, world_size=1)
        try:
            yield True
        finally:
            from megatron.core import parallel_state as ps

            if ps.model_parallel_is_initialized():
                ps.destroy_model_parallel()
            dist.destroy_process_group()
