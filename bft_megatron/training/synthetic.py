"""A synthetic chat dataset with easy and hard samples (used when ``data.train_path`` is unset).

Each sample is ``prompt SEP response EOS`` with a random prompt; only the response (and EOS) is
supervised. In most samples the response is a chain ``y_{k+1} = f(y_k)`` of a fixed permutation-like
map ``f`` started from ``f(last prompt token)`` — learnable in a few dozen steps by a tiny model, so
the loss falls quickly on a CPU. A fraction ``noise`` of the samples has a random response instead
(unlearnable, low confidence), so per-sample confidences differ and BFT has something to weigh.
Rows are generated from ``(seed, index)`` alone: identical on every rank, no files.
Token ids: 0 = PAD, 1 = EOS, 2 = SEP, content uses ``3 .. vocab_size-1``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["SyntheticChatDataset"]

PAD, EOS, SEP = 0, 1, 2


class SyntheticChatDataset:
    def __init__(self, num_rows: int, seq_length: int, vocab_size: int, packed: bool, seed: int = 0,
                 min_prompt: int | None = None, max_prompt: int | None = None, noise: float = 0.15) -> None:
        if vocab_size < 8:
            raise ValueError(f"vocab_size must be >= 8 for the synthetic dataset, got {vocab_size}")
        self.num_rows, self.seq_length, self.vocab_size = num_rows, seq_length, vocab_size
        self.packed, self.seed = packed, seed
        # No tiny samples: BFT averages per sample, so a 3-token tail sample would weigh ~10x per token.
        self.min_prompt = min_prompt or max(3, seq_length // 16)
        self.max_prompt = max_prompt or max(self.min_prompt, (seq_length - 3) // 2)
        self.noise = noise

    def _chain(self, start: int, n: int) -> np.ndarray:
        out, x, span = np.empty(n, dtype=np.int64), int(start), self.vocab_size - 3
        for k in range(n):
            x = 3 + (7 * x + 11) % span
            out[k] = x
        return out

    def __len__(self) -> int:
        return self.num_rows

    def _sample(self, rng: np.random.Generator, room: int):
        """One sample's (tokens, labels, mask) of length <= room, or None if it cannot fit."""
        longest = min(self.max_prompt, (room - 1) // 2)  # 2n + 1 positions must fit
        if longest < self.min_prompt:
            return None
        n = int(rng.integers(self.min_prompt, longest + 1))
        prompt = rng.integers(3, self.vocab_size, size=n)
        noisy = rng.random() < self.noise
        response = rng.integers(3, self.vocab_size, size=n) if noisy else self._chain(prompt[-1], n)
        ids = np.concatenate((prompt, [SEP], response, [EOS]))  # 2n + 2 ids -> 2n + 1 positions
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
