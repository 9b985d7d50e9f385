"""launch/slurm.sbatch end to end on CPU, with fake ``srun``/``scontrol`` and a fake trainer.

The script runs unchanged under bash with the SLURM_* variables of a one-task job. ``srun`` is a stand-in that
records its arguments and runs the task command locally as task 0 of 1; ``$PYTHON`` is a stand-in that passes
``bft_megatron.config.show`` (and, on request, the ``--check`` pre-flight) to the real interpreter and plays the
trainer: it finishes, stops early (writes RESUME), crashes with a given status, or waits for a signal.
``scontrol requeue`` is recorded, so the tests see the requeue decision. Each case takes about a second.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "launch", "slurm.sbatch")
CONFIG = os.path.join(ROOT, "configs", "demo_cpu.yaml")
JOB_ID = "4242"

# Signals as srun treats them (src/srun/srun.c, _forward_signal): SIGTERM/SIGHUP/SIGQUIT mean "forcing job
# termination", a SIGKILL to every task; other signals (SIGUSR1, ...) are forwarded to the tasks as they are.
FAKE_SRUN = """#!/usr/bin/env bash
echo "$*" >> "$FAKE_DIR/srun.args"
while [[ $# -gt 0 && $1 == -* ]]; do shift; done        # srun's own options
export SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_NTASKS=1 SLURM_NTASKS_PER_NODE=1
task=
trap 'echo "srun: forcing job termination"; [[ -n $task ]] && kill -KILL $task' TERM HUP QUIT
trap '[[ -n $task ]] && kill -USR1 $task' USR1                   # srun's handlers exist before its tasks do
trap '[[ -n $task ]] && kill -USR2 $task' USR2
"$@" &
task=$!
while :; do
  wait $task; rc=$?
  kill -0 $task 2>/dev/null || break                    # reaped: rc is the task's status (128+n if killed)
done
exit $rc
"""

FAKE_SCONTROL = """#!/usr/bin/env bash
echo "$*" >> "$FAKE_DIR/scontrol.log"
if [[ $1 == show && $2 == hostnames ]]; then printf 'node001\\nnode002\\n'; fi
"""

FAKE_PYTHON = """#!/usr/bin/env bash
if [[ $1 == -c && $2 == *FlightRecorder* ]]; then exec "$REAL_PYTHON" "$@"; fi   # env.sh's torch lookup
if [[ $1 == -c ]]; then                                   # env.sh's cuDNN lookup
  [[ -n ${FAKE_CUDNN:-} ]] && { echo "$FAKE_CUDNN"; exit 0; }
  exit 1
fi
if [[ $1 == -m && $2 == bft_megatron.config.show ]]; then exec "$REAL_PYTHON" "$@"; fi
if [[ " $* " == *" --check "* ]]; then
  echo "check WORLD_SIZE=$WORLD_SIZE" >> "$FAKE_DIR/calls.log"
  [[ ${FAKE_CHECK:-} == real ]] && exec "$REAL_PYTHON" "$@"
  exit 0
fi
echo "train RANK=$RANK LOCAL_RANK=$LOCAL_RANK WORLD_SIZE=$WORLD_SIZE $*" >> "$FAKE_DIR/calls.log"
env > "$FAKE_DIR/train.env"
case $FAKE_TRAIN in
  finish) exit 0 ;;
  early) echo exit_duration_minutes > "$FAKE_SAVE/RESUME"; exit 0 ;;
  term_direct) echo SIGTERM > "$FAKE_SAVE/RESUME"; exit 0 ;;
  crash) exit "$FAKE_STATUS" ;;
  wait_signal)
    trap 'echo SIGUSR1 > "$FAKE_SAVE/RESUME"; echo SIGUSR1 > "$FAKE_DIR/rank_got"; exit 0' USR1
    trap 'echo SIGTERM > "$FAKE_SAVE/RESUME"; echo SIGTERM > "$FAKE_DIR/rank_got"; exit 0' TERM
    touch "$FAKE_DIR/started"
    for _ in $(seq 300); do sleep 0.1; done
    exit 9 ;;
