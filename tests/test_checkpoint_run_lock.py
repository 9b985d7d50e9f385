"""``checkpoint.save``'s run lock (checkpoint/run_lock.py over utils/locks.py): a second run is refused naming the
first, a requeue of the same SLURM job waits for its previous run, a killed holder or a file system that cannot
lock does not block anyone, and forks (megatron's async checkpoint writer) keep it held."""

import errno
import json
import logging
import os
import subprocess
import sys
import time

import pytest

from bft_megatron.checkpoint import run_lock
from bft_megatron.config import ConfigError
from tests.data_fixtures import logged
from tests.lock_holder import Holder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_LOG = logging.getLogger("bft_megatron.test_run_lock")  # seen by tests.data_fixtures.logged

def test_a_second_run_is_refused_naming_the_first(tmp_path):
    holder = Holder(tmp_path / run_lock.LOCK_NAME, tmp_path)
    try:
        with pytest.raises(ConfigError, match=rf"checkpoint.save={tmp_path} is in use by another run \(host .*, "
                                              rf"pid {holder.proc.pid}, since .*\): two runs saving into one"):
            run_lock.acquire(str(tmp_path), _LOG)
        assert f"pid {holder.proc.pid}" in run_lock.probe(str(tmp_path))
    finally:
        holder.kill()
    run_lock.acquire(str(tmp_path), _LOG)  # a killed holder (SIGKILL) leaves nothing in the way
    try:
        record = json.loads((tmp_path / run_lock.LOCK_NAME).read_text())
        assert record["pid"] == os.getpid() and record["host"]
        run_lock.acquire(str(tmp_path), _LOG)  # held by this process already: no-op
        assert run_lock.probe(str(tmp_path)) is None  # --check in the holder's own process
    finally:
        run_lock.release(str(tmp_path))
    assert run_lock.probe(str(tmp_path)) is None  # released: free for the next run


def test_a_forked_child_keeps_the_lock_after_its_parent_exits(tmp_path):
    """megatron's async checkpoint writer is a fork: a restart must not write while it still does."""
    holder = Holder(tmp_path / run_lock.LOCK_NAME, tmp_path, fork=True)
    assert holder.proc.returncode == 0
    assert "is in use by another run" in run_lock.probe(str(tmp_path))
    holder.stop()
    deadline = time.monotonic() + 30
    while run_lock.probe(str(tmp_path)) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert run_lock.probe(str(tmp_path)) is None


def test_a_requeue_of_the_same_slurm_job_waits_for_its_previous_run(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "POLL_S", 0.05)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    holder = Holder(tmp_path / run_lock.LOCK_NAME, tmp_path, env={"SLURM_JOB_ID": "4242"})
    try:
        assert run_lock.probe(str(tmp_path)) is None  # --check: the run will wait, not an error
        monkeypatch.setattr(run_lock, "SAME_JOB_WAIT_S", 0.3)
        with pytest.raises(ConfigError, match=r"is still locked after 0 s by this SLURM job's previous run \(host "
                                              r".*SLURM job 4242.*\): one of its processes has not exited"):
            run_lock.acquire(str(tmp_path), _LOG)
        monkeypatch.setattr(run_lock, "SAME_JOB_WAIT_S", 60.0)
        holder.stop()  # exits within the wait: the requeued run goes on
        with logged(logging.WARNING) as records:
            run_lock.acquire(str(tmp_path), _LOG)
        assert "locked by this SLURM job's previous run" in records[0].getMessage()
    finally:
        holder.kill()
        run_lock.release(str(tmp_path))
    monkeypatch.setenv("SLURM_JOB_ID", "4243")  # another job: refused at once
    holder = Holder(tmp_path / run_lock.LOCK_NAME, tmp_path, env={"SLURM_JOB_ID": "4242"})
    try:
        with pytest.raises(ConfigError, match=r"in use by another run \(.*SLURM job 4242"):
            run_lock.acquire(str(tmp_path), _LOG)
    finally:
        holder.kill()


