"""Another process holding a lock file (tests of utils/locks.py's users): a running job, seen from outside."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Locks LOCK_FILE (shared if SHARED), says so on stdout, forks a child if FORK (the parent then exits at once, as a
# job whose async writer outlives it), and holds the lock until RELEASE exists.
_HOLDER = textwrap.dedent("""
    import os, sys, time
    from bft_megatron.utils.locks import try_lock
    lock_file, release, fork, shared = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4] == "1"
    lock, _ = try_lock(lock_file, shared=shared)
    assert lock is not None
    if fork and os.fork() != 0:
        print("locked", flush=True)
        os._exit(0)
    if not fork:
        print("locked", flush=True)
    deadline = time.monotonic() + 300  # a failed test's holder does not linger
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.05)
""")


class Holder:
    """A process holding ``lock_file`` until :meth:`stop` or :meth:`kill`; ``fork``: held by its forked child
    after the parent has exited; ``shared``: a shared lock (a checkpoint's reader)."""

    def __init__(self, lock_file, tmp_path, env=None, fork=False, shared=False):
        self.release = tmp_path / f"release-{time.monotonic_ns()}"
        args = [str(lock_file), str(self.release), "1" if fork else "0", "1" if shared else "0"]
        self.proc = subprocess.Popen([sys.executable, "-c", _HOLDER, *args], cwd=ROOT, stdout=subprocess.PIPE,
                                     text=True, env=dict(os.environ, PYTHONPATH=ROOT, **(env or {})))
        assert self.proc.stdout.readline().strip() == "locked"
        if fork:
            self.proc.wait()  # the forking parent exits once its child holds the lock

    def stop(self):
        self.release.write_text("")

    def kill(self):
        self.proc.kill()
        self.proc.wait()
