"""Launch tests/train_worker.py on N gloo processes with torchrun and return rank 0's results."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

from bft_megatron.parallel.bootstrap import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Tiny Llama-style model: 4 layers (PP2 x VP2 possible), 4 heads / 2 KV groups (TP2), 128-entry
# vocabulary padded identically at TP1 and TP2 (so checkpoints reshard), fp32, no dropout.
TINY = ["model.hidden_size=64", "model.num_layers=4", "model.num_attention_heads=4", "model.num_query_groups=2",
        "model.ffn_hidden_size=128", "model.vocab_size=128", "model.make_vocab_size_divisible_by=32",
        "model.max_position_embeddings=64", "data.seq_length=32", "data.packing=true",
        "train.bf16=false", "train.global_batch_size=8", "train.micro_batch_size=2", "train.lr=3e-3",
        "train.warmup_iters=1", "train.train_iters=4", "train.dropout=0.0", "loss.method=bft", "loss.group_size=4",
        "train.clip_grad=1.0"]


def _run(nproc: int, runs: list[dict], tmp: str, timeout: int) -> tuple[subprocess.CompletedProcess, str]:
    job, out = os.path.join(tmp, "job.json"), os.path.join(tmp, "out.json")
    with open(job, "w") as fh:
        json.dump({"runs": runs, "out": out}, fh)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={free_port()}",
           "--master-addr=127.0.0.1", os.path.join(ROOT, "tests", "train_worker.py"), job]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    # Output goes to a file, not a pipe: a stray grandchild holding a pipe would block us until timeout.
    with open(os.path.join(tmp, "log.txt"), "w+") as log:
        child = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _dump_stacks_and_kill(child, log)
            log.seek(0)
            raise RuntimeError(f"workers still running after {timeout} s; their stacks (SIGUSR2):\n"
                               f"{log.read()[-40000:]}") from None
        log.seek(0)
        proc = subprocess.CompletedProcess(cmd, child.returncode, log.read())
    return proc, out


def _dump_stacks_and_kill(child: subprocess.Popen, log) -> None:
    """A hung launch: every worker process (and its forks, e.g. an async checkpoint writer) writes all its threads'
    stacks into the log, one process after another (train_worker.py registers faulthandler on SIGUSR2); then the
    whole tree is killed, so no orphan keeps running into later tests."""
    import psutil

    tree = psutil.Process(child.pid).children(recursive=True)
    for proc in tree:
        with contextlib.suppress(psutil.Error):
            if any(part.endswith("train_worker.py") for part in proc.cmdline()):
                # os.write: at the offset the workers share (the file object's buffer keeps its own position)
                os.write(log.fileno(), f"\n=== stacks of pid {proc.pid} (parent {proc.ppid()})\n".encode())
                proc.send_signal(signal.SIGUSR2)
                time.sleep(1)
    for proc in tree + [psutil.Process(child.pid)]:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    child.wait()


def launch(nproc: int, runs: list[dict], timeout: int = 400) -> list[dict]:
    """Run ``runs`` (each {"overrides": [...], ...}) in one torchrun launch; rank 0's results."""
    with tempfile.TemporaryDirectory() as tmp:
        proc, out = _run(nproc, runs, tmp, timeout)
        if not os.path.exists(out):
            raise RuntimeError(f"worker failed (rc={proc.returncode}):\n{proc.stdout[-12000:]}")
        with open(out) as fh:
            return json.load(fh)


def launch_raw(nproc: int, runs: list[dict], timeout: int = 400) -> subprocess.CompletedProcess:
    """Like :func:`launch` but return the finished process (for runs expected to die)."""
    with tempfile.TemporaryDirectory() as tmp:
        return _run(nproc, runs, tmp, timeout)[0]
