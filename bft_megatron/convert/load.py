"""Load a dist checkpoint's model weights into freshly built chunks (any TP/PP/VP).

The trainer's :class:`bft_megatron.checkpoint.manager.Checkpointer` does the same for training
runs (``checkpoint.finetune=true``); this helper serves tests and scripts that need weights only.
"""

from __future__ import annotations

import torch

from bft_megatron.checkpoint.weights import load_model_weights
from bft_megatron.convert.exporter import resolve_checkpoint_dir

__all__ = ["load_weights"]


def load_weights(model_chunks: list[torch.nn.Module], ckpt: str) -> str:
    """Fill ``model_chunks`` (collective over the world) from ``ckpt``; returns the resolved directory."""
    path = resolve_checkpoint_dir(ckpt)
    load_model_weights(model_chunks, path)
    return path
