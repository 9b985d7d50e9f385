"""A synthetic, learnable chat dataset (used when ``data.train_path`` is unset: demos and tests).

Each sample is ``prompt SEP reverse(prompt) EOS``; only the response (reversed prompt + EOS) is
supervised, so the loss falls quickly and per-sample confidences differ (BFT has something to
weigh). Rows are generated from ``(seed, index)`` alone: identical on every rank, no files.
Token ids: 0 = PAD, 1 = EOS, 2 = SEP, prompts use ``3 .. vocab_size-1``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["SyntheticChatDataset"]

PAD, EOS, SEP = 0, 1, 2


class SyntheticChatDataset:
    def __init__(self, num_rows: int, seq_length: int, vocab_size: int, packed: bool, seed: int = 0,
                 min_prompt: int = 3, max_prompt: int | None = None) -> None:
        if vocab_size < 8:
            raise ValueError(f"vocab_size must be >= 8 for the synthetic dataset, got {vocab_size}")
        self.num_rows, self.seq_length, self.vocab_size = num_rows, seq_length, vocab_size
        self.packed, self.seed = packed, seed
        self.min_prompt = min_prompt
        self.max_prompt = max_prompt or max(min_prompt, (seq_length - 3) // 2)

    def __len__(self) -> int:
        return self.num_rows

    def _sample(self, rng: np.random.Generator, room: int):
        """One sample's (tokens, labels, mask) of length <= room, or None if it cannot fit."""
        longest = min(self.max_prompt, (room - 1) // 2)  # 2n + 1 positions must fit
        if longest < self.min_prompt:
            return None
        n = int(rng.integers(self.min_prompt, longest + 1))
        prompt = rng.integers(3, self.vocab_size, size=n)
        ids = np.concatenate((prompt, [SEP], prompt[::-1], [EOS]))  # 2n + 2 ids -> 2n + 1 positions
        mask = np.zeros(ids.size - 1, dtype=np.float32)
        mask[n:] = 1.0  # labels from the first response token (after SEP) to EOS
        return ids[:-1], ids[1:], mask

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        s = self.seq_length
        rng = np.random.default_rng([self.seed, int(index)])
        out = {k: np.zeros(s, dtype=np.int64) for k in ("tokens", "labels", "position_ids", "segment_ids")}
        out["loss_mask"] = np.zeros(s, dtype=np.float32)
        pos, seg = 0, 0
        while pos < s:
            sample = self._sample(rng, s - pos)
            if sample is None:
                break
            toks, labels, mask = sample
            end = pos + toks.size
            out["tokens"][pos:end], out["labels"][pos:end], out["loss_mask"][pos:end] = toks, labels, mask
            out["position_ids"][pos:end] = np.arange(toks.size)
            out["segment_ids"][pos:end] = seg
            pos, seg = end, seg + 1
            if not self.packed:
                break
        out["segment_ids"][pos:] = seg  # trailing padding: its own (unsupervised) segment
        out["position_ids"][pos:] = np.arange(s - pos)
        return out
