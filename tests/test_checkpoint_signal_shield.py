"""megatron's write-results queue survives the exit signals sent to the rank's whole process group.

torchrun's agent ``killpg``s its workers with the signal it forwards (SIGTERM, SIGUSR1), and SLURM does the same
with proctrack/pgid, linuxproc or ``SignalChildrenProcesses=yes``. megatron's results queue lives in a ``spawn``
``Manager`` server (made at the first save, reused by every later one) without the trainer's handlers: the signal
that asked for the exit save killed it, and the exit save failed with BrokenPipeError (the end-to-end case is
``test_torchrun_usr1_after_a_periodic_save`` in tests/test_launch_scripts.py).
"""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The rank's side: its handlers (as ExitRequest installs them), the queue as Checkpointer.save starts it, then
# each exit signal to the whole process group, as torchrun's agent sends it; then megatron's writer uses the queue.
SCRIPT = """
import os, signal, time

def main():  # imports here: the spawned server re-imports this file, light as bft_megatron.train is
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa
    from bft_megatron.checkpoint import manager
    from bft_megatron.utils.signal_shield import EXIT_SIGNALS
    for sig in EXIT_SIGNALS:
        signal.signal(sig, lambda *_: None)
    manager._shield_mcore_results_queue()
    get_queue = getattr(fa, "get_write_results_queue", None) or fa._get_write_results_queue  # 0.17+ / 0.16
    queue = get_queue()
    queue.put("first save"); assert queue.get() == "first save"
    for sig in EXIT_SIGNALS:
        os.killpg(0, sig)
    time.sleep(1.0)
    queue.put("exit save"); print("queue:", queue.get())
    manager._shield_mcore_results_queue()           # idempotent: the same queue
    assert get_queue() is queue

if __name__ == "__main__":
    main()
"""


def test_results_queue_survives_exit_signals_to_the_process_group(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120,
                            start_new_session=True)                    # its own process group, as under torchrun
    assert result.returncode == 0, result.stdout + result.stderr
    assert "queue: exit save" in result.stdout
