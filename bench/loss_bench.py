"""Forward+backward time and peak memory of the loss at LLM scale (one GPU, TP=1).

Compares, on the same bf16 logits ``[tokens, vocab]`` (default 8192 x 128256, Llama-3 vocabulary):
  megatron-core ``vocab_parallel_cross_entropy`` (token mean), torch ``cross_entropy`` on fp32-upcast
  logits, a straightforward BFT in the style of the authors' trainer (full log-softmax, per-sample
  windows), and bft_megatron's sft / dft / bft v1 / bft v3 (packed: 16 samples of 512 tokens).

Usage (on a GPU machine with megatron-core installed):
    python bench/loss_bench.py [--tokens 8192] [--vocab 128256] [--iters 10] [--json out.json]
Prints a markdown table; ratios are relative to megatron-core's cross-entropy measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bft_megatron.loss import objective, vocab_parallel_nll  # noqa: E402


def _setup_megatron():
    import torch.distributed as dist
    from megatron.core import parallel_state

    if not dist.is_initialized():
        dist.init_process_group("nccl", init_method="tcp://127.0.0.1:29517", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    return vocab_parallel_cross_entropy


def _batch(tokens, vocab, sample_len, device):
    gen = torch.Generator(device=device).manual_seed(0)
    logits = (torch.randn(tokens, 1, vocab, device=device, generator=gen) * 2).bfloat16()
    labels = torch.randint(0, vocab, (tokens, 1), device=device, generator=gen)
    pos = torch.arange(tokens, device=device) % sample_len
    mask = (pos >= sample_len * 2 // 5).float().unsqueeze(1)          # first 40% of each sample = prompt
    cu = torch.arange(0, tokens + 1, sample_len, device=device, dtype=torch.int32)
    return logits, labels, mask, cu


def _naive_bft(logits, labels, mask, cu, group=256):
    """The straightforward formulation: full fp32 log-softmax, per-sample Python loop over windows."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    lp = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1).reshape(-1)
    m = mask.reshape(-1)
    total, count = 0.0, 0
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        sel = m[s:e] > 0
        a = lp[s:e][sel]
        if a.numel() == 0:
            continue
        ad = a.detach()
        p = ad.unfold(0, group, 1).mean(-1).min().exp() if a.numel() >= group else ad.mean().exp()
        total = total + (1 - p) * (-(ad.exp() * a)).mean()
        count += 1
    return total / count


def _methods(mcore_ce, labels, mask, cu):
    m_sb = mask

    def mcore(x):
        loss = mcore_ce(x, labels)
        return (loss * m_sb).sum() / m_sb.sum()

    def torch_ce(x):
        loss = F.cross_entropy(x.float().view(-1, x.shape[-1]), labels.view(-1), reduction="none")
        return (loss * m_sb.view(-1)).sum() / m_sb.sum()

    def ours(method, variant="v1", impl="torch", inplace=False):
        def fn(x):
            nll = vocab_parallel_nll(x, labels, impl=impl, inplace=inplace)   # [s, 1]
            loss_sum, units, _ = objective(nll.t(), m_sb.t(), method=method, variant=variant, cu_seqlens=cu)
            return loss_sum / units
        return fn

    return {
        "megatron-core vocab_parallel_cross_entropy": mcore,
        "torch cross_entropy (fp32 upcast)": torch_ce,
        "straightforward BFT (authors' style)": lambda x: _naive_bft(x, labels, mask, cu),
        "bft_megatron sft (eager NLL)": ours("sft"),
        "bft_megatron dft (eager NLL)": ours("dft"),
        "bft_megatron bft v1 (eager NLL)": ours("bft", "v1"),
        "bft_megatron bft v3 (eager NLL)": ours("bft", "v3"),
        "bft_megatron sft (triton NLL)": ours("sft", impl="triton"),
        "bft_megatron dft (triton NLL)": ours("dft", impl="triton"),
        "bft_megatron bft v1 (triton NLL)": ours("bft", "v1", impl="triton"),
        "bft_megatron bft v3 (triton NLL)": ours("bft", "v3", impl="triton"),
        "bft_megatron bft v1 (triton NLL, in-place grad)": ours("bft", "v1", impl="triton", inplace=True),
    }


def _measure(fn, logits, iters, warmup=3):
    times = []
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + iters):
        x = logits.detach().requires_grad_(True)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn(x).backward()
        end.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end))
        del x
    peak = torch.cuda.max_memory_allocated() - base
    return statistics.median(times), peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--sample-len", type=int, default=512)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    mcore_ce = _setup_megatron()
    logits, labels, mask, cu = _batch(args.tokens, args.vocab, args.sample_len, "cuda")
    rows = []
    for name, fn in _methods(mcore_ce, labels, mask, cu).items():
        ms, peak = _measure(fn, logits, args.iters)
        rows.append({"name": name, "ms": ms, "peak_gib": peak / 2**30})
    ref = rows[0]
    out = [f"logits [{args.tokens}, {args.vocab}] bf16, fwd+bwd, median of {args.iters}; "
           f"peak = max allocated above the inputs; {torch.cuda.get_device_name()}, torch {torch.__version__}",
           "", "| loss | time (ms) | time / mcore CE | peak (GiB) | peak / mcore CE |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['name']} | {r['ms']:.2f} | {r['ms'] / ref['ms']:.3f} | {r['peak_gib']:.2f} | "
                   f"{r['peak_gib'] / ref['peak_gib']:.3f} |")
    sys.stdout.write("\n".join(out) + "\n")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
