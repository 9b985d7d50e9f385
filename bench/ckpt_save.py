"""Where a synchronous checkpoint save spends its time, and how the torch_dist writer's process count changes it.

    python bench/ckpt_save.py --config configs/bench/demo_gpu.yaml --dir /tmp/ckbench --threads 1 2 4 8
    python bench/ckpt_save.py --config configs/bench/demo_gpu.yaml --dir /tmp/ckbench --threads 2 \
        --optim fully_reshardable dp_reshardable --profile-state

Builds the trainer from the config, trains one step (so the optimizer state exists), then saves ``--rounds``
times per writer count (interleaved: 1 2 4 8 1 2 4 8 ...), after one warm-up save that is not reported (it
imports transformers for the checkpoint's HF files and starts megatron's multiprocessing machinery). Each save
is split into:

* ``state``: ``Checkpointer._state_for_save``: the sharded state dict; for the distributed optimizer's
  ``fully_reshardable`` format this copies the optimizer state into full-size host buffers;
* ``d2h``: the torch_dist writer's copy of the device tensors (weights) to host memory;
* ``write``: the writer's processes serialising and fsync-ing the files (``--threads`` of them, megatron's
  ``thread_count``, default 2);
* ``other``: the rest of ``dist_checkpointing.save`` (planning, metadata, the common state) and the commit
  (``iter_N/hf/``, the ``latest`` pointer).

``--optim``: ``checkpoint.optimizer_format`` per save (interleaved with ``--threads``): ``fully_reshardable`` (the
default) or ``dp_reshardable`` (no gather; each DP rank writes its own flat buffers; Megatron-LM's default).
``--profile-state``: one more save whose ``state`` phase runs under cProfile; prints its top functions.

Prints a markdown table (median seconds per phase, GB written, GB/s over the whole save) and, with --json,
every save's numbers. The run directory is deleted after each save: only one checkpoint is on disk at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

PHASES = ("state", "d2h", "write", "other", "total")


class _Timer:
    """Seconds spent inside wrapped callables, per phase, since the last ``reset``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def reset(self) -> None:
        self.seconds = {}

    def wrap(self, phase: str, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start
        return timed


FORMATS = ("fully_reshardable", "dp_reshardable")


def _profile_state(checkpointer, trainer, run_dir: str, top: int = 20) -> str:
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    original = checkpointer._state_for_save
    checkpointer._state_for_save = lambda t: profiler.runcall(original, t)
    try:
        checkpointer.save(trainer)
    finally:
        checkpointer._state_for_save = original
        shutil.rmtree(run_dir)
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()


def _instrument(timer: _Timer, thread_count: list[int]):
    """A Checkpointer subclass whose saves use ``thread_count[0]`` writer processes, with megatron's writer
    stages timed. The writer's stages are static methods looked up through the instance when a save runs."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    from bft_megatron.checkpoint.manager import Checkpointer

    for name, phase in (("preload_tensors", "d2h"), ("write_preloaded_data_multiproc", "write")):
        setattr(FileSystemWriterAsync, name, staticmethod(timer.wrap(phase, getattr(FileSystemWriterAsync, name))))

    class TimedCheckpointer(Checkpointer):
        def _save_strategy(self):
            strategy = super()._save_strategy()
            getattr(strategy, "base_strategy", strategy).thread_count = thread_count[0]
            return strategy

        def _state_for_save(self, trainer):
            return timer.wrap("state", super()._state_for_save)(trainer)

    return TimedCheckpointer


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def _one_save(checkpointer, trainer, timer: _Timer, run_dir: str) -> dict:
    import torch

    timer.reset()
    start = time.perf_counter()
    path = checkpointer.save(trainer)
    total = time.perf_counter() - start
    row = {phase: timer.seconds.get(phase, 0.0) for phase in ("state", "d2h", "write")}
    row["other"] = total - sum(row.values())
    row["total"] = total
    row["gb"] = _dir_bytes(path) / 1e9
    shutil.rmtree(run_dir)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return row


def _table(results: dict[str, list[dict]]) -> str:
    header = " | ".join(f"{p} s" for p in PHASES)
    lines = [f"| optimizer format, writer processes | {header} | GB | GB/s | saves |",
             "|---|" + "---:|" * (len(PHASES) + 3)]
    for setting, rows in results.items():
        med = {k: statistics.median(r[k] for r in rows) for k in PHASES + ("gb",)}
        cells = " | ".join(f"{med[p]:.2f}" for p in PHASES)
        lines.append(f"| {setting} | {cells} | {med['gb']:.2f} | {med['gb'] / med['total']:.2f} | {len(rows)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--dir", required=True, help="checkpoint.save for the measured saves (deleted after each)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--optim", nargs="+", choices=FORMATS, default=[FORMATS[0]])
    ap.add_argument("--profile-state", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    from bft_megatron.config import load_config, validate
    from bft_megatron.parallel import bootstrap
    from bft_megatron.training.build import build_trainer
    from bft_megatron.training.fit import fit

    cfg = load_config(args.config, args.overrides + [f"checkpoint.save={args.dir}"])
    groups = bootstrap.initialize(seed=cfg.train.seed)
    trainer = build_trainer(cfg, validate(cfg, 1), groups)
    trainer.cfg.train.train_iters = 1  # one step: the optimizer state exists and has its real size
    fit(trainer, None)
    timer, thread_count = _Timer(), [2]
    checkpointer = _instrument(timer, thread_count)(cfg, groups)
    checkpointer.ckpt.optimizer_format = args.optim[0]
    warmup = _one_save(checkpointer, trainer, timer, args.dir)
    results: dict[str, list[dict]] = {f"{o}, {t}": [] for o in args.optim for t in args.threads}
    for _ in range(args.rounds):
        for setting in results:
            optim, threads = setting.split(", ")
            checkpointer.ckpt.optimizer_format = optim
            thread_count[0] = int(threads)
            results[setting].append(_one_save(checkpointer, trainer, timer, args.dir))
            sys.stderr.write(f"{setting}: {results[setting][-1]}\n")
    sys.stdout.write(f"warm-up save ({args.optim[0]}, 2 writer processes, not in the table): {warmup['total']:.1f} s\n")
    sys.stdout.write(_table(results) + "\n")
    if args.profile_state:
        checkpointer.ckpt.optimizer_format = args.optim[0]
        sys.stdout.write(f"state phase of one more save ({args.optim[0]}) under cProfile:\n")
        sys.stdout.write(_profile_state(checkpointer, trainer, args.dir))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"warmup": warmup, "saves": results}, fh, indent=1)
    bootstrap.destroy()


if __name__ == "__main__":
    main()
