"""Issue 7 in one command: parallel layouts on several GPUs (NCCL, TE) against one GPU, from one checkpoint.

    python bench/multi_gpu_checks.py --out runs/multi_gpu                       # 2 GPUs, ~1B Llama shapes
    python bench/multi_gpu_checks.py --out runs/mgpu_cpu --config configs/demo_cpu.yaml --steps 4 --warmup 1 \\
        data.output_dir=runs/mgpu_cpu/data                                       # the same on CPU (gloo)

1. ``init``: one process trains 1 step at learning rate 0 (the first warm-up step) and saves it: the initial
   weights, which every layout then loads with ``checkpoint.finetune=true`` (weights only, step 0), so all of them
   start from the same weights and read the same rows in the same order.
2. Each layout trains ``--steps`` steps under ``torchrun --nproc-per-node N`` (TP2, TP2 with sequence parallelism,
   PP2, PP2 x VP2 interleaved, CP2 with packed THD rows, DP2; on CUDA also FP8 delayed and tensorwise at TP1 and
   TP2, and SFT at TP2). Its per-step ``loss`` and ``lm loss`` are compared with the one-GPU run's (BF16 layouts)
   or with BF16 at the same TP (FP8): the largest relative difference over the steps against ``--rtol`` /
   ``--fp8-rtol``. CP2's agreement also checks that the project's CP chunking of packed samples matches TE's THD
   partitioning (a mismatch pairs labels with the wrong tokens).
3. Resharding: the TP2 run also saves at step ``steps // 2``; that checkpoint is resumed (optimizer, scheduler, data
   position) at TP1 and at PP2 for one step, whose loss must equal TP2's own next step within ``--rtol``.
4. Throughput: median ms/step, tokens/s/GPU and MFU after ``--warmup`` steps for every layout, and the BFT / SFT
   step-time ratio at TP2.

Writes a markdown report to stdout and ``OUT/report.md``, raw numbers to ``OUT/results.json``, each run's log to
``OUT/<name>.log``. Exit status 1 if any comparison fails or a run fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
from train_bench import FIELDS, median_field, parse_steps  # noqa: E402  (bench/ is not a package)

LOSSES = {"loss": r"\| loss ([\d.eE+-]+)", "lm_loss": r"\| lm loss ([\d.eE+-]+)"}
TP2, SP, PP2, VP2, CP2 = "parallel.tp=2", "parallel.sequence_parallel=true", "parallel.pp=2", "parallel.vp=2", \
    "parallel.cp=2"
DELAYED = ["train.fp8=hybrid", "train.fp8_recipe=delayed"]
TENSORWISE = ["train.fp8=hybrid", "train.fp8_recipe=tensorwise"]
# (name, processes, overrides, the run it is compared with; None = the reference itself)
BF16_LAYOUTS = [
    ("tp1", 1, [], None),
    ("tp2", 2, [TP2], "tp1"),
    ("tp2 sp", 2, [TP2, SP], "tp1"),
    ("pp2", 2, [PP2], "tp1"),
    ("pp2 vp2", 2, [PP2, VP2], "tp1"),
    ("cp2", 2, [CP2], "tp1"),
    ("dp2", 2, [], "tp1"),
]
CUDA_LAYOUTS = [
    ("tp1 fp8 delayed", 1, DELAYED, "tp1"),
    ("tp2 fp8 delayed", 2, [TP2] + DELAYED, "tp2"),
    ("tp1 fp8 tensorwise", 1, TENSORWISE, "tp1"),
    ("tp2 fp8 tensorwise", 2, [TP2] + TENSORWISE, "tp2"),
    ("tp2 sft", 2, [TP2, "loss.method=sft"], None),
]
RESUMES = [("tp2 -> tp1", 1, []), ("tp2 -> pp2", 2, [PP2])]


def parse_log(out: str) -> list[dict]:
    """One dict per progress line: step, loss, lm_loss, ms, tok, mfu (None where a field is absent)."""
    return parse_steps(out, 0, {**FIELDS, **LOSSES})


def max_rel_diff(got: list[dict], want: list[dict], key: str) -> float | None:
    """Largest ``|got - want| / |want|`` over the steps both runs logged (None: no common step)."""
    ref = {r["step"]: r[key] for r in want if r[key] is not None}
    diffs = [abs(r[key] - ref[r["step"]]) / max(abs(ref[r["step"]]), 1e-12)
             for r in got if r[key] is not None and r["step"] in ref]
    return max(diffs) if diffs else None


class Runner:
    """Launches ``bft_megatron.train`` under torchrun with the shared config and overrides; keeps each log."""

    def __init__(self, args):
        self.args, self.out = args, os.path.abspath(args.out)
        os.makedirs(self.out, exist_ok=True)

    def run(self, name: str, nproc: int, overrides: list[str]) -> dict:
        # --standalone: torchrun picks a free rendezvous port itself
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "bft_megatron.train", "--config", self.args.config,
               "logging.log_interval=1", "logging.tensorboard_dir=null", *self.args.overrides, *overrides]
        proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"), capture_output=True,
                              text=True, timeout=self.args.timeout)
        log = proc.stdout + proc.stderr
        with open(os.path.join(self.out, name.replace(" ", "_").replace(">", "") + ".log"), "w") as fh:
            fh.write(" ".join(cmd) + "\n" + log)
        steps = parse_log(log)
        result = {"name": name, "nproc": nproc, "cmd": " ".join(cmd), "rc": proc.returncode, "steps": steps}
        if proc.returncode != 0 or not steps:
            result["error"] = log[-2000:]
            sys.stderr.write(f"{name}: failed (rc {proc.returncode}), log in {self.out}\n")
        return result

    def init_checkpoint(self) -> str:
        """Step 1 at learning rate 0 (the first warm-up step), saved: the initial weights for every layout."""
        save = os.path.join(self.out, "init")
        res = self.run("init", 1, ["train.train_iters=1", "train.warmup_iters=1", "train.decay_iters=1",
                                   f"checkpoint.save={save}", "checkpoint.save_interval=0"])
        if "error" in res:
            raise SystemExit(f"the initial checkpoint failed:\n{res['error']}")
        return os.path.join(save, "iter_0000001")


def _throughput(steps: list[dict], warmup: int) -> dict:
    after = [r for r in steps if r["step"] > warmup]
    return {"ms": median_field(after, "ms"), "tok_s_gpu": median_field(after, "tok"), "mfu": median_field(after, "mfu")}


def _judge(row: dict, got: list[dict], want: list[dict], tol: float) -> bool:
    """Adds the largest relative loss / lm-loss differences, the tolerance and the verdict to ``row``."""
    diffs = {k: max_rel_diff(got, want, k) for k in ("loss", "lm_loss")}
    passed = all(d is not None and d <= tol for d in diffs.values())
    row.update(diffs, tol=tol, verdict="ok" if passed else "FAILED")
    return passed


def run_layouts(runner: Runner, init: str, layouts, steps: int) -> dict:
    """Every layout from ``init`` for ``steps`` steps; TP2 also saves at ``steps // 2`` for the resume checks."""
    half, results = steps // 2, {}
    for name, nproc, overrides, _ in layouts:
        extra = [f"checkpoint.load={init}", "checkpoint.finetune=true", f"train.train_iters={steps}",
                 f"train.decay_iters={steps}"]
        save = os.path.join(runner.out, "tp2_ckpt") if name == "tp2" else None
        extra += [f"checkpoint.save={save}", f"checkpoint.save_interval={half}"] if save else ["checkpoint.save=null"]
        results[name] = runner.run(name, nproc, overrides + extra)
    return results


