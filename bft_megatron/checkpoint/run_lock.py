"""One run at a time per ``checkpoint.save``: an advisory lock on ``<save>/.run.lock`` (:mod:`..utils.locks`).

Two jobs saving into one directory (the same sbatch submitted twice, a copy-pasted config) each removed the
other's unfinished ``iter_`` directories, committed checkpoints whose shards the other had replaced, and moved
``latest`` back and forth, silently; a resume could then load the other run's weights. Global rank 0 of a real
run takes the lock before it reads ``latest`` and holds it for the process's life; a second run is refused with a
config error naming the holder. A SLURM requeue keeps its job id: a holder from the same job is this job's previous
run, still exiting (an asynchronous checkpoint writer finishing, a slow rank), and is waited for. ``--check``
probes the lock without keeping it. Where the file system cannot lock, a warning says that a second run would go
unnoticed.
"""

from __future__ import annotations

import os

from bft_megatron.config.base import ConfigError
from bft_megatron.utils.files import file_in_the_way
from bft_megatron.utils.locks import HeldLock, LockUnsupported, holder_text, try_lock, wait_for_lock

__all__ = ["LOCK_NAME", "acquire", "probe", "release"]

LOCK_NAME = ".run.lock"
SAME_JOB_WAIT_S = 600.0  # how long a requeued job waits for its previous run's processes to exit
POLL_S = 5.0
_HELD: dict[str, HeldLock] = {}


def _same_job(holder: dict) -> bool:
    job = os.environ.get("SLURM_JOB_ID")
    return bool(job) and str(holder.get("slurm_job_id")) == job


def _in_use(save_dir: str, holder: dict, waited: float = 0.0) -> str:
    who = holder_text(holder)
    if waited:
        return (f"checkpoint.save={save_dir} is still locked after {waited:.0f} s by this SLURM job's previous run "
                f"({who}): one of its processes has not exited; end it (scancel the job step, or kill the pid), then "
                "restart")
    return (f"checkpoint.save={save_dir} is in use by another run ({who}): two runs saving into one directory "
            "overwrite and prune each other's checkpoints. Wait for that run to end (or stop it), or give this one "
            "another checkpoint.save")


def _unwritable(save_dir: str, exc: OSError) -> str:
    return (f"checkpoint.save={save_dir} cannot be written ({type(exc).__name__}: {exc}): choose a directory this "
            "user can create files in")


def acquire(save_dir: str, log) -> None:
    """Lock ``save_dir`` for this process (a no-op when it already holds it). Raises :class:`ConfigError` naming
    the holder when another run holds it; waits up to :data:`SAME_JOB_WAIT_S` for a holder of the same SLURM job."""
    key = os.path.realpath(save_dir)
    if key in _HELD or file_in_the_way(save_dir):  # a file where the directory goes: the path checks name it
        return
    def on_wait(holder: dict) -> None:
        log.warning("checkpoint.save=%s is locked by this SLURM job's previous run (%s), still exiting: waiting "
                    "(up to %d s)", save_dir, holder_text(holder), SAME_JOB_WAIT_S)

    try:
        os.makedirs(save_dir, exist_ok=True)
        lock, holder = wait_for_lock(os.path.join(save_dir, LOCK_NAME), POLL_S,
                                     lambda holder, waited: _same_job(holder) and waited < SAME_JOB_WAIT_S, on_wait)
    except LockUnsupported as exc:
        log.warning("checkpoint.save=%s: %s; a second run saving into this directory at the same time would not be "
                    "detected", save_dir, exc.strerror)
        return
    except OSError as exc:  # a run that cannot write there would fail at its first save, hours in
        raise ConfigError(_unwritable(save_dir, exc)) from None
    if lock is None:
        raise ConfigError(_in_use(save_dir, holder, SAME_JOB_WAIT_S if _same_job(holder) else 0.0))
    _HELD[key] = lock


def probe(save_dir: str) -> str | None:
    """For ``--check``: why a run could not take the lock now (another run holds it, or the directory cannot be
    written), else None. Takes and drops it; a holder from this SLURM job (which the run waits for), a file system
    that cannot lock or a directory not made yet is no problem."""
    key = os.path.realpath(save_dir)
    if key in _HELD or not os.path.isdir(save_dir):
        return None
    try:
        lock, holder = try_lock(os.path.join(save_dir, LOCK_NAME))
    except LockUnsupported:
        return None
    except OSError as exc:
        return _unwritable(save_dir, exc)
    if lock is not None:
        lock.release()
        return None
    return None if _same_job(holder) else _in_use(save_dir, holder)


def release(save_dir: str | None) -> None:
    """Drop this process's lock on ``save_dir`` (a no-op when it holds none)."""
    lock = _HELD.pop(os.path.realpath(save_dir), None) if save_dir else None
    if lock is not None:
        lock.release()
