"""Launch tests/train_worker.py on N gloo processes with torchrun and return rank 0's results."""

import json
import os
import socket
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Tiny Llama-style model: 4 layers (PP2 x VP2 possible), 4 heads / 2 KV groups (TP2), 128-entry
# vocabulary padded identically at TP1 and TP2 (so checkpoints reshard), fp32, no dropout.
TINY = ["model.hidden_size=64", "model.num_layers=4", "model.num_attention_heads=4", "model.num_query_groups=2",
        "model.ffn_hidden_size=128", "model.vocab_size=128", "model.make_vocab_size_divisible_by=32",
        "model.max_position_embeddings=64", "data.seq_length=32", "data.layout=packed", "data.synthetic_samples=512",
        "train.bf16=false", "train.global_batch_size=8", "train.micro_batch_size=2", "train.lr=3e-3",
        "train.warmup_iters=1", "train.train_iters=4", "train.dropout=0.0", "loss.method=bft", "loss.group_size=4",
        "train.clip_grad=1.0"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, runs: list[dict], timeout: int = 240) -> list[dict]:
    """Run ``runs`` (each {"overrides": [...], ...}) in one torchrun launch; rank 0's results."""
    with tempfile.TemporaryDirectory() as tmp:
        job, out = os.path.join(tmp, "job.json"), os.path.join(tmp, "out.json")
        with open(job, "w") as fh:
            json.dump({"runs": runs, "out": out}, fh)
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--master-port={_free_port()}", "--master-addr=127.0.0.1",
               os.path.join(ROOT, "tests", "train_worker.py"), job]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        if not os.path.exists(out):
            raise RuntimeError(f"worker failed (rc={proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
        with open(out) as fh:
            return json.load(fh)


def launch_raw(nproc: int, runs: list[dict], timeout: int = 240) -> subprocess.CompletedProcess:
    """Like :func:`launch` but return the process (for runs expected to die)."""
    tmp = tempfile.mkdtemp()
    job = os.path.join(tmp, "job.json")
    with open(job, "w") as fh:
        json.dump({"runs": runs, "out": os.path.join(tmp, "out.json")}, fh)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={_free_port()}",
           "--master-addr=127.0.0.1", os.path.join(ROOT, "tests", "train_worker.py"), job]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