def run_resumes(runner: Runner, steps: int) -> dict:
    """TP2's mid-run checkpoint resumed at other layouts for one step (its schedule: decay_iters kept)."""
    half = steps // 2
    ckpt = os.path.join(runner.out, "tp2_ckpt", f"iter_{half:07d}")
    return {name: runner.run(name, nproc, overrides + [f"checkpoint.load={ckpt}", f"train.train_iters={half + 1}",
                                                      f"train.decay_iters={steps}", "checkpoint.save=null"])
            for name, nproc, overrides in RESUMES}


def compare(results: dict, layouts, resumes: dict, args) -> tuple[list[dict], bool]:
    """Rows of the report; ok is False if any run failed or any difference exceeds its tolerance."""
    rows, ok = [], True
    for name, nproc, overrides, ref in layouts:
        res = results[name]
        row = {"name": name, "nproc": nproc, "ref": ref, **_throughput(res["steps"], args.warmup)}
        tol = args.fp8_rtol if any("fp8" in o for o in overrides) else args.rtol
        if "error" in res or (ref and "error" in results[ref]):
            row["verdict"], ok = "run failed", False
        elif ref:
            ok &= _judge(row, res["steps"], results[ref]["steps"], tol)
        rows.append(row)
    half = args.steps // 2
    for name, res in resumes.items():
        want = [r for r in results["tp2"]["steps"] if r["step"] == half + 1]
        got = [r for r in res["steps"] if r["step"] == half + 1]
        row = {"name": name, "nproc": res["nproc"], "ref": f"tp2 step {half + 1}", "tol": args.rtol}
        if "error" in res or not want or not got:
            row["verdict"], ok = "run failed", False
        else:
            ok &= _judge(row, got, want, args.rtol)
        rows.append(row)
    return rows, ok


