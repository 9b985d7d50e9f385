"""Hugging Face <-> megatron-core conversion (Llama-3.x, Qwen2.x, Qwen3, Mistral, Phi3). See docs/convert.md.

* :func:`import_hf` - HF safetensors -> dist checkpoint run directory (streamed, one process);
* :func:`export_checkpoint` - dist checkpoint (any TP/PP) -> HF shards + index, bounded memory;
* :func:`export_to_hf` - in-memory TP/PP-sharded chunks -> HF, from inside a job (trainer hook);
* :func:`load_weights` - fill freshly built chunks from a dist checkpoint.
"""

from bft_megatron.convert.exporter import export_checkpoint
from bft_megatron.convert.importer import import_hf
from bft_megatron.convert.live_export import export_to_hf
from bft_megatron.convert.load import load_weights

__all__ = ["import_hf", "export_checkpoint", "export_to_hf", "load_weights"]
