"""cpu_compat patches megatron-core's CUDA assumptions on CPU. Checked in a fresh interpreter (the
patches are process-global), then exercised end to end by the multi-process trainer tests."""

import subprocess
import sys
import textwrap


SCRIPT = textwrap.dedent('''
    import warnings
    warnings.filterwarnings("ignore")
    import torch
    from bft_megatron.parallel import cpu_compat

    assert cpu_compat.apply(force=True) and cpu_compat.apply(force=True)  # idempotent
    assert cpu_compat.is_applied()

    # literal device="cuda" tensors, .cuda(), .to("cuda") stay on CPU
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.tensor([1.0], device=torch.device("cuda", 0)).device.type == "cpu"
    assert torch.empty(3, device=torch.cuda.current_device()).device.type == "cpu"
    # pin_memory=True (megatron's distributed-checkpoint buffers) has no pinned allocator without CUDA: dropped
    pinned = torch.empty(4, pin_memory=True)
    assert pinned.device.type == "cpu" and not pinned.is_pinned()
    x = torch.ones(2)
    assert x.cuda().device.type == "cpu" and x.to("cuda").device.type == "cpu"
    assert x.to(torch.float64).dtype == torch.float64  # other .to() calls untouched

    # CUDA-only calls are harmless
    torch.cuda.synchronize(); torch.cuda.empty_cache()
    s = torch.cuda.current_stream(); s.wait_stream(torch.cuda.default_stream()); s.synchronize()
    with torch.cuda.stream(torch.cuda.Stream()):
        pass

    # dtype checks of megatron's optimizer / clip_grads accept CPU tensors
    assert torch.ones(1).type() == "torch.cuda.FloatTensor"
    assert torch.ones(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    assert torch.ones(1).type(torch.float64).dtype == torch.float64
    assert torch.ones(1, dtype=torch.int64).type() == "torch.LongTensor"

    # RNG tracker: named streams fork the CPU generator and restore the default stream
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, model_parallel_cuda_manual_seed
    model_parallel_cuda_manual_seed(123, tp_rank=0, ep_rank=0, etp_rank=0)
    tracker = get_cuda_rng_tracker()
    torch.manual_seed(0)
    ref_default = torch.rand(3)
    torch.manual_seed(0)
    with tracker.fork():
        a = torch.rand(3)
    assert torch.equal(torch.rand(3), ref_default), "default stream must be untouched by fork()"
    with tracker.fork():
        b = torch.rand(3)
    assert not torch.equal(a, b), "the forked stream must advance"
    model_parallel_cuda_manual_seed(123, tp_rank=0, ep_rank=0, etp_rank=0)
    with get_cuda_rng_tracker().fork():
        assert torch.equal(torch.rand(3), a), "same seed, same stream"
    model_parallel_cuda_manual_seed(123, tp_rank=0, ep_rank=0, etp_rank=0, force_reset_rng=True)
    assert isinstance(get_cuda_rng_tracker(), cpu_compat.CpuRNGStatesTracker), "re-initialised tracker stays CPU"
    with get_cuda_rng_tracker().fork():
        assert torch.equal(torch.rand(3), a)

    # pipeline p2p tags messages by direction
    from megatron.core.pipeline_parallel import p2p_communication
    assert p2p_communication._batched_p2p_ops is cpu_compat._tagged_batched_p2p_ops
    print("OK")
''')


def test_cpu_compat_patches():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-4000:]


def test_not_applied_by_import():
    proc = subprocess.run([sys.executable, "-c", "import torch; from bft_megatron.parallel import cpu_compat; "
                           "assert not cpu_compat.is_applied(); assert torch.zeros(1).type() == 'torch.FloatTensor'"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