def test_a_file_system_that_cannot_lock_warns_and_goes_on(tmp_path, monkeypatch):
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    monkeypatch.setattr(fcntl, "flock", no_flock)  # Lustre mounted without -o flock
    with logged(logging.WARNING) as records:
        run_lock.acquire(str(tmp_path), _LOG)
    assert len(records) == 1
    assert "the file system cannot lock (Function not implemented); a second run saving into this directory at " \
           "the same time would not be detected" in records[0].getMessage()
    assert run_lock.probe(str(tmp_path)) is None
    run_lock.release(str(tmp_path))


@pytest.mark.slow
def test_train_and_check_refuse_a_save_directory_another_run_holds(tmp_path):
    """The CLI: exit 2 before anything is read or written, from --check and from a real start."""
    save = tmp_path / "run"
    save.mkdir()
    holder = Holder(save / run_lock.LOCK_NAME, tmp_path)
    try:
        for flag in (["--check"], []):
            res = subprocess.run([sys.executable, "-m", "bft_megatron.train", "--config", "configs/demo_cpu.yaml",
                                  f"checkpoint.save={save}", f"data.output_dir={tmp_path}/data", *flag], cwd=ROOT,
                                 capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))
            assert res.returncode == 2, res.stderr[-3000:]
            assert f"config error: checkpoint.save={save} is in use by another run (host " in res.stderr
            assert f"pid {holder.proc.pid}" in res.stderr
        assert sorted(os.listdir(save)) == [run_lock.LOCK_NAME] and not (tmp_path / "data").exists()
    finally:
        holder.kill()


def test_a_save_directory_that_cannot_be_written_is_a_config_error_at_the_start(tmp_path, monkeypatch):
    """Found when the lock is taken, not at the first save hours later; a file in the directory's place is left
    to the checkpoint path checks (their message names it)."""
    def denied(path):
        raise PermissionError(13, "Permission denied", path)

    from bft_megatron.utils import locks

    monkeypatch.setattr(locks, "try_lock", denied)  # the run's wait for the lock
    monkeypatch.setattr(run_lock, "try_lock", denied)  # --check's probe
    with pytest.raises(ConfigError, match=rf"checkpoint.save={tmp_path}/run cannot be written \(PermissionError: "
                                          r".*Permission denied.*\): choose a directory this user can create files"):
        run_lock.acquire(str(tmp_path / "run"), _LOG)
    assert run_lock.probe(str(tmp_path / "new")) is None  # --check: not made yet, nothing to probe
    assert run_lock.probe(str(tmp_path / "run")).startswith(f"checkpoint.save={tmp_path}/run cannot be written")
    (tmp_path / "file").write_text("")
    run_lock.acquire(str(tmp_path / "file" / "run"), _LOG)  # no error here


def test_another_user_s_lock_file_is_locked_read_only(tmp_path, monkeypatch):
    """In a group-writable checkpoint.save, a second user cannot open the first one's .run.lock for writing (its
    mode is theirs): flock works on a read-only descriptor, so the lock is taken without a holder record."""
    import fcntl

    from bft_megatron.utils import locks

    lock_file = tmp_path / run_lock.LOCK_NAME
    lock_file.write_text('{"pid": 1}\n')
    real_open = os.open

    def not_mine(path, flags, *args):
        if path == str(lock_file) and flags & os.O_RDWR:
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, flags, *args)

    monkeypatch.setattr(locks.os, "open", not_mine)
    lock, holder = locks.try_lock(str(lock_file))
    try:
        assert lock is not None and holder == {}
        assert lock_file.read_text() == '{"pid": 1}\n'  # the record is not rewritten
        probe = real_open(str(lock_file), os.O_RDONLY)
        with pytest.raises(BlockingIOError):
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held
        os.close(probe)
    finally:
        lock.release()
