"""Conversation -> (token ids, loss mask), plus the length policy.

The stored ``loss_mask`` is already shifted: ``loss_mask[t] = 1`` iff the label at position t (the
token at t+1 of the same sample) is supervised; the last position of every sample is 0 because its
"next token" would belong to the following sample in a packed row.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from bft_megatron.data.errors import DataError
from bft_megatron.data.records import Conversation
from bft_megatron.data.templates import Span, render
from bft_megatron.data.tokenizer import Offsets, Tokenizer

TOKEN_DTYPE = np.int32
MASK_DTYPE = np.uint8


@dataclass(frozen=True)
class Encoded:
    tokens: np.ndarray  # int32 [n]
    loss_mask: np.ndarray  # uint8 [n], shifted (see module docstring)


def supervised_tokens(offsets: Sequence[tuple[int, int]], spans: Sequence[Span]) -> np.ndarray:
    """1 for each token whose character range overlaps a supervised span (spans sorted, disjoint)."""
    if not offsets:
        return np.zeros(0, dtype=bool)
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    if not spans:
        return np.zeros(len(off), dtype=bool)
    sp = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    empty = off[:, 1] == off[:, 0]
    # The last span starting before a token ends is the only one it can overlap. A zero-width token
    # (offsets trimmed by some post-processors) counts where it stands: inside [start, end) of a span.
    j = np.where(empty, np.searchsorted(sp[:, 0], off[:, 0], side="right"),
                 np.searchsorted(sp[:, 0], off[:, 1], side="left")) - 1
    valid = j >= 0
    ends = np.where(valid, sp[np.clip(j, 0, None), 1], -1)
    return valid & (ends > off[:, 0])

def shift_mask(target: np.ndarray) -> np.ndarray:
    """Per-token 'is supervised' -> per-position 'label is supervised' (last position 0)."""
    mask = np.zeros(len(target), dtype=MASK_DTYPE)
    mask[:-1] = target[1:]
    return mask


def _encode_after_prompt(text: str, prompt_end: int | None, tok: Tokenizer) -> tuple[list[int], Offsets]:
    """Token ids and character offsets of ``text``, whose first ``prompt_end`` characters are an inference prompt
    that must keep its own tokens. The whole text is tokenized (an answer tokenized alone would get a
    sentencepiece-style tokenizer's leading '▁'); where a token straddles the prompt's end (Qwen2's pre-tokenizer
    merges a prompt's '>\n' with an answer's '\n'), the prompt's own tokens replace those before it and the
    answer's characters under the straddling tokens are tokenized on their own."""
    ids, offsets = tok.encode_offsets(text)
    if prompt_end is None:
        return ids, offsets
    prompt_ids, prompt_offsets = tok.encode_offsets(text[:prompt_end])
    if ids[:len(prompt_ids)] == prompt_ids:
        return ids, offsets
    after = next((j for j, (start, _) in enumerate(offsets) if start >= prompt_end), len(ids))
    resume = offsets[after][0] if after < len(ids) else len(text)
    gap_ids, gap_offsets = tok.encode_offsets(text[prompt_end:resume]) if resume > prompt_end else ([], [])
    return (prompt_ids + gap_ids + ids[after:],
            prompt_offsets + [(a + prompt_end, b + prompt_end) for a, b in gap_offsets] + offsets[after:])


def encode(conv: Conversation, template: str, tok: Tokenizer, supervise: str = "all") -> Encoded:
    dropped = [m.reasoning_at for m in conv.messages if m.reasoning]  # earlier answers' (data/reasoning.py)
    if dropped and supervise == "all":
        raise DataError(conv.origin, f"{dropped[0]}: an earlier answer's reasoning is dropped (as reasoning models' "
                                     "templates drop it from history), so with data.supervise=all that answer would "
                                     "be trained without it: set data.supervise=last, or write one record per answer")
    rendered = render(conv, template, tok)
    spans = rendered.spans[-1:] if supervise == "last" else rendered.spans
    ids, offsets = _encode_after_prompt(rendered.text, rendered.prompt_end, tok)
    target = supervised_tokens(offsets, spans)
    if not target.any():
        raise DataError(conv.origin, "no supervised tokens after templating")
    return Encoded(np.asarray(ids, dtype=TOKEN_DTYPE), shift_mask(target))


def special_text_finder(tok: Tokenizer, reasoning_format: str = "") -> Callable[[Conversation], str | None]:
    """A function saying where a conversation's text holds one of ``tok``'s control-token strings (as
    ``"'<|eot_id|>' in a user message"``), or None. Such text is encoded as that control token, as the chat
    template (and HF's ``apply_chat_template``) would: inside an answer it trains the model to stop there, inside a
    question it forges a turn. Data exported from another chat format often holds them unnoticed. In an answer the
    markers ``reasoning_format`` writes around reasoning (``<think>``, a control token of some tokenizers) are not
    counted: the records' own text cannot hold them (``reasoning.joined`` refuses it)."""
    texts = sorted(tok.special_texts, key=len, reverse=True)  # the longest first: '<|eot_id|>' before '<|eot'
    literal = reasoning_format.replace("{reasoning}", "\0").replace("{answer}", "\0")
    patterns = {role: re.compile("|".join(map(re.escape, kept))) if kept else None for role, kept in (
        ("user", texts), ("assistant", [t for t in texts if t not in literal]))}

    def find(conv: Conversation) -> str | None:
        for m in conv.messages:
            pattern = patterns["assistant" if m.role == "assistant" else "user"]
            hit = pattern.search(m.content) if pattern else None
            if hit:
                return f"{hit.group(0)!r} in a{'n' if m.role == 'assistant' else ''} {m.role} message"
        return None

    return find


def apply_length_policy(enc: Encoded, seq_length: int, policy: str) -> tuple[Encoded | None, str]:
    """Return (sample or None, status): ok | truncated | dropped_too_long | dropped_no_supervision."""
    n = len(enc.tokens)
    if n <= seq_length:
        return enc, "ok"
    if policy == "drop":
        return None, "dropped_too_long"
    mask = enc.loss_mask[:seq_length].copy()
    mask[-1] = 0  # its label (token seq_length) was cut off
    if not mask.any():
        return None, "dropped_no_supervision"
    return Encoded(enc.tokens[:seq_length].copy(), mask), "truncated"
