"""Render a conversation to text plus the character spans that are supervised.

Supervised = each assistant turn's content plus the end-of-turn token that closes it. Built-in
templates (llama3, chatml, plain) build the text piece by piece, so the spans are exact. With
``template: tokenizer`` the tokenizer's own Jinja chat template renders the text; real templates
(Llama-3.1, Qwen2.5) carry no generation markers and inject dates or default system prompts, so the
spans are found from prefix differences (render the chat up to the turn's prompt and up to the turn's
end; the answer is what was added), falling back to a left-to-right search of the answer text when a
template rewrites earlier turns.
"""

from __future__ import annotations

import os

from dataclasses import dataclass
from typing import Callable

from bft_megatron.data.errors import DataError
from bft_megatron.data.records import Conversation, Message
from bft_megatron.data.tokenizer import Tokenizer

Span = tuple[int, int]

# Markers a chat template may close an assistant turn with, most specific first.
EOT_CANDIDATES = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")

REQUIRED_TOKENS = {
    "llama3": ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "plain": (),
}


@dataclass(frozen=True)
class Rendered:
    text: str
    spans: tuple[Span, ...]  # one per assistant turn, in order


class _Builder:
    """Accumulates text and records the span of each supervised piece."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.pos = 0
        self.spans: list[Span] = []

    def add(self, text: str, supervised: bool = False) -> None:
        if supervised:
            self.spans.append((self.pos, self.pos + len(text)))
        self.parts.append(text)
        self.pos += len(text)

    def result(self) -> Rendered:
        return Rendered("".join(self.parts), tuple(self.spans))


def _llama3(messages: tuple[Message, ...], tok: Tokenizer) -> Rendered:
    b = _Builder()
    b.add("<|begin_of_text|>")
    for m in messages:
        # Meta's template trims message content; we do the same so our text matches theirs.
        b.add(f"<|start_header_id|>{m.role}<|end_header_id|>\n\n")
        b.add(m.content.strip() + "<|eot_id|>", supervised=m.role == "assistant")
    return b.result()


def _chatml(messages: tuple[Message, ...], tok: Tokenizer) -> Rendered:
    b = _Builder()
    for m in messages:
        b.add(f"<|im_start|>{m.role}\n")
        b.add(m.content + "<|im_end|>", supervised=m.role == "assistant")
        b.add("\n")
    return b.result()


def _plain(messages: tuple[Message, ...], tok: Tokenizer) -> Rendered:
    """``System\\n\\nUser: ...\\n\\nAssistant: ...</s>`` with the tokenizer's own bos/eos."""
    b = _Builder()
    if tok.bos_token:
        b.add(tok.bos_token)
    for i, m in enumerate(messages):
        sep = "\n\n" if i + 1 < len(messages) else ""
        if m.role == "system":
            b.add(m.content + "\n\n")
        elif m.role == "user":
            b.add(f"User: {m.content}\n\nAssistant: ")
        else:
            b.add(m.content + tok.eos_token, supervised=True)
            b.add(sep)
    return b.result()


BUILTINS: dict[str, Callable[[tuple[Message, ...], Tokenizer], Rendered]] = {
    "llama3": _llama3, "chatml": _chatml, "plain": _plain,
}


def check_template(name: str, tok: Tokenizer) -> None:
    """A built-in template whose markers are not single tokens would train on garbage: refuse it (DataError)."""
    if name == "tokenizer":
        if not tok.chat_template:
            raise DataError("template='tokenizer'", f"{tok.name} has no chat_template")
        return
    for marker in REQUIRED_TOKENS[name]:
        ids, _ = tok.encode_offsets(marker)
        if len(ids) != 1:
            raise DataError(f"template={name!r}", f"needs {marker!r} as one token, but {tok.name} splits it into {ids}")
    if name == "plain":  # plain writes bos/eos as text: they must map back to their own ids
        for marker, want in ((tok.eos_token, tok.eos_id), (tok.bos_token, tok.bos_id)):
            if marker and tok.encode_offsets(marker)[0] != [want]:
                raise DataError("template='plain'", f"{tok.name} does not encode {marker!r} as id {want}")


def _eot_end(text: str, pos: int, tok: Tokenizer) -> int | None:
    """End of the end-of-turn marker that follows the answer at ``pos``, if one is there."""
    for marker in (tok.eos_token, *EOT_CANDIDATES):
        if marker and text.startswith(marker, pos):
            return pos + len(marker)
    return None


