"""Helper processes that outlive the trainer's exit signals (stdlib only: a ``spawn`` child imports this module).

The launchers deliver SIGTERM/SIGUSR1 to a rank's whole process group, not only to the rank: torchrun's agent
``killpg``s its workers, and so does SLURM with proctrack/pgid or linuxproc, or with cgroup.conf
``SignalChildrenProcesses=yes``. A child started with ``spawn`` does not inherit the trainer's handlers, so the
signal that asks for the exit save also killed megatron's write-results server (``Checkpointer.save``), and that
save then failed.
"""

from __future__ import annotations

import signal

__all__ = ["EXIT_SIGNALS", "ignore_exit_signals"]

EXIT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # what bft_megatron.training.fit.ExitRequest handles


def ignore_exit_signals() -> None:
    """In a helper process: ignore the exit signals, and die (SIGKILL) with the process that started it, so
    that ignoring SIGTERM never leaves it behind a rank that was killed."""
    for sig in EXIT_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG (Linux only)
    except (OSError, AttributeError, TypeError):
        pass
