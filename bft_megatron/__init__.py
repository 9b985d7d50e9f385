"""bft_megatron: Balanced Fine-Tuning (BFT) of LLMs on Megatron-core parallelism."""

from bft_megatron.parallel import triton_guard as _triton_guard

__version__ = "0.1.0"

# Before any megatron import: megatron-core >= 0.18 imports triton unconditionally (MoE paged stash), which CPU
# torch wheels do not ship; where triton is missing this stubs that one module (see parallel/triton_guard.py).
_triton_guard.install()