def _answer_span(text: str, lo: int, hi: int, content: str, tok: Tokenizer, where: str,
                 open_tail: bool = True) -> Span:
    """Locate ``content`` in ``text[lo:hi]`` and extend it over the closing end-of-turn marker.

    The first occurrence of the stripped content is the answer (Llama's template trims it); where the text around
    it repeats the content's own leading / trailing whitespace (Qwen's keeps content verbatim), that whitespace is
    part of what the model must emit and is included. Searching the verbatim content instead could match a later
    text (another turn) when the template trims. Without a known end-of-turn marker after the answer, what the
    template appended up to ``hi`` is kept, unless ``open_tail`` is false (``hi`` is not this turn's end)."""
    core = content.strip()
    start = text.find(core, lo, hi)
    if start < 0:
        raise DataError(where, f"assistant answer {core[:40]!r} not found in the rendered chat template")
    end = start + len(core)
    lead, trail = content[:len(content) - len(content.lstrip())], content[len(content.rstrip()):]
    if lead and start - len(lead) >= lo and text.startswith(lead, start - len(lead)):
        start -= len(lead)
    if trail and end + len(trail) <= hi and text.startswith(trail, end):
        end += len(trail)
    eot = _eot_end(text, end, tok)
    if eot is not None and eot <= hi:
        return start, eot
    tail = text[end:hi].rstrip()
    if tail and not open_tail:
        raise DataError(where, f"cannot tell where assistant answer {core[:40]!r} ends: no known end-of-turn marker "
                               "follows it, and the chat template renders this turn differently in a longer chat")
    return start, end + len(tail)  # no known marker: keep what the template appended, minus whitespace


def _render_tokenizer(conv: Conversation, tok: Tokenizer) -> Rendered:
    msgs = [{"role": m.role, "content": m.content} for m in conv.messages]
    try:
        full = tok.apply_chat_template(msgs, add_generation_prompt=False)
    except Exception as exc:  # noqa: BLE001 - a template's raise_exception (e.g. roles must alternate) is a jinja
        # TemplateError: as a DataError it names the record and on_error: skip counts it as a template_error
        raise DataError(conv.origin, f"the tokenizer's chat template rejects this chat: {exc}") from exc
    spans: list[Span] = []
    cursor = 0
    last = max(i for i, m in enumerate(conv.messages) if m.role == "assistant")
    for i, m in enumerate(conv.messages):
        if m.role != "assistant":
            continue
        prompt = _partial_render(tok, msgs[:i], True) if i else None  # transformers refuses an empty chat
        upto = _partial_render(tok, msgs[: i + 1], False)
        bounded = upto is not None and full.startswith(upto)  # this turn ends where the full chat's does
        if bounded and prompt is not None and upto.startswith(prompt) and len(prompt) >= cursor:
            lo = len(prompt)
        else:
            # An assistant-first chat, a generation prompt that opens text the full chat lacks (QwQ's and
            # R1-Distill's '<think>\n'), or a template that rewrites earlier turns: the answer starts where the
            # full chat and the same chat with a marker for this answer part. Searching from the chat's start
            # instead took the answer's words in a system or user message (closed by its own end-of-turn marker,
            # or not: then the span ran to the chat's end) for the answer.
            marked = _partial_render(tok, msgs[:i] + [{"role": "assistant", "content": _MARK}] + msgs[i + 1:], False)
            lo = max(cursor, len(os.path.commonprefix([marked, full])) if marked is not None else 0)
        span = _answer_span(full, lo, len(upto) if bounded else len(full), m.content, tok, conv.origin,
                            open_tail=bounded or i == last)
        spans.append(span)
        cursor = span[1]
    return Rendered(full, tuple(spans))


_MARK = "\x00\x01"  # an answer's stand-in: no chat text starts with it


def _partial_render(tok: Tokenizer, msgs: list[dict[str, str]], generation_prompt: bool) -> str | None:
    """The chat template over (some of) a chat; None where the template rejects it (roles must alternate, a chat
    must start with a user, transformers' refusal of an empty chat, ...): the caller then searches instead."""
    try:
        return tok.apply_chat_template(msgs, add_generation_prompt=generation_prompt)
    except Exception:  # noqa: BLE001 - jinja TemplateError, ValueError, IndexError on messages[0], ...
        return None


def render(conv: Conversation, template: str, tok: Tokenizer) -> Rendered:
    if template == "tokenizer":
        return _render_tokenizer(conv, tok)
    return BUILTINS[template](conv.messages, tok)
