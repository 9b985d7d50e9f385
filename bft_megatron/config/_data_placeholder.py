"""Minimal stand-in for ``bft_megatron.config.data.DataConfig`` until branch ``data`` lands.

Only what the trainer needs: a sequence length, where prepared data lives (or a synthetic set), and
the row layout. Deleted when the data engineer's module is merged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class DataConfig:
    seq_length: int = 2048
    train_path: str | None = None  # prepared data directory; None = synthetic
    valid_path: str | None = None
    layout: Literal["padded", "packed"] = "packed"
    synthetic_samples: int = 4096
    seed: int = 1234
