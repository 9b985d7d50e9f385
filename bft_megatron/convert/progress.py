"""Byte-counting progress bars for the offline converters (``convert import|export``).

A 70B model is ~140 GB of tensors and a conversion takes many minutes, so the bars count bytes (tqdm's
``unit_scale``: kB/MB/GB, a rate and an ETA) rather than tensors, whose sizes differ by orders of magnitude.
They go to stderr (tqdm's default), like ``bft-megatron prepare``'s bar, and as there ``--no-progress`` hides
them. Only the single offline process draws bars; the in-job export (many ranks) logs instead.
A bar only reports: nothing it does changes a file the converters write.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

from tqdm import tqdm

__all__ = ["byte_bar", "watch_dir_bytes"]

# A bar over minutes-long work needs no faster refresh; a slower one also keeps a redirected stderr (a batch
# job's log, where tqdm writes every refresh) small.
_REFRESH_S = 1.0


def byte_bar(desc: str, total: int, enabled: bool) -> tqdm:
    """A bar over ``total`` bytes on stderr; with ``enabled`` False a silent no-op bar (``update`` does nothing)."""
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=not enabled, mininterval=_REFRESH_S,
                dynamic_ncols=True)


def _dir_bytes(directory: str) -> int:
    """Bytes in the files directly under ``directory`` (0 if it is not there yet)."""
    total = 0
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                with contextlib.suppress(OSError):  # a file renamed or removed while we look
                    if entry.is_file(follow_symlinks=False):
                        total += entry.stat(follow_symlinks=False).st_size
    except FileNotFoundError:
        pass
    return total


@contextlib.contextmanager
def watch_dir_bytes(bar: tqdm, directory: str, interval: float = _REFRESH_S) -> Iterator[None]:
    """Advance ``bar`` to the size of the files in ``directory`` while the body writes them; complete it at a
    clean exit.

    The file system is polled from a thread because the writer is out of reach of a callback: megatron's
    ``dist_checkpointing.save`` may write through forked worker processes. File sizes include a little framing per
    tensor, so the count is capped at ``bar.total``. With the bar disabled no thread is started.
    """
    if bar.disable:
        yield
        return
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(interval):
            done = min(_dir_bytes(directory), bar.total)
            if done > bar.n:
                bar.update(done - bar.n)

    thread = threading.Thread(target=poll, name="convert-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
    bar.update(bar.total - bar.n)  # the writer returned: every byte is on disk
