"""megatron-core GPTModel construction for Llama-3.x and Qwen2.x."""

from bft_megatron.model.builder import build_model_chunks, padded_vocab_size, transformer_config

__all__ = ["build_model_chunks", "padded_vocab_size", "transformer_config"]
