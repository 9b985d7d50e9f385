"""launch/slurm.sbatch with ``CONTAINER_IMAGE`` (pyxis/enroot): the ranks, the pre-flight check and the
checkpoint.save lookup run in the container through srun's pyxis options; a checkpoint.save outside every mount is
refused before anything starts; env.sh does not probe the host's Python. Fake srun/scontrol/python as in
tests/test_launch_slurm.py (the fake srun records its options and runs the command locally)."""

from __future__ import annotations

import pytest

import subprocess

from tests.test_launch_slurm import JOB_ID, FakeSlurm, _out


class SubmitElsewhere(FakeSlurm):
    """Submitted from ``TMP/submit`` (mounted at its own path), so ``TMP/ckpt`` lies outside the default mount."""

    def run(self, train: str, status: int = 0, **extra: str) -> subprocess.CompletedProcess:
        self.submit.mkdir(exist_ok=True)
        return subprocess.run(self.args(), env=self.env(train, status, **extra), cwd=self.submit,
                              capture_output=True, text=True, timeout=60)

    @property
    def submit(self):
        return self.tmp / "submit"


@pytest.fixture
def slurm(tmp_path):
    return SubmitElsewhere(tmp_path)


def _srun_lines(slurm) -> list[str]:
    return slurm.read("srun.args").splitlines()


def test_container_options_reach_every_python_step(slurm, tmp_path):
    mounts = f"{slurm.save}:{slurm.save},/lustre/data:/data:ro"
    result = slurm.run("finish", CONTAINER_IMAGE="nvcr.io#nvidia/pytorch:25.09-py3", CONTAINER_MOUNTS=mounts)
    assert result.returncode == 0, _out(result)
    lines = _srun_lines(slurm)
    opts = (f"--container-image=nvcr.io#nvidia/pytorch:25.09-py3 --container-name=bft_{JOB_ID} "
            f"--container-mounts={slurm.submit}:{slurm.submit},{mounts} --container-workdir={slurm.submit}")
    # the pre-flight and the checkpoint.save lookup: one task on the first node, in the container
    assert [line for line in lines if line.startswith("--nodes=1 --ntasks=1")] == [
        f"--nodes=1 --ntasks=1 {opts} {slurm.bin / 'python'} -m bft_megatron.train --config {slurm.args()[2]} --check "
        f"checkpoint.save={slurm.save}",
        f"--nodes=1 --ntasks=1 {opts} {slurm.bin / 'python'} -m bft_megatron.config.show {slurm.args()[2]} "
        f"checkpoint.save checkpoint.save={slurm.save}"], _out(result)
    ranks = [line for line in lines if line.startswith("--kill-on-bad-exit")]
    assert len(ranks) == 1 and ranks[0].startswith(f"--kill-on-bad-exit=1 --cpu-bind=none {opts} bash -c"), lines
    assert "check WORLD_SIZE=1" in slurm.read("calls.log")  # WORLD_SIZE reached the check through srun
    assert "container nvcr.io#nvidia/pytorch:25.09-py3" in result.stdout


def test_without_a_container_python_runs_here_and_srun_has_no_pyxis_options(slurm):
    result = slurm.run("finish")
    assert result.returncode == 0, _out(result)
    text = slurm.read("srun.args")  # one srun (its bash -c script spans lines), with no pyxis option
    assert text.count("--kill-on-bad-exit") == 1 and "--nodes=1 --ntasks=1" not in text, text
    assert "--container" not in text, text
    assert "check WORLD_SIZE=1" in slurm.read("calls.log")


@pytest.mark.parametrize("mounts, ok", [(None, False), ("/elsewhere:/elsewhere", False), ("{save}", True),
                                        ("/host/ckpt:{parent}:rw", True), ("{prefix}:{prefix}", False)])
def test_checkpoint_save_outside_every_mount_is_refused_before_the_ranks_start(slurm, mounts, ok):
    extra = {"CONTAINER_IMAGE": "img.sqsh"}
    if mounts is not None:
        # {prefix}: a string prefix of checkpoint.save (.../ck for .../ckpt), not a directory above it
        extra["CONTAINER_MOUNTS"] = mounts.format(save=slurm.save, parent=slurm.save.parent.parent,
                                                  prefix=str(slurm.save)[:-2])
    result = slurm.run("finish", **extra)
    started = "train RANK=0" in slurm.read("calls.log")
    if ok:
        assert result.returncode == 0 and started, _out(result)
        return
    assert result.returncode == 2 and not started, _out(result)
    assert f"checkpoint.save={slurm.save} is not under a container mount" in result.stderr
    assert "add its filesystem to CONTAINER_MOUNTS" in result.stderr
    assert slurm.requeues() == []


def test_env_sh_does_not_probe_the_hosts_python_for_a_container(slurm):
    """The host's cuDNN wheel path must not reach the image's ranks (its LD_LIBRARY_PATH would win there)."""
    (slurm.tmp / "lib").mkdir()
    result = slurm.run("finish", FAKE_CUDNN=str(slurm.tmp))
    assert result.returncode == 0, _out(result)
    assert f"CUDNN_HOME={slurm.tmp}" in slurm.read("train.env")  # the host run: found and exported
    slurm.reset_logs()
    result = slurm.run("finish", FAKE_CUDNN=str(slurm.tmp), CONTAINER_IMAGE="img.sqsh",
                       CONTAINER_MOUNTS=str(slurm.save))
    assert result.returncode == 0, _out(result)
    env = slurm.read("train.env")
    assert "CUDNN_HOME=" not in env and "TORCH_NCCL_TRACE_BUFFER_SIZE=20000" in env, env


def test_markers_are_read_on_the_host_through_a_mount_with_another_path(slurm, tmp_path):
    """checkpoint.save=/ckpt/run inside the container is TMP/ckpt on the host (CONTAINER_MOUNTS=TMP:/ckpt... as the
    fake srun does not remap, the stand-in trainer writes the host path): the script must look for RESUME and
    CRASH_REQUEUES under the mount's source, not at /ckpt/run on the host."""
    env = slurm.env("early", CONTAINER_IMAGE="img.sqsh", CONTAINER_MOUNTS=f"{slurm.save}:/ckpt/run:rw")
    slurm.submit.mkdir(exist_ok=True)
    result = subprocess.run(["bash", slurm.args()[1], slurm.args()[2], "checkpoint.save=/ckpt/run"], env=env,
                            cwd=slurm.submit, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, _out(result)
    assert "stopped early (exit_duration_minutes) after saving" in result.stdout  # RESUME found at TMP/ckpt
    assert slurm.requeues() == [f"requeue {JOB_ID}"], _out(result)
    slurm.reset_logs()
    env.update(FAKE_TRAIN="crash", FAKE_STATUS="1", MAX_CRASH_REQUEUES="1")
    result = subprocess.run(["bash", slurm.args()[1], slurm.args()[2], "checkpoint.save=/ckpt/run/sub"], env=env,
                            cwd=slurm.submit, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and slurm.requeues() == [f"requeue {JOB_ID}"], _out(result)
    assert (slurm.save / "sub" / "CRASH_REQUEUES").read_text().split() == [JOB_ID, "1"]