esac
"""

# Variables the script reads or env.sh sets: cleared, so that the caller's environment cannot leak into a case.
CLEARED = ["SAVE_DIR", "MAX_CRASH_REQUEUES", "LOG_DIR", "MASTER_ADDR", "MASTER_PORT", "BFT_ROOT", "SRUN_CPUS_PER_TASK",
           "CUDA_DEVICE_MAX_CONNECTIONS", "TORCH_NCCL_ASYNC_ERROR_HANDLING", "NCCL_DEBUG", "OMP_NUM_THREADS",
           "TORCH_NCCL_AVOID_RECORD_STREAMS", "NCCL_NVLS_ENABLE", "TORCH_NCCL_DUMP_ON_TIMEOUT",
           "TORCH_NCCL_TRACE_BUFFER_SIZE", "TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE", "CUDNN_HOME",
           "RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_RESTART_COUNT"]


class FakeSlurm:
    def __init__(self, tmp: Path):
        self.tmp, self.bin, self.save = tmp, tmp / "bin", tmp / "ckpt"
        self.bin.mkdir()
        self.save.mkdir()
        for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("python", FAKE_PYTHON)):
            path = self.bin / name
            path.write_text(text)
            path.chmod(path.stat().st_mode | stat.S_IXUSR)

    def env(self, train: str, status: int = 0, **extra: str) -> dict:
        env = {k: v for k, v in os.environ.items() if k not in CLEARED and not k.startswith("SLURM_")}
        env.update(PATH=f"{self.bin}{os.pathsep}{env['PATH']}", PYTHON=str(self.bin / "python"),
                   REAL_PYTHON=sys.executable, PYTHONPATH=ROOT, FAKE_DIR=str(self.tmp), FAKE_SAVE=str(self.save),
                   FAKE_TRAIN=train, FAKE_STATUS=str(status), SLURM_JOB_ID=JOB_ID,
                   SLURM_JOB_NODELIST="node[001-002]", SLURM_NNODES="1", SLURM_NTASKS="1", SLURM_NTASKS_PER_NODE="1",
                   SLURM_CPUS_PER_TASK="12", SLURM_SUBMIT_DIR=ROOT)
        env.update(extra)
        return env

    def args(self, *overrides: str) -> list[str]:
        return ["bash", SCRIPT, CONFIG, f"checkpoint.save={self.save}", *overrides]

    def run(self, train: str, status: int = 0, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(self.args(), env=self.env(train, status, **extra), cwd=self.tmp, capture_output=True,
                              text=True, timeout=60)

    def read(self, name: str) -> str:
        path = self.tmp / name
        return path.read_text() if path.exists() else ""

    def requeues(self) -> list[str]:
        return [line for line in self.read("scontrol.log").splitlines() if line.startswith("requeue")]

    def reset_logs(self) -> None:
        for name in ("scontrol.log", "srun.args", "calls.log", "train.env"):
            (self.tmp / name).unlink(missing_ok=True)

    def stale_marker(self) -> None:
        (self.save / "RESUME").write_text("SIGUSR1\n")    # left by an earlier run that stopped early


@pytest.fixture
def slurm(tmp_path):
    return FakeSlurm(tmp_path)


def _out(result: subprocess.CompletedProcess) -> str:
    return f"rc={result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"


def test_stale_marker_and_config_error_does_not_requeue(slurm):
    slurm.stale_marker()
    result = slurm.run("crash", status=2, MAX_CRASH_REQUEUES="5")   # even with crash requeues on
    assert result.returncode == 2, _out(result)
    assert "train RANK=0 LOCAL_RANK=0 WORLD_SIZE=1" in slurm.read("calls.log")   # the trainer did run
    assert slurm.requeues() == [], _out(result)
    assert not (slurm.save / "RESUME").exists()                                   # the stale marker is gone
    assert "config error (exit 2): not requeueing" in result.stdout


def test_stale_marker_and_crash_does_not_requeue_by_default(slurm):
    slurm.stale_marker()
    result = slurm.run("crash", status=1)
    assert result.returncode == 1, _out(result)
    assert slurm.requeues() == [], _out(result)
    assert "MAX_CRASH_REQUEUES=0" in result.stdout


def test_early_stop_requeues(slurm):
    result = slurm.run("early")
    assert result.returncode == 0, _out(result)
    assert slurm.requeues() == [f"requeue {JOB_ID}"], _out(result)
    assert "stopped early (exit_duration_minutes) after saving" in result.stdout


def test_finished_run_with_stale_marker_does_not_requeue(slurm):
    slurm.stale_marker()
    result = slurm.run("finish")
    assert result.returncode == 0, _out(result)
    assert slurm.requeues() == [], _out(result)
    assert not (slurm.save / "RESUME").exists()


def test_crash_requeues_are_bounded_and_reset_by_a_clean_run(slurm):
    for attempt in (1, 2):
        slurm.reset_logs()
        result = slurm.run("crash", status=137, MAX_CRASH_REQUEUES="2", SLURM_RESTART_COUNT=str(attempt - 1))
        assert result.returncode == 137, _out(result)
        assert slurm.requeues() == [f"requeue {JOB_ID}"], _out(result)
        assert f"crash requeue {attempt} of MAX_CRASH_REQUEUES=2" in result.stdout
    slurm.reset_logs()
    result = slurm.run("crash", status=137, MAX_CRASH_REQUEUES="2")
    assert slurm.requeues() == [], _out(result)
    assert "2 crash requeues in a row" in result.stdout
    # A run that exits 0 resets the count; another job id never inherits it.
    slurm.run("early", MAX_CRASH_REQUEUES="2")
    assert not (slurm.save / "CRASH_REQUEUES").exists()
    (slurm.save / "CRASH_REQUEUES").write_text("1111 2\n")
    slurm.reset_logs()
    result = slurm.run("crash", status=1, MAX_CRASH_REQUEUES="2")
    assert slurm.requeues() == [f"requeue {JOB_ID}"], _out(result)
    assert (slurm.save / "CRASH_REQUEUES").read_text().split() == [JOB_ID, "1"]


def test_crash_before_the_save_directory_exists_is_counted(slurm):
    """A first run that crashes before the trainer makes checkpoint.save (model build, checkpoint load): the count
    could not be written there, so every crash was requeue 1 of N, without bound."""
    slurm.save.rmdir()
    for attempt in (1, 2, 3):
        slurm.reset_logs()
        result = slurm.run("crash", status=1, MAX_CRASH_REQUEUES="2")
        assert result.returncode == 1, _out(result)
        assert slurm.requeues() == ([f"requeue {JOB_ID}"] if attempt <= 2 else []), _out(result)
    assert "2 crash requeues in a row" in result.stdout


def _run_and_signal(slurm: FakeSlurm, sig: int) -> subprocess.CompletedProcess:
    with open(slurm.tmp / "out.txt", "w+") as out:
        proc = subprocess.Popen(slurm.args(), env=slurm.env("wait_signal"), cwd=slurm.tmp, stdout=out,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            deadline = time.monotonic() + 30
            while not (slurm.tmp / "started").exists():
                assert proc.poll() is None and time.monotonic() < deadline, out.read()
                time.sleep(0.05)
            proc.send_signal(sig)                       # to the batch script, as `--signal=B:USR1@N` does
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        out.seek(0)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), "")


def test_usr1_is_forwarded_and_the_saved_run_requeued(slurm):
    result = _run_and_signal(slurm, signal.SIGUSR1)
    assert result.returncode == 0, _out(result)
    assert "SIGUSR1 received, asking the ranks to save and exit" in result.stdout
    assert (slurm.save / "RESUME").read_text().strip() == "SIGUSR1"    # the fake ranks got it
    assert slurm.requeues() == [f"requeue {JOB_ID}"], _out(result)


def test_term_is_forwarded_but_not_requeued(slurm):
    """Forwarded as USR1: a SIGTERM to srun is its "forcing job termination", which SIGKILLed every rank."""
    result = _run_and_signal(slurm, signal.SIGTERM)
    assert result.returncode == 0, _out(result)
    assert "forcing job termination" not in result.stdout
    assert (slurm.tmp / "rank_got").read_text().strip() == "SIGUSR1"    # the fake ranks got it as USR1
    # RESUME then says what it was (a reader, or a requeue tool, would take SIGUSR1 for a walltime stop)
    assert (slurm.save / "RESUME").read_text().strip() == "SIGTERM"
    assert slurm.requeues() == [], _out(result)
    assert "not requeueing" in result.stdout


def test_a_sigterm_straight_to_the_ranks_is_not_requeued(slurm):
    """Preemption with GraceTime (and scancel, the time limit) signals the job steps; the batch script may see
    nothing. The ranks save and exit 0 leaving RESUME=SIGTERM: a stop, not a walltime stop to requeue."""
    result = slurm.run("term_direct")
    assert result.returncode == 0, _out(result)
    assert slurm.requeues() == [], _out(result)
    assert "saved on a SIGTERM from SLURM" in result.stdout and "not requeueing" in result.stdout


def test_config_error_stops_before_srun(slurm):
    slurm.stale_marker()
    env = slurm.env("finish", FAKE_CHECK="real")
    result = subprocess.run(slurm.args("parallel.tp=3"), env=env, cwd=slurm.tmp, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2, _out(result)
    assert "check WORLD_SIZE=1" in slurm.read("calls.log")
    assert "world size 1 is not divisible by parallel.tp" in result.stderr
    assert slurm.read("srun.args") == "" and slurm.requeues() == []


@pytest.mark.parametrize("value", ["two", "2x", "-1", "08"])  # 08: bash arithmetic's invalid octal
def test_bad_max_crash_requeues_stops_before_srun(slurm, value):
    """Checked at the start: it used to break the requeue decision only after the crash it was meant for."""
    result = slurm.run("crash", status=1, MAX_CRASH_REQUEUES=value)
    assert result.returncode == 2, _out(result)
    assert f"MAX_CRASH_REQUEUES={value} must be a whole number >= 0" in result.stderr
    assert slurm.read("calls.log") == "" and slurm.read("srun.args") == "" and slurm.requeues() == []


@pytest.mark.parametrize("missing", ["SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_NTASKS", "SLURM_NTASKS_PER_NODE"])
def test_outside_sbatch_says_so(slurm, missing):
    """`bash launch/slurm.sbatch CONFIG` outside a job (or without --ntasks-per-node) used to end in `set -u`'s
    "unbound variable" (exit 1), some of them only after the pre-flight check."""
    env = slurm.env("finish")
    del env[missing]
    result = subprocess.run(slurm.args(), env=env, cwd=slurm.tmp, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, _out(result)
    assert f"{missing} is not set: submit this script with sbatch" in result.stderr
    assert slurm.read("calls.log") == "" and slurm.read("srun.args") == ""


def test_save_dir_must_match_checkpoint_save(slurm, tmp_path):
    """The trainer writes RESUME to checkpoint.save, never to SAVE_DIR: a SAVE_DIR naming another directory (say,
    exported in the submitting shell) used to delete and look for RESUME there, so a walltime stop never requeued."""
    other = tmp_path / "elsewhere"
    other.mkdir()
    result = slurm.run("early", SAVE_DIR=str(other))
    assert result.returncode == 2, _out(result)
    assert f"SAVE_DIR={other} but the trainer saves to checkpoint.save={slurm.save}" in result.stderr
    assert slurm.read("srun.args") == "" and slurm.requeues() == []
    result = slurm.run("early", SAVE_DIR=f"{slurm.save}/")            # the same directory, spelled differently
    assert result.returncode == 0, _out(result)
    assert slurm.requeues() == [f"requeue {JOB_ID}"], _out(result)


def _env_file(text: str) -> dict:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def test_environment_reaches_the_ranks(slurm):
    cudnn = slurm.tmp / "cudnn"
    (cudnn / "lib").mkdir(parents=True)
    result = slurm.run("finish", FAKE_CUDNN=str(cudnn), LD_LIBRARY_PATH="/opt/old")
    assert result.returncode == 0, _out(result)
    env = _env_file(slurm.read("train.env"))
    assert env["SRUN_CPUS_PER_TASK"] == "12"                    # srun no longer inherits --cpus-per-task
    assert env["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    assert "TORCH_NCCL_AVOID_RECORD_STREAMS" not in env         # torch >= 2.7 does it by default (and warns)
    assert env["NCCL_NVLS_ENABLE"] == "0"
    assert env["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"
    sizes = [env[name] for name in ("TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_TRACE_BUFFER_SIZE") if name in env]
    assert len(sizes) == 1 and int(sizes[0]) > 0                # one name: the one the installed torch reads
    assert env["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"] == f"{slurm.tmp}/logs/nccl_trace_{JOB_ID}/rank_"
    assert (slurm.tmp / "logs" / f"nccl_trace_{JOB_ID}").is_dir()
    assert env["CUDNN_HOME"] == str(cudnn)                      # the cuDNN fix torchrun.sh had, now here too
    assert env["LD_LIBRARY_PATH"] == f"{cudnn}/lib:/opt/old"
    assert env["MASTER_ADDR"] == "node001"
    assert env["MASTER_PORT"] == str(20000 + int(JOB_ID) % 10000)
    assert 1024 < int(env["MASTER_PORT"]) < 32768              # below the ephemeral range
    assert "--kill-on-bad-exit=1" in slurm.read("srun.args")


def test_user_settings_win(slurm):
    result = slurm.run("finish", NCCL_NVLS_ENABLE="1", TORCH_NCCL_TRACE_BUFFER_SIZE="7", SRUN_CPUS_PER_TASK="3",
                       CUDNN_HOME="/my/cudnn", TORCH_NCCL_DEBUG_INFO_TEMP_FILE="/my/trace_", MASTER_PORT="29999",
                       FAKE_CUDNN=str(slurm.tmp))
    assert result.returncode == 0, _out(result)
    env = _env_file(slurm.read("train.env"))
    assert (env["NCCL_NVLS_ENABLE"], env["TORCH_NCCL_TRACE_BUFFER_SIZE"], env["SRUN_CPUS_PER_TASK"]) == ("1", "7", "3")
    assert (env["CUDNN_HOME"], env["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"], env["MASTER_PORT"]) == (
        "/my/cudnn", "/my/trace_", "29999")


def test_env_sh_sets_defaults_and_keeps_user_values():
    script = 'source launch/env.sh; for v in "$@"; do echo "$v=${!v-UNSET}"; done; env | grep -c "^NCCL_NVLS_ENABLE="'
    names = ["CUDA_DEVICE_MAX_CONNECTIONS", "TORCH_NCCL_AVOID_RECORD_STREAMS", "NCCL_NVLS_ENABLE",
             "TORCH_NCCL_DUMP_ON_TIMEOUT", "TORCH_NCCL_TRACE_BUFFER_SIZE", "TORCH_NCCL_ASYNC_ERROR_HANDLING",
             "OMP_NUM_THREADS", "NCCL_DEBUG"]
    base = {k: v for k, v in os.environ.items() if k not in CLEARED}
    base["PYTHON"] = "false"                                   # no cuDNN wheel: the lookup fails quietly
    out = subprocess.run(["bash", "-uc", script, "bash", *names], env=base, cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.split()
    values = dict(line.split("=", 1) for line in out[:-1])
    assert values == {"CUDA_DEVICE_MAX_CONNECTIONS": "1", "TORCH_NCCL_AVOID_RECORD_STREAMS": "UNSET",
                      "NCCL_NVLS_ENABLE": "0", "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
                      "TORCH_NCCL_TRACE_BUFFER_SIZE": "20000", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
                      "OMP_NUM_THREADS": "1", "NCCL_DEBUG": "WARN"}
    assert out[-1] == "1"                                      # exported, not only set
    user = dict(base, NCCL_NVLS_ENABLE="1", CUDA_DEVICE_MAX_CONNECTIONS="8", NCCL_DEBUG="INFO")
    out = subprocess.run(["bash", "-uc", script, "bash", *names], env=user, cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.split()
    values = dict(line.split("=", 1) for line in out[:-1])
    assert (values["NCCL_NVLS_ENABLE"], values["CUDA_DEVICE_MAX_CONNECTIONS"], values["NCCL_DEBUG"]) == (
        "1", "8", "INFO")


@pytest.mark.parametrize("local_rank, devices, want", [(0, 8, 0), (5, 8, 5), (7, 8, 7), (5, 1, 0), (0, 1, 0),
                                                       (8, 8, None), (3, 2, None)])
def test_each_rank_picks_a_gpu_it_can_see(local_rank, devices, want):
    """srun starts one task per GPU; with all the node's GPUs visible to every task a rank uses GPU LOCAL_RANK,
    with one GPU bound per task (--gpu-bind, --gpus-per-task=1) the only one it sees; more ranks than GPUs on a node
    is an error naming both numbers (two ranks sharing a GPU would run out of memory or deadlock in NCCL)."""
    from bft_megatron.parallel.bootstrap import local_device_index

    if want is None:
        with pytest.raises(RuntimeError, match=f"LOCAL_RANK={local_rank} but this process sees {devices} GPUs"):
            local_device_index(local_rank, devices)
    else:
        assert local_device_index(local_rank, devices) == want
