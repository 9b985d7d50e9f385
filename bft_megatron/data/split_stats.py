"""What preparing a split found (records, samples, tokens, length policy, skips), as printed by ``bft-megatron
prepare`` and recorded in the split's ``index.json`` (``stats``)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from bft_megatron.data.errors import SkipLog

__all__ = ["SplitStats"]


@dataclass
class SplitStats:
    records: int = 0
    parsed: int = 0  # records that were valid JSON (sample ids count these)
    samples: int = 0
    tokens: int = 0
    supervised_tokens: int = 0
    rows: int = 0
    packing_efficiency: float = 0.0
    length: Counter = field(default_factory=Counter)  # ok / truncated / dropped_*
    per_source: list[dict[str, Any]] = field(default_factory=list)
    skips: SkipLog = field(default_factory=SkipLog)
    seconds: float = 0.0
    encoded_tokens: int = 0
    special_text: int = 0  # samples whose messages hold a control-token string (tokenize.special_text_finder)
    special_examples: list[str] = field(default_factory=list)
    reused: bool = False  # prepared before and up to date (prepare_all's reuse): read from its index.json

    @classmethod
    def from_index(cls, index: dict[str, Any]) -> SplitStats:
        """The statistics a split's index.json recorded (:meth:`to_json`), for a split kept as it is."""
        st = index["stats"]
        counts = {k: st[k] for k in ("truncated", "dropped_too_long", "dropped_no_supervision")}
        counts["ok"] = sum(p["samples"] for p in st["per_source"]) - st["truncated"]  # kept whole (per source)
        return cls(records=st["records"], samples=st["samples"], tokens=st["tokens"], rows=st["rows"],
                   supervised_tokens=st["supervised_tokens"], packing_efficiency=st["packing_efficiency"],
                   length=Counter(counts), per_source=st["per_source"], skips=SkipLog(counts=Counter(st["skipped"])),
                   special_text=st.get("special_text", 0), reused=True)

    def to_json(self) -> dict[str, Any]:
        """Reproducible facts only (no timings), for the index."""
        return {"records": self.records, "samples": self.samples, "tokens": self.tokens,
                "supervised_tokens": self.supervised_tokens, "rows": self.rows,
                "packing_efficiency": round(self.packing_efficiency, 6),
                "truncated": self.length["truncated"], "dropped_too_long": self.length["dropped_too_long"],
                "dropped_no_supervision": self.length["dropped_no_supervision"], "special_text": self.special_text,
                "skipped": dict(sorted(self.skips.counts.items())), "per_source": self.per_source}
