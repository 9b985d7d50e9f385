"""inductor's compile workers survive the exit signals sent to the rank's whole process group.

inductor compiles in a sidecar process (started with ``subprocess.Popen`` in the rank's process group) and its
worker pool. torchrun's agent (and SLURM with proctrack/pgid) ``killpg``s the rank's group with SIGUSR1/SIGTERM:
the sidecar died, the rank lived on (its handlers), and its next compile waited forever. On GPUs only: without
Triton inductor starts no pool, so the script below pretends Triton is there (the pool itself is plain Python).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = """
import os, signal, sys, time
from torch._inductor import async_compile
async_compile.has_triton_package = lambda: True          # as on a GPU node
from bft_megatron.utils.signal_shield import EXIT_SIGNALS, start_compile_workers
def ours(*_):
    pass
for sig in EXIT_SIGNALS:                                  # the rank's handlers (ExitRequest), installed first
    signal.signal(sig, ours)
if sys.argv[1] == "shielded":
    assert start_compile_workers()
    assert all(signal.getsignal(sig) is ours for sig in EXIT_SIGNALS)   # put back after the start
pool = async_compile.AsyncCompile.process_pool()          # the first compile's pool (made here if not yet)
pool.submit(os.getpid).result(timeout=60)
for sig in EXIT_SIGNALS:
    os.killpg(0, sig)
time.sleep(2.0)
print("sidecar:", pool.process.poll(), flush=True)
print("compile after the signals:", pool.submit(os.getpid).result(timeout=float(sys.argv[2])) > 0, flush=True)
"""


@pytest.mark.parametrize("mode", ["shielded", "unshielded"])
def test_compile_workers_survive_the_exit_signals(mode):
    env = dict(os.environ, PYTHONPATH=ROOT, TORCHINDUCTOR_COMPILE_THREADS="2")
    wait = "30" if mode == "shielded" else "4"
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode, wait], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=180, start_new_session=True)   # its own group: the killpg stays inside
    if mode == "shielded":
        assert out.returncode == 0, out.stderr[-3000:]
        assert "sidecar: None" in out.stdout and "compile after the signals: True" in out.stdout
    else:  # the failure this guards against: the sidecar is dead and the next compile never returns
        assert "sidecar: -" in out.stdout and "compile after the signals: True" not in out.stdout, out.stdout


def test_the_trainer_starts_them_on_cuda_with_its_handlers_installed(monkeypatch):
    import signal

    import torch

    from bft_megatron.training import fit

    started = []
    monkeypatch.setattr(fit, "start_compile_workers", lambda: started.append(1))
    monkeypatch.setattr(signal, "signal", lambda sig, handler: None)
    for install in (False, True):
        request = fit.ExitRequest(install=install)
        for device in ("cpu", "cuda"):
            request.shield_compile_workers(torch.device(device))
    assert started == [1]                                 # installed, on CUDA
