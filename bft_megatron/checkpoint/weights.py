"""Weights-only loading of a dist checkpoint into built model chunks (fine-tuning, imports, tests).

A checkpoint made by ``bft-megatron convert import`` (or on CPU with the local layer spec) has no
Transformer Engine ``_extra_state`` entries (FP8 scaling metadata); a TE model asks for them. For a
weights-only load they carry nothing we want (a fine-tune starts its FP8 statistics afresh), so they are
left out of the request and are the only keys allowed to stay missing.
"""

from __future__ import annotations

import torch

from bft_megatron.checkpoint.state import unwrap

__all__ = ["load_model_weights"]

_EXTRA = "_extra_state"


def _keys(model: list[torch.nn.Module]) -> list[str]:
    return ["model"] if len(model) == 1 else [f"model{i}" for i in range(len(model))]


def load_model_weights(model: list[torch.nn.Module], path: str, strategy=None) -> None:
    """Fill every chunk of ``model`` from the checkpoint directory ``path`` (collective; any TP/PP/VP).
    ``strategy``: a dist_checkpointing load strategy (None: megatron's default for the checkpoint)."""
    from megatron.core import dist_checkpointing

    request = {key: {k: v for k, v in unwrap(chunk).sharded_state_dict().items() if not k.endswith(_EXTRA)}
               for key, chunk in zip(_keys(model), model)}
    loaded = dist_checkpointing.load(request, path, sharded_strategy=strategy)
    for key, chunk in zip(_keys(model), model):
        missing, unexpected = unwrap(chunk).load_state_dict(loaded[key], strict=False)
        bad = [k for k in missing if not k.endswith(_EXTRA)] + list(unexpected)
        if bad:
            raise RuntimeError(f"checkpoint {path} does not fit the model ({key}): {bad[:8]}")
