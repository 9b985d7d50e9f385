"""Profile a few training steps on one GPU and list where the host waits for the device.

    python bench/profile_step.py --config configs/bench/llama_1b.yaml [--iters 6] [overrides ...]

Prints the events with the most self CPU time and every synchronising call (``.item()``, blocking copies,
stream/device synchronise) with the Python stack that issued it, per training step. A step whose host
time exceeds its device time is launch-bound: the fix is fewer syncs, not faster kernels.

``--kernels``: instead, the device time per step by kernel family (GEMMs by input type, attention, TE casts,
norms, the loss, the optimizer, the rest) and the kernels with the most device time (``--top``, 25): where an FP8 step
spends what FP8 cannot speed up.

``--sync-trace``: instead of the profiler, run the steps under ``torch.cuda.set_sync_debug_mode("warn")``
and list the Python call sites of every synchronising operation torch reports, most frequent first.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

def _sync_trace(fit, trainer, iters: int) -> str:
    """Call sites of synchronising torch ops over the next ``iters`` steps."""
    import collections
    import traceback
    import warnings

    sites: collections.Counter = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1] if "warnings" not in f.filename]
        keep = [f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in frames
                if any(k in f.filename for k in ("bft_megatron", "megatron", "transformer_engine"))]
        sites[(str(message).split("\n")[0][:80], " <- ".join(reversed(keep[-4:])))] += 1

    previous = warnings.showwarning
    warnings.showwarning = record
    warnings.simplefilter("always")
    torch.cuda.set_sync_debug_mode("warn")
    try:
        fit(trainer, None)
        torch.cuda.synchronize()
    finally:
        torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = previous
    lines = [f"{count / iters:6.1f}/step  {what} | {where}" for (what, where), count in sites.most_common(30)]
    return "synchronising call sites (torch sync debug mode):\n" + "\n".join(lines)


SYNC_EVENTS = ("aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize", "aten::item",
               "cudaMemcpyAsync", "cudaEventSynchronize")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--iters", type=int, default=6)
    ap.add_argument("--out", default=None, help="write the report here as well")
    ap.add_argument("--sync-trace", action="store_true", help="list synchronising call sites instead of profiling")
    ap.add_argument("--kernels", action="store_true", help="device time per kernel family instead of host events")
    ap.add_argument("--top", type=int, default=25, help="--kernels: how many kernels to list")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    from bft_megatron.config import load_config, validate
    from bft_megatron.parallel import bootstrap
    from bft_megatron.training.build import build_trainer
    from bft_megatron.training.fit import fit

    cfg = load_config(args.config, args.overrides + [f"train.train_iters={args.iters}", "checkpoint.save=null"])
    groups = bootstrap.initialize(seed=cfg.train.seed)
    trainer = build_trainer(cfg, validate(cfg, 1), groups)
    trainer.cfg.train.train_iters = 1  # warm-up step outside the measurement (compilation, autotuning, caches)
    fit(trainer, None)
    trainer.cfg.train.train_iters = 1 + args.iters
    if args.sync_trace:
        report = _sync_trace(fit, trainer, args.iters)
    elif args.kernels:
        report = _kernels(fit, trainer, args.iters, args.top)
    else:
        report = _profile(fit, trainer, args.iters)
    report += "\n"
    sys.stdout.write(report)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(report)
    bootstrap.destroy()


def _profile(fit, trainer, iters: int) -> str:
    """Top events by self CPU time and every synchronising event with its stack, over the next ``iters`` steps."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
        fit(trainer, None)
        torch.cuda.synchronize()
    lines = [prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)]
    for evt in prof.key_averages(group_by_stack_n=6):
        if evt.key in SYNC_EVENTS:
            where = " <- ".join(s for s in evt.stack if "bft_megatron" in s or "megatron" in s
                                or "transformer_engine" in s)[:600]
            lines.append(f"{evt.key}: {evt.count / iters:.1f}/step, self cpu {evt.self_cpu_time_total / 1e3:.1f} ms"
                         f" total | {where}")
    return "\n".join(lines)


# Kernel families by name, first match wins (cuBLASLt's Hopper FP8 kernels are named nvjet_sm90_q*; others
# carry e4m3/e5m2).
FAMILIES = (("gemm fp8", r"nvjet_sm\d+_q|(gemm|nvjet|cutlass|xmma).*(e4m3|e5m2|fp8)"
                         r"|(e4m3|e5m2|fp8).*(gemm|cutlass)"),
            ("gemm bf16/fp32", r"gemm|nvjet|cutlass|xmma|cublas"),
            ("attention", r"flash|fmha|fused_attn|cudnn|attn"),
            ("te cast/transpose/amax", r"(?<!no)(?<!With)cast|transpose|amax|quantiz|scale_inv|fp8"),
            ("optimizer", r"adam|multi_tensor|l2norm|foreach"),
            ("norm", r"norm"),
            ("loss (nll)", r"nll|cross_entropy|_fwd_kernel|_bwd_kernel|logsumexp"),
            ("reduce/copy", r"reduce|copy|memcpy|memset|cat"),
            ("other", r"."))


def _family(kernel: str) -> str:
    return next(name for name, pattern in FAMILIES if re.search(pattern, kernel, re.IGNORECASE))


def _kernels(fit, trainer, iters: int, top: int) -> str:
    """Device time per step by kernel family, and the kernels with the most device time."""
    from torch.profiler import ProfilerActivity, profile

    if not torch.cuda.is_available():
        return "--kernels needs a CUDA device"
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fit(trainer, None)
        torch.cuda.synchronize()
    per_kernel = {}
    for evt in prof.key_averages():
        us = getattr(evt, "self_device_time_total", 0) or getattr(evt, "self_cuda_time_total", 0)
        if us > 0:
            per_kernel[evt.key] = (us / 1e3 / iters, evt.count / iters)
    families = {name: 0.0 for name, _ in FAMILIES}
    for key, (ms, _) in per_kernel.items():
        families[_family(key)] += ms
    total = sum(families.values())
    if not total:
        return "no device kernels recorded (is this a CUDA run?)"
    lines = [f"device time per step: {total:.1f} ms"]
    lines += [f"  {name:24s} {ms:8.1f} ms  {100 * ms / total:5.1f}%" for name, ms in families.items() if ms]
    lines.append("top kernels (ms/step, launches/step, family, name):")
    ranked = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:top]
    lines += [f"  {ms:8.2f} {count:6.1f}  {_family(key):24s} {key[:150]}" for key, (ms, count) in ranked]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
