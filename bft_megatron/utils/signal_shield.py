"""The trainer's exit signals against the processes and libraries that would take them (stdlib only: a ``spawn``
child imports this module).

The launchers deliver SIGTERM/SIGUSR1 to a rank's whole process group, not only to the rank: torchrun's agent
``killpg``s its workers, and so does SLURM with proctrack/pgid or linuxproc, or with cgroup.conf
``SignalChildrenProcesses=yes``. A child started with ``spawn`` does not inherit the trainer's handlers, so the
signal that asks for the exit save also killed megatron's write-results server (``Checkpointer.save``), and that
save then failed; a ``data.num_workers`` pool worker killed mid-chunk hung the data preparation.

In the rank itself, a native library can replace the handlers at the C level while Python's ``signal.getsignal``
still reports ours: LLVM, inside Triton's compiler (inductor, Transformer Engine's and our Triton kernels),
registers its own SIGTERM/SIGUSR1 handlers the first time it compiles in a process, and its SIGUSR1 handler drops
the signal. ``native_handler`` reads what the kernel will actually call, so ``ExitRequest`` can take them back, and
``HandlerGuard`` does so from a thread while the main thread is still inside the compiling step.
"""

from __future__ import annotations

import functools
import os
import signal
import threading
import time
from typing import Callable

__all__ = ["EXIT_SIGNALS", "ignore_exit_signals", "detach_pool_worker", "start_compile_workers", "native_handler",
           "native_owner", "native_action", "action_handler", "HandlerGuard"]

EXIT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # what bft_megatron.training.fit.ExitRequest handles
_SIGACTION_BYTES = 512  # larger than any libc's struct sigaction


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
    _exit_with_parent_process()


def _exit_with_parent_process(interval: float = 0.5) -> None:
    """SIGKILL this process once the *process* that started it is gone. Not PR_SET_PDEATHSIG: that fires when the
    *thread* that forked it ends, and ``Pool`` forks the replacement of a dead worker from its worker-handler thread,
    which ends in ``Pool.terminate()`` while that worker holds the task queue's read lock: ``terminate()`` then
    waited for the lock forever."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="bft-parent-watch", daemon=True).start()


def start_compile_workers() -> bool:
    """Start inductor's compile workers now, with the exit signals ignored (a no-op without Triton; True if a pool
    was started).

    inductor compiles in a sidecar process (``subprocess.Popen`` in the rank's process group, handling SIGINT only)
    and its worker pool, made at the first ``torch.compile`` (megatron's and TE's fusions: step 1 on GPUs). The
    launcher's ``killpg`` of the exit signal killed them while the rank lived on (seen on an H200, torch 2.11);
    a job given to torch 2.13's dead pool never returns (tests/test_compile_workers_signals.py), which would hang
    the rank at its next compile (one in flight, the first validation's recompile under no_grad, a new shape)
    instead of saving; torch 2.11's inductor compiled a new function in-process after it. Started here, they
    inherit SIG_IGN for both signals (kept across exec) and still end with the rank (the sidecar watches its
    parent)."""
    try:
        from torch._inductor import async_compile
    except ImportError:
        return False
    warm = getattr(async_compile, "maybe_warm_pool", None)
    if warm is None:
        return False
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in EXIT_SIGNALS}
    try:
        warm()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return bool(getattr(async_compile, "_pool_set", ()))


def _die_with_parent() -> None:
    """SIGKILL this process when the one that started it exits (Linux; elsewhere a no-op)."""
    try:
        _libc().prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError, TypeError):
        pass


@functools.lru_cache(maxsize=1)
def _libc():
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def native_action(sig: int) -> bytes | None:
    """The kernel's ``struct sigaction`` for ``sig`` as raw bytes (handler, mask, flags: ``restore_native_action``
    puts them back from any thread), or None where it cannot be read."""
    import ctypes

    try:
        buf = ctypes.create_string_buffer(_SIGACTION_BYTES)
        if _libc().sigaction(int(sig), None, buf) != 0:
            return None
        return buf.raw
    except (OSError, AttributeError, TypeError):
        return None


def restore_native_action(sig: int, action: bytes) -> bool:
    """Install a ``native_action`` again (``signal.signal`` only works in the main thread; this does not)."""
    import ctypes

    try:
        return _libc().sigaction(int(sig), ctypes.create_string_buffer(action, len(action)), None) == 0
    except (OSError, AttributeError, TypeError):
        return False


def native_handler(sig: int) -> int | None:
    """The address of the function the kernel calls for ``sig`` (0: default, 1: ignored), or None where it cannot
    be read. Every libc's ``struct sigaction`` starts with the handler (a union of the two handler types)."""
    action = native_action(sig)
    return None if action is None else action_handler(action)


def action_handler(action: bytes) -> int:
    """The handler address in a ``native_action`` (0: default, 1: ignored)."""
    import ctypes

    return ctypes.c_void_p.from_buffer_copy(action).value or 0


def native_owner(address: int) -> str:
    """The shared object holding ``address`` (e.g. ``.../triton/_C/libtriton.so``), or "" if unknown."""
    import ctypes

    class _DlInfo(ctypes.Structure):
        _fields_ = [("fname", ctypes.c_char_p), ("fbase", ctypes.c_void_p), ("sname", ctypes.c_char_p),
                    ("saddr", ctypes.c_void_p)]

    try:
        info = _DlInfo()
        if address > 1 and _libc().dladdr(ctypes.c_void_p(address), ctypes.byref(info)):
            return (info.fname or b"").decode(errors="replace")
    except (OSError, AttributeError, TypeError):
        pass
    return ""


class HandlerGuard:
    """A daemon thread that puts Python's C-level handler back, every ``interval`` seconds, where a native library
    replaced it with a function of its own while Python's view (``signal.getsignal``) is still ``handler``.

    ``ExitRequest.reclaim`` runs between steps; LLVM takes the handlers *during* a step (Triton's first compile in
    the process, tens of seconds into step 1 on GPUs), so a SIGUSR1 sent in the rest of that step was dropped. The
    thread needs the GIL, so the window left is the part of one kernel's compile that holds it. Only foreign
    functions are replaced: SIG_DFL/SIG_IGN come from ``signal.signal`` itself (whose Python view is updated after
    the C handler, a race) or from code that means it (``start_compile_workers``); ``reclaim`` handles those in the
    main thread. ``restored(sig, address)`` is called (in the thread) after each replacement."""

    def __init__(self, actions: dict[int, bytes], handler: Callable, restored: Callable[[int, int], None],
                 interval: float = 0.05) -> None:
        self._actions, self._handler, self._restored, self._interval = actions, handler, restored, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bft-signal-guard", daemon=True)

    def __enter__(self) -> "HandlerGuard":
        if self._actions:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        ours = {sig: action_handler(action) for sig, action in self._actions.items()}
        while not self._stop.wait(self._interval):
            for sig, action in self._actions.items():
                now = native_handler(sig)
                if now in (None, 0, 1, ours[sig]) or signal.getsignal(sig) != self._handler:
                    continue
                if restore_native_action(sig, action):
                    self._restored(sig, now)
