"""bft_megatron: Balanced Fine-Tuning (BFT) of LLMs on Megatron-core parallelism."""

__version__ = "0.1.0"
