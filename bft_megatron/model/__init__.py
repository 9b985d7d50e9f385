"""megatron-core GPTModel construction for Llama-3.x, Qwen2.x, Qwen3, Mistral and Phi3 (Llama-shaped)."""

from bft_megatron.model.builder import build_model_chunks, padded_vocab_size, transformer_config

__all__ = ["build_model_chunks", "padded_vocab_size", "transformer_config"]
