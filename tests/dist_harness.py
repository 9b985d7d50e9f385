"""Run a function on N gloo processes (spawned) and collect each rank's return value.

Used by the multi-process tests: one spawn per test module runs every scenario of the module, so
the cost of starting processes and importing torch is paid once.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import time
import traceback

import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, world_size: int, init_file: str, out_dir: str, fn, args) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        result = ("ok", fn(rank, world_size, *args))
    except BaseException:  # noqa: BLE001 - reported to the parent test
        result = ("error", traceback.format_exc())
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as fh:
        pickle.dump(result, fh)
    dist.destroy_process_group()


# A call still running after this long is hung (a collective some rank never reaches): its ranks are killed and the
# test fails with the function's name, instead of the whole suite hanging without a word.
HUNG_AFTER_S = 900.0


def run_distributed(fn, world_size: int, *args, timeout: float = 300.0) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return the per-rank results.

    ``fn`` must be importable (a module-level function). A failure on any rank raises with its traceback.
    ``timeout``: how often to look for a rank that failed; the call fails once it ran :data:`HUNG_AFTER_S`.
    """
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "store")
        ctx = mp.start_processes(_entry, args=(world_size, init_file, tmp, fn, args), nprocs=world_size,
                                 join=False, start_method="spawn")
        deadline = time.monotonic() + HUNG_AFTER_S
        while not ctx.join(timeout=min(timeout, max(deadline - time.monotonic(), 0.1))):
            if time.monotonic() >= deadline:
                for proc in ctx.processes:
                    proc.kill()
                raise TimeoutError(f"{fn.__name__} on {world_size} gloo ranks still ran after {HUNG_AFTER_S:.0f} s "
                                   "(hung: its ranks were killed)")
        results = []
        for rank in range(world_size):
            with open(os.path.join(tmp, f"rank{rank}.pkl"), "rb") as fh:
                status, value = pickle.load(fh)
            if status != "ok":
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            results.append(value)
        return results
