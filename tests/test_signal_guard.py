"""HandlerGuard on its own: which C-level replacements it undoes, which it leaves, and how it reports them.

The end-to-end runs (a stub ``fit`` whose step replaces the handler) are in tests/test_training_fit.py; this
file pins the guard's rules in a fresh interpreter (it changes process-wide signal actions) and the log dedupe.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = """
import ctypes, json, os, signal, threading, time
from bft_megatron.utils.signal_shield import EXIT_SIGNALS, HandlerGuard, action_handler, native_action, native_handler
libc = ctypes.CDLL(None)
foreign = ctypes.cast(libc.getpid, ctypes.c_void_p)      # a native function that drops the signal, as LLVM's
got, restored, out = [], [], {}
def ours(signum, _frame):
    got.append(signum)
for sig in EXIT_SIGNALS:
    signal.signal(sig, ours)
actions = {sig: native_action(sig) for sig in EXIT_SIGNALS}
mine = {sig: action_handler(a) for sig, a in actions.items()}
def wait_for(sig, address, limit=2.0):
    start = time.monotonic()
    while native_handler(sig) != address and time.monotonic() - start < limit:
        time.sleep(0.005)
    return native_handler(sig) == address
with HandlerGuard(actions, ours, lambda sig, address: restored.append((sig, address)), interval=0.01):
    libc.signal(int(signal.SIGUSR1), foreign)               # taken behind Python's back: put back
    out["foreign_undone"] = wait_for(signal.SIGUSR1, mine[signal.SIGUSR1])
    os.kill(os.getpid(), signal.SIGUSR1)
    time.sleep(0.05)
    out["delivered"] = got == [signal.SIGUSR1]
    libc.signal(int(signal.SIGTERM), ctypes.c_void_p(1))    # SIG_IGN at the C level: reclaim's business
    time.sleep(0.2)
    out["ignored_left"] = native_handler(signal.SIGTERM) == 1
    libc.signal(int(signal.SIGTERM), ctypes.c_void_p(mine[signal.SIGTERM]))
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)           # Python itself moved on: not ours to take back
    libc.signal(int(signal.SIGUSR1), foreign)
    time.sleep(0.2)
    out["python_choice_left"] = native_handler(signal.SIGUSR1) == foreign.value
    out["running"] = any(t.name == "bft-signal-guard" for t in threading.enumerate())
out["stopped"] = not any(t.name == "bft-signal-guard" for t in threading.enumerate())
out["restored"] = [[int(sig), address == foreign.value] for sig, address in restored]
print(json.dumps(out))
"""


def test_guard_undoes_only_foreign_functions_while_python_still_reports_ours():
    """A native function in place of our handler while ``signal.getsignal`` still reports ours (LLVM at Triton's
    first compile, nvrtc) is replaced within the polling interval and the signal then reaches Python; SIG_IGN at
    the C level and a handler that Python itself replaced are left alone; the thread ends with the context."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"foreign_undone": True, "delivered": True, "ignored_left": True, "python_choice_left": True,
                   "running": True, "stopped": True, "restored": [[int(signal.SIGUSR1), True]]}, out


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_each_library_taking_a_signal_is_reported_once_at_info():
    """nvrtc takes SIGTERM at every compile and LLVM SIGUSR1 at every new kernel: the first restore of each
    (signal, library) is INFO, repeats are DEBUG, so a long run's log is not flooded."""
    from bft_megatron.training import fit

    records = _Records()
    logger = fit._log
    level = logger.level
    logger.addHandler(records)
    logger.setLevel(logging.DEBUG)
    try:
        llvm, nvrtc = f"/x/libtriton-{uuid.uuid4().hex}.so", f"/x/libnvrtc-{uuid.uuid4().hex}.so"
        for sig, owner in [(signal.SIGUSR1, llvm), (signal.SIGUSR1, llvm), (signal.SIGTERM, llvm),
                           (signal.SIGTERM, nvrtc), (signal.SIGTERM, nvrtc), (signal.SIGUSR1, llvm)]:
            fit._log_restored(sig, owner)
    finally:
        logger.removeHandler(records)
        logger.setLevel(level)
    seen = [(r.levelno, r.getMessage().split("'")[0], "again" in r.getMessage()) for r in records.records]
    assert seen == [(logging.INFO, "SIGUSR1", False), (logging.DEBUG, "SIGUSR1", True),
                    (logging.INFO, "SIGTERM", False), (logging.INFO, "SIGTERM", False),
                    (logging.DEBUG, "SIGTERM", True), (logging.DEBUG, "SIGUSR1", True)], seen
    assert all(llvm in r.getMessage() or nvrtc in r.getMessage() for r in records.records)
