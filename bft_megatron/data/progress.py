"""Progress of a preparation's tokenization: a tqdm bar on a terminal, else an INFO log line every minute.

At scale a preparation takes many minutes (500k long chats: ~20 CPU minutes), and in a batch job's log or in the
trainer's first use (every other rank waiting) a bar is either absent or thousands of carriage-return updates on
one line. The total is the sources' non-blank line count where all of them are ``.jsonl`` (a pass over the lines:
~1 s per GB; records skipped before tokenization never arrive, so the count may end short of it), else unknown
(count and rate only).
"""

from __future__ import annotations

import os
import sys
import time

from tqdm import tqdm

from bft_megatron.config.data import SourceConfig
from bft_megatron.data.json_text import count_nonblank_lines
from bft_megatron.utils.logging import get_logger

__all__ = ["RecordProgress", "count_records", "progress_mode"]

_log = get_logger(__name__)
LOG_EVERY_S = 60.0


def progress_mode(progress: bool | str) -> str:
    """``True``: a bar on a terminal, log lines elsewhere; ``"log"``: log lines; ``False``: nothing."""
    if progress is False:
        return "off"
    if progress == "log":
        return "log"
    return "bar" if sys.stderr.isatty() else "log"


def count_records(sources: list[SourceConfig]) -> int | None:
    """Records in ``sources`` where every file is JSON lines, else None."""
    from bft_megatron.data.readers import data_suffix, list_files

    total = 0
    for src in sources:
        try:  # a hub id, a missing or unreadable source: unknown here, and the reader reports it properly
            files = list_files(src.path) if os.path.exists(src.path) else []
            if not files or any(data_suffix(f) != ".jsonl" for f in files):
                return None
            total += sum(count_nonblank_lines(f) for f in files)
        except (OSError, ValueError):  # DataError (a cut gzip file, an unreadable one) is a ValueError
            return None
    return total


class RecordProgress:
    """``update(1)`` per record tokenized; a context manager."""

    def __init__(self, desc: str, total: int | None, mode: str) -> None:
        self.desc, self.total, self.mode = desc, total, mode
        self.done, self.start = 0, time.monotonic()
        self._next_log = self.start + LOG_EVERY_S
        self._bar = tqdm(desc=desc, total=total, unit=" rec", leave=False, mininterval=1.0) if mode == "bar" else None

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.mode == "log" and time.monotonic() >= self._next_log:
            self._next_log = time.monotonic() + LOG_EVERY_S
            _log.info("%s", self.line())

    def line(self) -> str:
        """``tokenize train: 120000 of ~500000 records (24%), 1999 rec/s, about 3 min left``."""
        seconds = max(time.monotonic() - self.start, 1e-9)
        rate = self.done / seconds
        if not self.total:
            return f"{self.desc}: {self.done} records, {rate:.0f} rec/s"
        left = max(self.total - self.done, 0) / rate if rate > 0 else float("inf")
        eta = f"{left / 60:.0f} min" if left >= 60 else f"{left:.0f} s"
        return (f"{self.desc}: {self.done} of ~{self.total} records ({min(self.done / self.total, 1):.0%}), "
                f"{rate:.0f} rec/s, about {eta} left")

    def __enter__(self) -> RecordProgress:
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()