def report(rows: list[dict], args) -> str:
    fmt = (lambda v, f: f.format(v) if v is not None else "")
    lines = [f"config {args.config} {' '.join(args.overrides)}; {args.steps} steps from one initial checkpoint; "
             f"throughput: median after step {args.warmup}",
             "| run | procs | vs | max rel. diff loss | max rel. diff lm loss | tolerance | verdict | ms/step "
             "| tok/s/GPU | MFU |", "|---|---:|---|---:|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['nproc']} | {r.get('ref') or ''} | {fmt(r.get('loss'), '{:.2e}')} | "
                     f"{fmt(r.get('lm_loss'), '{:.2e}')} | {fmt(r.get('tol'), '{:.0e}')} | "
                     f"{r.get('verdict', 'reference')} | {fmt(r.get('ms'), '{:.0f}')} | "
                     f"{fmt(r.get('tok_s_gpu'), '{:.0f}')} | {fmt(r.get('mfu'), '{:.3f}')} |")
    by_name = {r["name"]: r for r in rows}
    if by_name.get("tp2 sft", {}).get("ms") and by_name["tp2"].get("ms"):
        lines.append(f"\nBFT / SFT step time at TP2: {by_name['tp2']['ms'] / by_name['tp2 sft']['ms']:.3f}")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory for checkpoints, logs and the report")
    ap.add_argument("--config", default="configs/bench/llama_1b.yaml")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3, help="steps left out of the throughput medians")
    ap.add_argument("--rtol", type=float, default=2e-2, help="BF16 / fp32 layouts against one GPU")
    ap.add_argument("--fp8-rtol", type=float, default=5e-2, help="FP8 against BF16 at the same TP")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per run")
    ap.add_argument("--no-fp8", action="store_true", help="skip the FP8 and SFT runs (always skipped on CPU)")
    ap.add_argument("overrides", nargs="*", help="config overrides for every run (a.b=c)")
    args = ap.parse_args()
    if args.steps < 2:
        ap.error(f"--steps must be >= 2 (the resume checks start at steps // 2), got {args.steps}")
    import torch

    layouts = BF16_LAYOUTS + (CUDA_LAYOUTS if torch.cuda.is_available() and not args.no_fp8 else [])
    runner = Runner(args)
    init = runner.init_checkpoint()
    results = run_layouts(runner, init, layouts, args.steps)
    resumes = run_resumes(runner, args.steps) if "error" not in results["tp2"] else {}
    rows, ok = compare(results, layouts, resumes, args)
    text = report(rows, args)
    sys.stdout.write(text)
    with open(os.path.join(runner.out, "report.md"), "w") as fh:
        fh.write(text)
    with open(os.path.join(runner.out, "results.json"), "w") as fh:
        json.dump({"rows": rows, "runs": {**results, **resumes}}, fh, indent=2)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
