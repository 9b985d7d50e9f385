"""Trainer throughput on one GPU: runs ``bft_megatron.train`` for a few steps per setting, side by side.

Each setting is a separate process (clean CUDA state, its own peak memory). Reported per setting: median
step time over the steps after warm-up, tokens/s/GPU, MFU (the trainer's formula, docs/training.md),
peak allocated memory, the GPU's peak used memory as nvidia-smi reports it ("device", see ``DevicePeak``), and
the planner's estimate for the same config (``bft-megatron plan``, whose runtime term is meant to cover the
difference between the two).

    python bench/train_bench.py --suite 1b      # ~1B Llama shape: sft vs bft, BF16 vs FP8
    python bench/train_bench.py --suite 8b      # Llama-3-8B layer shapes x 8 layers, seq 8192, packed
    python bench/train_bench.py --suite 8b-te   # the same with TE performance options, BF16 vs FP8
    python bench/train_bench.py --suite 8b-fp8 --rounds 3   # bft BF16 vs FP8 delayed only, interleaved
    python bench/train_bench.py --suite 8b-rows --rounds 2  # output layer on supervised rows only vs every row
    python bench/train_bench.py --suite 8b-emb --rounds 2   # embedding wgrad into main_grad vs DDP's hook
    python bench/train_bench.py --suite 70b     # Llama-3.1-70B layer shapes x 4 layers (an H200), planner check
    python bench/train_bench.py --suite qwen3-32b   # Qwen3-32B layer shapes x 6 layers (an H200), planner check
    python bench/train_bench.py --suite demo    # demo data: packed vs padded effective tokens/s
``--rounds N`` runs the settings N times interleaved (A B A B ...) and reports medians over the rounds,
with each run's time in the JSON (``ms_runs``): use it for ratios near a target.
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


def parse_steps(out: str, warmup: int, fields: dict[str, str] = FIELDS) -> list[dict]:
    """One dict per progress line after the warm-up steps (``fields``: name -> regex with one group; fields
    absent from a line are None)."""
    rows = []
    for line in out.splitlines():
        if "ms/step" not in line or "validation" in line:
            continue
        row = {}
        for key, pattern in fields.items():
            m = re.search(pattern, line)
            row[key] = float(m.group(1)) if m else None
        if row["step"] is not None and row["step"] > warmup:
            rows.append(row)
    return rows


def median_field(rows: list[dict], key: str):
    """Median of ``key`` over the rows that have it (None if none does)."""
    values = [r[key] for r in rows if r[key] is not None]
    return statistics.median(values) if values else None


# gradient_accumulation_fusion is on by default (TE on CUDA); te_op_fuser is opt-in.
NO_GAF, FUSER = "train.gradient_accumulation_fusion=false", "train.te_op_fuser=true"
ALL_ROWS = "train.supervised_logits_only=false"
# Not an override: run_setting starts bench/train_unfused_embedding.py instead of bft_megatron.train.
UNFUSED_EMB = "<unfused embedding wgrad>"
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
    # FP8 over BF16 only (use with --rounds: the ratio sits near its 1.35x target).
    "8b-fp8": ("configs/bench/llama8b_proxy.yaml", [
        ("bft bf16", ["loss.method=bft", FUSER]),
        ("bft fp8 delayed", ["loss.method=bft", "train.fp8=hybrid", "train.fp8_recipe=delayed", FUSER]),
    ]),
    # The output layer on supervised rows only (default) against every row, BF16 and FP8 (use with --rounds).
    "8b-rows": ("configs/bench/llama8b_proxy.yaml", [
        ("bft bf16", ["loss.method=bft", FUSER]),
        ("bft fp8 delayed", ["loss.method=bft", "train.fp8=hybrid", "train.fp8_recipe=delayed", FUSER]),
        ("bft bf16 every row", ["loss.method=bft", FUSER, ALL_ROWS]),
        ("bft fp8 delayed every row", ["loss.method=bft", "train.fp8=hybrid", "train.fp8_recipe=delayed", FUSER,
                                       ALL_ROWS]),
    ]),
    # TE performance options (docs/training.md): gradient-accumulation fusion and TE's fused MLP ops.
    "8b-te": ("configs/bench/llama8b_proxy.yaml", [
        ("bft bf16", ["loss.method=bft", NO_GAF]),
        ("bft fp8 delayed", ["loss.method=bft", "train.fp8=hybrid", "train.fp8_recipe=delayed", NO_GAF]),
        ("bft bf16 +gaf +fuser", ["loss.method=bft", FUSER]),
        ("bft fp8 delayed +gaf +fuser", ["loss.method=bft", "train.fp8=hybrid", "train.fp8_recipe=delayed", FUSER]),
        ("bft fp8 delayed +gaf", ["loss.method=bft", "train.fp8=hybrid", "train.fp8_recipe=delayed"]),
    ]),
    # The word embedding's weight gradient straight into main_grad (default) vs through DDP's hook; the
    # baseline runs bench/train_unfused_embedding.py (use with --rounds).
    "8b-emb": ("configs/bench/llama8b_proxy.yaml", [
        ("bft bf16 emb via hook", ["loss.method=bft", FUSER, UNFUSED_EMB]),
        ("bft bf16", ["loss.method=bft", FUSER]),
        ("bft fp8 delayed emb via hook", ["loss.method=bft", "train.fp8=hybrid", "train.fp8_recipe=delayed", FUSER,
                                          UNFUSED_EMB]),
        ("bft fp8 delayed", ["loss.method=bft", "train.fp8=hybrid", "train.fp8_recipe=delayed", FUSER]),
    ]),
    # parallel.grad_reduce_in_fp32=false: bf16 gradient buffers (memory and speed; use with --rounds).
    "8b-grad": ("configs/bench/llama8b_proxy.yaml", [
        ("bft fp8 delayed", ["loss.method=bft", "train.fp8=hybrid", "train.fp8_recipe=delayed", FUSER]),
        ("bft fp8 delayed bf16 grads", ["loss.method=bft", "train.fp8=hybrid", "train.fp8_recipe=delayed", FUSER,
                                        "parallel.grad_reduce_in_fp32=false"]),
    ]),
    # Llama-3.1-70B layer shapes x 4 layers (needs ~110 GiB: an H200); measured peak vs the planner incl. recompute.
    "70b": ("configs/bench/llama70b_proxy.yaml", [
        ("sft bf16", ["loss.method=sft", FUSER]),
        ("bft bf16", ["loss.method=bft", FUSER]),
        ("bft bf16 full recompute", ["loss.method=bft", FUSER, "train.recompute=full"]),
        ("bft fp8 delayed", ["loss.method=bft", "train.fp8=hybrid", "train.fp8_recipe=delayed", FUSER]),
    ]),
    # Qwen3-32B layer shapes x 6 layers (head norms, 8192-wide queries; ~94 GiB planned: an H200); planner check.
    "qwen3-32b": ("configs/bench/qwen3_32b_proxy.yaml", [
        ("sft bf16", ["loss.method=sft", FUSER]),
        ("bft bf16", ["loss.method=bft", FUSER]),
        ("bft fp8 delayed", ["loss.method=bft", "train.fp8=hybrid", "train.fp8_recipe=delayed", FUSER]),
    ]),
    "demo": ("configs/bench/demo_gpu.yaml", [
        ("bft packed", ["data.packing=true"]),
        ("bft padded", ["data.packing=false", "data.output_dir=runs/bench/data_1024_padded"]),
    ]),
}


class DevicePeak:
    """The GPU's used memory as the driver reports it (``nvidia-smi``, every 250 ms) while a setting runs.

    Unlike ``torch.cuda.max_memory_allocated`` (the trainer's ``mem``) this includes the CUDA context, cuBLAS
    and cuDNN workspaces, NCCL's buffers and the caching allocator's reserve: what decides an OOM, and what the
    planner's runtime term stands for. None when ``nvidia-smi`` is missing. Assumes the setting is alone on GPU 0.
    """

    def __enter__(self):
        try:
            self.proc = subprocess.Popen(["nvidia-smi", "-i", "0", "--query-gpu=memory.used",
                                          "--format=csv,noheader,nounits", "-lms", "250"],
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except FileNotFoundError:
            self.proc = None
        self.gib = None
        return self

    def __exit__(self, *exc):
        if self.proc is None:
            return
        self.proc.terminate()
        out, _ = self.proc.communicate()
        mib = [int(v) for v in out.split() if v.isdigit()]
        self.gib = max(mib) / 1024 if mib else None


def run_setting(config: str, overrides: list[str], iters: int, warmup: int, timeout: float) -> dict:
    entry = ["-m", "bft_megatron.train"]
    if UNFUSED_EMB in overrides:
        entry = [os.path.join(ROOT, "bench", "train_unfused_embedding.py")]
        overrides = [o for o in overrides if o != UNFUSED_EMB]
    cmd = [sys.executable, *entry, "--config", config, f"train.train_iters={iters}",
           "logging.log_interval=1", "checkpoint.save=null", *overrides]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    start = time.time()
    with DevicePeak() as device:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    steps = parse_steps(out, warmup)
    if proc.returncode != 0 or not steps:
        return {"error": out[-3000:], "cmd": " ".join(cmd)}
    mem = [r["mem"] for r in steps if r["mem"] is not None]
    return {"ms": median_field(steps, "ms"), "tok_s_gpu": median_field(steps, "tok"), "mfu": median_field(steps, "mfu"),
            "peak_gib": max(mem) if mem else None, "device_gib": device.gib,
            "effective_tok_s_gpu": median_field(steps, "eff"),
            "wall_s": time.time() - start, "cmd": " ".join(cmd)}


def planned_gib(config: str, overrides: list[str]) -> float | None:
    from bft_megatron.config.plan import plan_memory
    from bft_megatron.config.schema import load_config

    cfg = load_config(os.path.join(ROOT, config), overrides)
    mbs = cfg.train.micro_batch_size
    mem, _ = plan_memory(cfg, 1, cfg.train.global_batch_size // mbs)
    return mem.total(cfg.train.recompute == "full")


def _combine(runs: list[dict]) -> dict:
    """One setting over several rounds: medians of the per-run medians, the max peak, and the spread."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[-1]
    out = {k: statistics.median([r[k] for r in ok if r.get(k) is not None] or [None])
           for k in ("ms", "tok_s_gpu", "mfu", "effective_tok_s_gpu")}
    for key in ("peak_gib", "device_gib"):
        peaks = [r[key] for r in ok if r.get(key) is not None]
        out[key] = max(peaks) if peaks else None
    out.update(ms_runs=[r["ms"] for r in ok], cmd=ok[0]["cmd"])
    return out


def _run_rounds(config: str, settings, args) -> list[dict]:
    """Every setting ``args.rounds`` times, interleaved (A B C A B C ...), so drift hits all settings alike."""
    runs: dict[str, list[dict]] = {name: [] for name, _ in settings}
    for _ in range(args.rounds):
        for name, overrides in settings:
            res = run_setting(config, overrides, args.iters, args.warmup, args.timeout)
            runs[name].append(res)
            sys.stdout.write(f"{name}: {json.dumps({k: v for k, v in res.items() if k != 'error'})}\n")
            if "error" in res:
                sys.stdout.write(res["error"] + "\n")
    rows = []
    for name, overrides in settings:
        row = _combine(runs[name])
        row.update(name=name, plan_gib=planned_gib(config, [o for o in overrides if o != UNFUSED_EMB]))
        rows.append(row)
    return rows


def _table(suite: str, config: str, rows: list[dict], args) -> str:
    base = rows[0].get("ms")
    lines = [f"suite {suite}: {config}, median of steps {args.warmup + 1}..{args.iters}"
             + (f", median over {args.rounds} interleaved rounds" if args.rounds > 1 else ""),
             "| setting | ms/step | vs first | tok/s/GPU | MFU | peak GiB | device GiB | plan GiB "
             "| effective tok/s/GPU |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    fmt = (lambda v, f: f.format(v) if v is not None else "n/a")
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | failed | | | | | | | |")
            continue
        ratio = fmt(r["ms"] / base if base else None, "{:.3f}")  # n/a when the first setting failed
        lines.append(f"| {r['name']} | {r['ms']:.0f} | {ratio} | {r['tok_s_gpu']:.0f} | "
                     f"{fmt(r['mfu'], '{:.3f}')} | {fmt(r['peak_gib'], '{:.2f}')} | "
                     f"{fmt(r.get('device_gib'), '{:.2f}')} | "
                     f"{fmt(r['plan_gib'], '{:.2f}')} | "
                     f"{fmt(r['effective_tok_s_gpu'], '{:.0f}')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=sorted(SUITES), required=True)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1, help="run the settings this many times, interleaved")
    ap.add_argument("--timeout", type=float, default=240)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    config, settings = SUITES[args.suite]
    rows = _run_rounds(config, settings, args)
    sys.stdout.write(_table(args.suite, config, rows, args))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
