"""A synthetic chat dataset with easy and hard samples (training without prepared data: tests, smoke runs).

Used when the config names no data (``data.train`` empty and ``data.output_dir`` unset). Each
sample is ``prompt SEP response EOS`` with a random prompt; only the response and EOS are
supervised. In most samples the response is a chain ``y_{k+1} = f(y_k)`` of a fixed map ``f``
started from ``f(last prompt token)`` — learnable in a few dozen steps by a tiny model. A fraction
``noise`` has a random response instead (unlearnable, low confidence), so per-sample confidences
differ and BFT has something to weigh. Rows are generated from ``(seed, index)`` alone (identical on
every rank, no files) in the data layer's :class:`~bft_megatron.data.storage.Row` format, so they go
through the same sampler and collate as prepared data.
Token ids: 0 = PAD, 1 = EOS, 2 = SEP, content uses ``3 .. vocab_size-1``.
"""

from __future__ import annotations

import numpy as np

from bft_megatron.data.storage import Row

__all__ = ["SyntheticChatDataset"]

PAD, EOS, SEP = 0, 1, 2


class SyntheticChatDataset:
    pad_id = PAD

    def __init__(self, num_rows: int, seq_length: int, vocab_size: int, packed: bool, seed: int = 0,
                 min_prompt: int | None = None, max_prompt: int | None = None, noise: float = 0.15) -> None:
        if vocab_size < 8:
            raise ValueError(f"vocab_size must be >= 8 for the synthetic dataset, got {vocab_size}")
        self.num_rows, self.seq_length, self.vocab_size = num_rows, seq_length, vocab_size
        self.packed, self.seed, self.noise = packed, seed, noise
        # No tiny samples: BFT averages per sample, so a 3-token tail sample would weigh ~10x per token.
        self.min_prompt = min_prompt or max(3, seq_length // 16)
        self.max_prompt = max_prompt or max(self.min_prompt, (seq_length - 2) // 2)

    def __len__(self) -> int:
        return self.num_rows

    def max_padded_row_length(self, multiple: int) -> int:
        """An upper bound on a row's length once each sample is padded to a multiple of ``multiple``.

        Samples are at least ``2*min_prompt+2`` tokens, so a row holds at most ``seq_length // that``
        of them, each growing by at most ``multiple - 1``.
        """
        most = self.seq_length // (2 * self.min_prompt + 2) if self.packed else 1
        return self.seq_length + max(most, 1) * (multiple - 1)

    def _chain(self, start: int, n: int) -> np.ndarray:
        out, x, span = np.empty(n, dtype=np.int64), int(start), self.vocab_size - 3
        for k in range(n):
            x = 3 + (7 * x + 11) % span
            out[k] = x
        return out

    def _sample(self, rng: np.random.Generator, room: int):
        """(ids, shifted loss mask) of one sample of at most ``room`` tokens, or None if none fits."""
        longest = min(self.max_prompt, (room - 2) // 2)  # 2n + 2 ids must fit
        if longest < self.min_prompt:
            return None
        n = int(rng.integers(self.min_prompt, longest + 1))
        prompt = rng.integers(3, self.vocab_size, size=n)
        noisy = rng.random() < self.noise
        response = rng.integers(3, self.vocab_size, size=n) if noisy else self._chain(prompt[-1], n)
        ids = np.concatenate((prompt, [SEP], response, [EOS]))
        mask = np.zeros(ids.size, dtype=np.float32)
        mask[n:-1] = 1.0  # position t is supervised iff its label ids[t+1] is a response token or EOS
        return ids, mask

    def __getitem__(self, index: int) -> Row:
        rng = np.random.default_rng([self.seed, int(index)])
        tokens, masks, lens = [], [], []
        room = self.seq_length
        while True:
            sample = self._sample(rng, room)
            if sample is None:
                break
            tokens.append(sample[0])
            masks.append(sample[1])
            lens.append(sample[0].size)
            room -= sample[0].size
            if not self.packed:
                break
        ids = np.arange(len(lens), dtype=np.int64) + int(index) * 1000
        return Row(np.concatenate(tokens), np.concatenate(masks), np.asarray(lens, dtype=np.int64), ids,
                   self.seq_length)
