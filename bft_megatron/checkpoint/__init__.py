"""Distributed checkpoints (megatron dist_checkpointing, torch_dist): save, resume, reshard, fine-tune."""

from bft_megatron.checkpoint.manager import Checkpointer

__all__ = ["Checkpointer"]
