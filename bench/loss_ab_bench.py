"""BFT vs SFT step time in one process, alternating step by step (A/B interleaving cancels drift).

    python bench/loss_ab_bench.py --config configs/bench/llama_1b.yaml [--pairs 20] [--warmup 3] [overrides ...]

Separate processes per setting (bench/train_bench.py) differ by clock, placement and allocator state;
at 1B shapes that noise (+-15%) hides a 1% effect. Here one model, optimizer and data stream run
``warmup + pairs`` pairs of optimizer steps; each pair is one ``sft`` and one ``bft`` step on the
*same* global batch (the data position is rewound; packed rows differ in their sample mix, hence in
attention cost), the order alternating between pairs, timed with a device synchronisation on each
side. Reported: median step time per method, the median and 10th/90th percentiles of the
per-pair ratio bft/sft, and the peak memory of each method's steps.

At micro-batch 1 x 4096 tokens the 1B step is bound by host launch time and single steps jitter by
+-15%; ``train.micro_batch_size=2`` (same global batch) is 1.5x faster and resolves the ratio to
about +-0.7% with 50 pairs (docs/benchmarks.md). ``loss.compile=true|false`` compares BFT's compiled
and eager weight math.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def _timed_step(trainer, method: str) -> tuple[float, float]:
    """One optimizer step with ``loss.method = method``: (seconds, peak GiB; 0 on CPU)."""
    cuda = torch.cuda.is_available()
    trainer.cfg.loss = dataclasses.replace(trainer.cfg.loss, method=method)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = trainer.train_step()
    trainer.record_step(result)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start, torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--pairs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    from bft_megatron.config import load_config, validate
    from bft_megatron.parallel import bootstrap
    from bft_megatron.training.build import build_trainer

    steps = 2 * (args.pairs + args.warmup)
    cfg = load_config(args.config, args.overrides + [f"train.train_iters={steps}", "checkpoint.save=null",
                                                     "loss.sft_warmup_iters=0"])
    groups = bootstrap.initialize(seed=cfg.train.seed)
    trainer = build_trainer(cfg, validate(cfg, 1), groups)
    times: dict[str, list[float]] = {"sft": [], "bft": []}
    peaks: dict[str, float] = {"sft": 0.0, "bft": 0.0}
    for pair in range(args.warmup + args.pairs):
        rows = trainer.train_data.consumed_rows
        for method in (("sft", "bft") if pair % 2 == 0 else ("bft", "sft")):
            # both methods see the same global batch (the rewind drops the prefetched batch: equal cost for both)
            trainer.train_data.consumed_rows = rows
            seconds, peak = _timed_step(trainer, method)
            if pair >= args.warmup:
                times[method].append(seconds)
                peaks[method] = max(peaks[method], peak)
    ratios = [b / s for s, b in zip(times["sft"], times["bft"])]
    report = {
        "config": args.config, "overrides": args.overrides, "pairs": args.pairs, "warmup_pairs": args.warmup,
        "sft_ms": 1e3 * statistics.median(times["sft"]), "bft_ms": 1e3 * statistics.median(times["bft"]),
        "ratio_median": statistics.median(ratios), "ratio_p10": _quantile(ratios, 0.1),
        "ratio_p90": _quantile(ratios, 0.9), "sft_peak_gib": peaks["sft"], "bft_peak_gib": peaks["bft"],
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
    }
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
    bootstrap.destroy()


if __name__ == "__main__":
    main()
