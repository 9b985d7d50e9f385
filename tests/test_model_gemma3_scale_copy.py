"""Gemma 3's embedding-scale hook (found by review) must not copy its scale host->device on every forward.

``_EmbeddingScale.__call__`` did ``self.scale.to(device=output.device, ...)``: ``self.scale`` is a CPU tensor, so on
a GPU every first-stage micro-batch forward issued a blocking H2D copy (PyTorch's copy_kernel_cuda ->
memcpy_and_sync: cudaMemcpyAsync + cudaStreamSynchronize for non_blocking=False), i.e. a host/GPU sync that stalled
launch-ahead. The 'meta' device stands in for CUDA here: any _to_copy of the scale onto the output's device is the
copy in question. A 0-dim CPU tensor (or a Python float) can multiply a device tensor without any copy.
"""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bft_megatron.model.gemma3 import _EmbeddingScale


class _Copies(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.copies = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            src = args[0] if func is torch.ops.aten._to_copy.default else args[1]
            dst = kwargs.get("device", None) if func is torch.ops.aten._to_copy.default else args[0].device
            if dst is not None and torch.device(dst) != src.device:
                self.copies.append((src.device, torch.device(dst)))
        return func(*args, **kwargs)


def test_embedding_scale_hook_copies_nothing_across_devices_per_forward():
    hook = _EmbeddingScale(5376)
    output = torch.empty(4, 2, 8, dtype=torch.bfloat16, device="meta")  # stands in for a CUDA activation
    with _Copies() as mode:
        for _ in range(3):  # three micro-batches
            hook(None, (None,), output)
    assert mode.copies == [], f"{len(mode.copies)} cross-device copies of the scale in 3 forwards: {mode.copies}"
