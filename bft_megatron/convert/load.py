"""Load a dist checkpoint's model weights into freshly built chunks (any TP/PP/VP).

The trainer's :class:`bft_megatron.checkpoint.manager.Checkpointer` does the same for training
runs (``checkpoint.finetune=true``); this helper serves tests and scripts that need weights only.
"""

from __future__ import annotations

import torch

from bft_megatron.convert.exporter import resolve_checkpoint_dir
from bft_megatron.convert.live_export import unwrap

__all__ = ["load_weights"]


def load_weights(model_chunks: list[torch.nn.Module], ckpt: str) -> str:
    """Fill ``model_chunks`` (collective over the world) from ``ckpt``; returns the resolved directory."""
    from megatron.core import dist_checkpointing

    path = resolve_checkpoint_dir(ckpt)
    request = {f"model{i}" if len(model_chunks) > 1 else "model": unwrap(c).sharded_state_dict()
               for i, c in enumerate(model_chunks)}
    loaded = dist_checkpointing.load(request, path)
    for i, chunk in enumerate(model_chunks):
        unwrap(chunk).load_state_dict(loaded[f"model{i}" if len(model_chunks) > 1 else "model"])
    return path
