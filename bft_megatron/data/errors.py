"""Bad input never passes silently: either a ``DataError`` naming where, or a counted skip."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


class DataError(ValueError):
    """A record (or file) that cannot be used; ``where`` is ``file:line N`` or similar."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}")
        self.where = where
        self.message = message

    def __reduce__(self) -> tuple:
        # Pickled into a prepare worker (Pool.imap re-raises the task feeder's error there) and back: the default
        # rebuilds from the one formatted message, which this two-argument __init__ refuses; the worker then dies
        # and prepare waits forever.
        return type(self), (self.where, self.message)


def check_unicode(text: str, where: str) -> None:
    """JSON may escape half of a surrogate pair (an emoji cut in two); no tokenizer encodes such a str, and its
    error would name neither the record nor the field."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise DataError("", f"{where} not valid Unicode (lone surrogate {text[exc.start]!r} at character "
                            f"{exc.start})") from None


@dataclass
class SkipLog:
    """Counts skipped records by reason (``on_error: skip``) and keeps the first few locations."""

    policy: str = "raise"
    counts: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    max_examples: int = 5

    def handle(self, err: DataError, reason: str) -> None:
        """Raise under ``on_error: raise``; otherwise count the skip under ``reason``."""
        if self.policy == "raise":
            raise err
        self.counts[reason] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(str(err))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def merge(self, other: SkipLog) -> None:
        self.counts.update(other.counts)
        room = self.max_examples - len(self.examples)
        self.examples.extend(other.examples[: max(room, 0)])
