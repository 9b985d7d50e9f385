"""Helper processes that outlive the trainer's exit signals (stdlib only: a ``spawn`` child imports this module).

The launchers deliver SIGTERM/SIGUSR1 to a rank's whole process group, not only to the rank: torchrun's agent
``killpg``s its workers, and so does SLURM with proctrack/pgid or linuxproc, or with cgroup.conf
``SignalChildrenProcesses=yes``. A child started with ``spawn`` does not inherit the trainer's handlers, so the
signal that asks for the exit save also killed megatron's write-results server (``Checkpointer.save``), and that
save then failed; a ``data.num_workers`` pool worker killed mid-chunk hung the data preparation.
"""

from __future__ import annotations

import os
import signal

__all__ = ["EXIT_SIGNALS", "ignore_exit_signals", "detach_pool_worker"]

EXIT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # what bft_megatron.training.fit.ExitRequest handles


def ignore_exit_signals() -> None:
    """In a helper process: ignore the exit signals, and die (SIGKILL) with the process that started it, so
    that ignoring SIGTERM never leaves it behind a rank that was killed."""
    for sig in EXIT_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    _die_with_parent()


def detach_pool_worker() -> None:
    """In a ``multiprocessing.Pool`` worker (``data.num_workers`` > 1): a session of its own, so torchrun's
    ``killpg`` of the rank's group misses it, and SIGUSR1 ignored (SLURM's ``SignalChildrenProcesses``). SIGTERM
    keeps its default action because ``Pool.terminate()`` stops workers with it (ignored, the pool's join hangs).
    A worker killed mid-chunk loses that chunk and ``Pool.imap`` then waits forever: the rank hung in first-use
    data preparation until the launcher's SIGKILL."""
    try:
        os.setsid()
    except OSError:  # already a session leader
        pass
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    _die_with_parent()


def _die_with_parent() -> None:
    """SIGKILL this process when the one that started it exits (Linux; elsewhere a no-op)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError, TypeError):
        pass
