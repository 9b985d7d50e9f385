"""Trainer throughput on one GPU: runs ``bft_megatron.train`` for a few steps per setting, side by side.

Each setting is a separate process (clean CUDA state, its own peak memory). Reported per setting: median
step time over the steps after warm-up, tokens/s/GPU, MFU (the trainer's formula, docs/training.md),
peak allocated memory, and the planner's estimate for the same config (``bft-megatron plan``).

    python bench/train_bench.py --suite 1b      # ~1B Llama shape: sft vs bft, BF16 vs FP8
    python bench/train_bench.py --suite 8b      # Llama-3-8B layer shapes x 8 layers, seq 8192, packed
    python bench/train_bench.py --suite 8b-te   # the same with TE performance options, BF16 vs FP8
    python bench/train_bench.py --suite demo    # demo data: packed vs padded effective tokens/s
Writes a markdown table to stdout and, with --json, the raw numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
FIELDS = {"step": r"step (\d+)/\d+", "tok": r"\| tok/s/GPU ([\d.]+)", "mfu": r"MFU ([\d.]+)",
          "ms": r"([\d.]+) ms/step", "mem": r"mem ([\d.]+) GiB", "eff": r"effective tok/s/GPU ([\d.]+)"}


def _parse_steps(out: str, warmup: int) -> list[dict]:
    """One dict per progress line after the warm-up steps (fields absent from a line are None)."""
    rows = []
    for line in out.splitlines():
        if "ms/step" not in line or "validation" in line:
            continue
        row = {}
        for key, pattern in FIELDS.items():
            m = re.search(pattern, line)
            row[key] = float(m.group(1)) if m else None
        if row["step"] is not None and row["step"] > warmup:
            rows.append(row)
    return rows


def _median(rows: list[dict], key: str):
    values = [r[key] for r in rows if r[key] is not None]
    return statistics.median(values) if values else None

# gradient_accumulation_fusion is on by default (TE on CUDA); te_op_fuser is opt-in.
NO_GAF, FUSER = "train.gradient_accumulation_fusion=false", "train.te_op_fuser=true"
SUITES = {
    "1b": ("configs/bench/llama_1b.yaml", [
        ("sft bf16", ["loss.method=sft"]),
        ("bft bf16", ["loss.method=bft"]),
        ("sft fp8 tensorwise", ["loss.method=sft", "train.fp8=hybrid", "train.fp8_recipe=tensorwise"]),
        ("bft fp8 tensorwise", ["loss.method=bft", "train.fp8=hybrid", "train.fp8_recipe=tensorwise"]),
        ("bft fp8 delayed", ["loss.method=bft", "train.fp8=hybrid", "train.fp8_recipe=delayed"]),
    ]),
    "8b": ("configs/bench/llama8b_proxy.yaml", [
        ("sft bf16", ["loss.method=sft", FUSER]),
        ("bft bf16", ["loss.method=bft", FUSER]),
        ("bft fp8 delayed", ["loss.method=bft", "train.fp8=hybrid", "train.fp8_recipe=delayed", FUSER]),
        ("bft fp8 tensorwise", ["loss.method=bft", "train.fp8=hybrid", "train.fp8_recipe=tensorwise", FUSER]),
    ]),
    # TE performance options (docs/training.md): gradient-accumulation fusion and TE's fused MLP ops.
    "8b-te": ("configs/bench/llama8b_proxy.yaml", [
        ("bft bf16", ["loss.method=bft", NO_GAF]),
        ("bft fp8 delayed", ["loss.method=bft", "train.fp8=hybrid", "train.fp8_recipe=delayed", NO_GAF]),
        ("bft bf16 +gaf +fuser", ["loss.method=bft", FUSER]),
        ("bft fp8 delayed +gaf +fuser", ["loss.method=bft", "train.fp8=hybrid", "train.fp8_recipe=delayed", FUSER]),
        ("bft fp8 delayed +gaf", ["loss.method=bft", "train.fp8=hybrid", "train.fp8_recipe=delayed"]),
    ]),
    "demo": ("configs/bench/demo_gpu.yaml", [
        ("bft packed", ["data.packing=true"]),
        ("bft padded", ["data.packing=false", "data.output_dir=runs/bench/data_1024_padded"]),
    ]),
}


def run_setting(config: str, overrides: list[str], iters: int, warmup: int, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "bft_megatron.train", "--config", config, f"train.train_iters={iters}",
           "logging.log_interval=1", "checkpoint.save=null", *overrides]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    steps = _parse_steps(out, warmup)
    if proc.returncode != 0 or not steps:
        return {"error": out[-3000:], "cmd": " ".join(cmd)}
    mem = [r["mem"] for r in steps if r["mem"] is not None]
    return {"ms": _median(steps, "ms"), "tok_s_gpu": _median(steps, "tok"), "mfu": _median(steps, "mfu"),
            "peak_gib": max(mem) if mem else None, "effective_tok_s_gpu": _median(steps, "eff"),
            "wall_s": time.time() - start, "cmd": " ".join(cmd)}


def planned_gib(config: str, overrides: list[str]) -> float | None:
    from bft_megatron.config.plan import plan_memory
    from bft_megatron.config.schema import load_config

    cfg = load_config(os.path.join(ROOT, config), overrides)
    mbs = cfg.train.micro_batch_size
    mem, _ = plan_memory(cfg, 1, cfg.train.global_batch_size // mbs)
    return mem.total(cfg.train.recompute == "full")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=sorted(SUITES), required=True)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=240)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    config, settings = SUITES[args.suite]
    rows = []
    for name, overrides in settings:
        res = run_setting(config, overrides, args.iters, args.warmup, args.timeout)
        res.update(name=name, plan_gib=planned_gib(config, overrides))
        rows.append(res)
        sys.stdout.write(f"{name}: {json.dumps({k: v for k, v in res.items() if k != 'error'})}\n")
        if "error" in res:
            sys.stdout.write(res["error"] + "\n")
    base = rows[0].get("ms")
    lines = [f"suite {args.suite}: {config}, median of steps {args.warmup + 1}..{args.iters}",
             "| setting | ms/step | vs first | tok/s/GPU | MFU | peak GiB | plan GiB | effective tok/s/GPU |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | failed | | | | | | |")
            continue
        fmt = (lambda v, f: f.format(v) if v is not None else "n/a")
        lines.append(f"| {r['name']} | {r['ms']:.0f} | {r['ms'] / base:.3f} | {r['tok_s_gpu']:.0f} | "
                     f"{fmt(r['mfu'], '{:.3f}')} | {fmt(r['peak_gib'], '{:.2f}')} | {fmt(r['plan_gib'], '{:.2f}')} | "
                     f"{fmt(r['effective_tok_s_gpu'], '{:.0f}')} |")
    sys.stdout.write("\n".join(lines) + "\n")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
