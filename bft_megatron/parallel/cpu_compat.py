"""Everything needed to run megatron-core on CPU with gloo, in one place.

megatron-core assumes CUDA in a handful of spots (see ``/work/shared/notes/megatron.md``). On a
machine without CUDA, :func:`apply` patches exactly those spots:

* ``torch.cuda.current_device()`` returns ``"cpu"`` (RoPE, buffers, DDP, p2p allocate there);
* tensors created with a literal ``device="cuda"`` (schedules, optimizer, clip-grads, grad scaler)
  and ``Tensor.cuda()`` calls stay on CPU: a :class:`torch.overrides.TorchFunctionMode` rewrites the
  ``device`` argument, and drops ``pin_memory=True`` (no pinned allocator without CUDA; megatron's
  RoPE shard for context parallelism asks for it). It is entered once and never left (the mode stack
  is per thread; megatron creates these tensors on the training thread);
* ``torch.cuda.synchronize / empty_cache`` are no-ops and ``current_stream / default_stream /
  Stream / stream`` return null stream objects (grad-buffer and p2p code paths);
* ``Tensor.type()`` reports CPU float tensors as ``torch.cuda.*Tensor`` so the optimizer's and
  clip-grad's dtype assertions accept them;
* pipeline point-to-point messages carry a tag per direction (gloo would otherwise swap
  activations and gradients at PP=2 with interleaving, see :func:`_tagged_batched_p2p_ops`);
* the CUDA RNG-states tracker of ``tensor_parallel.random`` is replaced by one that forks the CPU
  generator, so ``model_parallel_cuda_manual_seed`` and activation recompute work.

Sequence parallelism additionally needs a norm whose parameters are marked ``sequence_parallel``;
that is a layer-spec concern and lives in :mod:`bft_megatron.model.layers`.

Applied only when CUDA is unavailable (``force=True`` for tests); idempotent.

One more CPU concern happens at import time and so lives apart, in :mod:`bft_megatron.parallel.triton_guard`
(torch-free, installed by ``import bft_megatron``): megatron-core >= 0.18 imports triton unconditionally, which CPU
torch wheels lack.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

from bft_megatron.utils.logging import get_logger

__all__ = ["apply", "is_applied", "CpuRNGStatesTracker"]

_log = get_logger(__name__)
_STATE = {"applied": False, "mode": None}

_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
}


def _to_cpu_device(device):
    """Map any CUDA device spec (``"cuda"``, ``"cuda:0"``, ``torch.device("cuda")``, an int) to CPU."""
    if isinstance(device, int) and not isinstance(device, bool):
        return torch.device("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        return torch.device("cpu")
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites ``device=cuda`` keyword arguments and ``Tensor.cuda()``/``.to("cuda")`` to CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if "device" in kwargs:
            kwargs = dict(kwargs, device=_to_cpu_device(kwargs["device"]))
        if kwargs.get("pin_memory"):
            kwargs = dict(kwargs, pin_memory=False)
        if func is torch.Tensor.to and len(args) > 1:
            args = (args[0], _to_cpu_device(args[1]), *args[2:])
        return func(*args, **kwargs)


class _NullStream:
    """Stands in for ``torch.cuda.Stream``: waits and syncs are no-ops on CPU."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, event=None):
        return event


def _cpu_tensor_type(original):
    def tensor_type(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and self.device.type == "cpu" and self.dtype in _CUDA_TYPE_NAMES:
            return _CUDA_TYPE_NAMES[self.dtype]
        return original(self, dtype, non_blocking, **kwargs) if dtype is not None else original(self)

    return tensor_type


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: "cpu"
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda: None
    cuda.current_stream = lambda *a, **k: _NullStream()
    cuda.default_stream = lambda *a, **k: _NullStream()
    cuda.Stream = _NullStream
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.set_device = lambda *a, **k: None
    cuda.device_count = lambda: 0
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    cuda.manual_seed = lambda seed: None  # the CPU generator is seeded by bootstrap
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0
    torch.Tensor.type = _cpu_tensor_type(torch.Tensor.type)


def _make_tracker_class():
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """Named RNG streams on the CPU generator: ``fork(name)`` swaps its state in and out."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise RuntimeError(f"seed {seed} already exists")
            if name in self.states_:
                raise RuntimeError(f"rng state {name} already exists")
            self.seeds_.add(seed)
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise RuntimeError(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    return CpuRNGStatesTracker


CpuRNGStatesTracker = None  # set by apply(); megatron is imported lazily


def _patch_megatron_rng() -> None:
    global CpuRNGStatesTracker
    from megatron.core.tensor_parallel import random as mrandom

    CpuRNGStatesTracker = _make_tracker_class()
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    original_init = mrandom.initialize_rng_tracker

    def initialize_rng_tracker(*args, **kwargs):
        """megatron's initialiser, but the tracker it leaves behind always forks the CPU generator."""
        original_init(*args, **kwargs)
        if not isinstance(mrandom._CUDA_RNG_STATE_TRACKER, CpuRNGStatesTracker):
            mrandom._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()

    mrandom.initialize_rng_tracker = initialize_rng_tracker
    mrandom._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


_TAG_TO_NEXT, _TAG_TO_PREV = 1, 2


def _tagged_batched_p2p_ops(*, tensor_send_prev, tensor_recv_prev, tensor_send_next, tensor_recv_next, group,
                            prev_pipeline_rank, next_pipeline_rank):
    """megatron's batched pipeline p2p with a tag per direction.

    With PP=2 and interleaving, a rank's previous and next pipeline ranks are the same process. gloo
    matches point-to-point messages by (peer, tag) in posting order, and megatron posts
    ``send_prev`` before ``send_next`` but ``recv_prev`` before ``recv_next``: untagged, activations
    land in gradient buffers and vice versa (same shapes, so silently). Tagging messages by travel
    direction makes the matching unambiguous.
    """
    dist = torch.distributed
    ops = []
    for tensor, op, peer, tag in ((tensor_send_prev, dist.isend, prev_pipeline_rank, _TAG_TO_PREV),
                                  (tensor_recv_prev, dist.irecv, prev_pipeline_rank, _TAG_TO_NEXT),
                                  (tensor_send_next, dist.isend, next_pipeline_rank, _TAG_TO_NEXT),
                                  (tensor_recv_next, dist.irecv, next_pipeline_rank, _TAG_TO_PREV)):
        if tensor is not None:
            ops.append(dist.P2POp(op, tensor, peer, group, tag))
    return dist.batch_isend_irecv(ops) if ops else []


def _patch_megatron_p2p() -> None:
    from megatron.core.pipeline_parallel import p2p_communication

    p2p_communication._batched_p2p_ops = _tagged_batched_p2p_ops


def apply(force: bool = False) -> bool:
    """Install the CPU patches if CUDA is unavailable (or ``force``). Returns whether they are active.

    Must run before megatron-core builds models or process groups. Safe to call repeatedly.
    """
    if _STATE["applied"]:
        return True
    if torch.cuda.is_available() and not force:
        return False
    _patch_torch_cuda()
    _patch_megatron_rng()
    _patch_megatron_p2p()
    mode = _CudaToCpuMode()
    mode.__enter__()
    _STATE.update(applied=True, mode=mode)
    _log.info("CUDA unavailable: running megatron-core on CPU (bft_megatron.parallel.cpu_compat)")
    return True


def is_applied() -> bool:
    return _STATE["applied"]
