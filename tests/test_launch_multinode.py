"""A fake two-node launch on loopback: ``launch/torchrun.sh`` started twice (NODE_RANK 0 and 1, one process
each), static rendezvous at 127.0.0.1, gloo on CPU. Both "nodes" must join one world of 2 (DP2), train
3 steps of a small model on the demo data, save a checkpoint and exit 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from bft_megatron.parallel.bootstrap import free_port

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 120
# configs/demo_cpu.yaml with a smaller model (the demo tokenizer's 3000-entry vocabulary stays) and short rows.
SMALL = ["model.hidden_size=64", "model.num_layers=2", "model.ffn_hidden_size=128", "data.seq_length=64",
         "train.global_batch_size=4", "train.micro_batch_size=2", "train.train_iters=3", "train.warmup_iters=1",
         "train.eval_interval=0", "loss.sft_warmup_iters=0", "logging.log_interval=1",
         "logging.tensorboard_dir=null"]


def _start_node(rank: int, port: int, overrides: list[str], log_path: str) -> subprocess.Popen:
    env = dict(os.environ, NNODES="2", NODE_RANK=str(rank), NPROC_PER_NODE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), CONFIG="configs/demo_cpu.yaml", PYTHON=sys.executable, OMP_NUM_THREADS="1")
    with open(log_path, "w") as log:   # a file, not a pipe: nothing can block on a full pipe
        return subprocess.Popen(["bash", "launch/torchrun.sh", *overrides], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _wait_all(procs: list[subprocess.Popen], timeout: float) -> list[int | None]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        time.sleep(0.2)
    return [p.poll() for p in procs]


def _kill_groups(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)   # the node's own session: torchrun and its worker
            except ProcessLookupError:
                pass
            p.wait()


def test_two_nodes_on_loopback(tmp_path):
    save = tmp_path / "ckpt"
    overrides = SMALL + [f"checkpoint.save={save}", f"data.output_dir={tmp_path / 'data'}"]
    port = free_port()
    logs = [str(tmp_path / f"node{r}.log") for r in (0, 1)]
    procs = [_start_node(r, port, overrides, logs[r]) for r in (0, 1)]
    try:
        codes = _wait_all(procs, TIMEOUT_S)
    finally:
        _kill_groups(procs)
    texts = [Path(path).read_text(encoding="utf-8", errors="replace") for path in logs]
    assert codes == [0, 0], f"exit codes {codes}\n--- node 0\n{texts[0][-6000:]}\n--- node 1\n{texts[1][-3000:]}"
    node0, node1 = texts
    assert "torchrun.sh: node 0/2, 1 proc/node, master 127.0.0.1" in node0
    assert "torchrun.sh: node 1/2, 1 proc/node" in node1
    assert "world=2 tp=1 pp=1 vp=None cp=1 dp=2 backend=gloo" in node0      # both nodes joined one world
    for step in (1, 2, 3):
        assert f"step {step}/3 |" in node0
    assert "done: 3 steps, 0 skipped, 12 rows consumed" in node0           # 3 x global batch 4
    assert (save / "latest").read_text().strip() == "iter_0000003"
    assert (save / "iter_0000003").is_dir()
    assert not (save / "RESUME").exists()                                  # finished: nothing to requeue
