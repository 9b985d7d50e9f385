"""Render a conversation to text plus the character spans that are supervised.

Supervised = each assistant turn's content plus the end-of-turn token that closes it. Built-in
templates (llama3, chatml, plain) build the text piece by piece, so the spans are exact. With
``template: tokenizer`` the tokenizer's own Jinja chat template renders the text; real templates
(Llama-3.1, Qwen2.5) carry no generation markers and inject dates, default system prompts or empty
reasoning blocks, so each answer is found where the chat with a stand-in for it departs from the full
rendering (the answer's text must cover that position), and it ends at the end-of-turn marker after it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from bft_megatron.data.errors import DataError
from bft_megatron.data.records import Conversation, Message
from bft_megatron.data.tokenizer import Tokenizer

Span = tuple[int, int]
GENERATION = "tokenizer_generation"  # the last answer after the template's generation prompt (data/generation.py)
TOKENIZER_TEMPLATES = ("tokenizer", GENERATION)
log = logging.getLogger(__name__)

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
    # tokenizer_generation's inference prompt ends here: the sample starts with exactly that prompt's own tokens
    prompt_end: int | None = None


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
            b.add(f"User: {m.content}\n\n")
        else:
            b.add("Assistant: ")  # its own label: two questions in a row, or an answer first, are labelled right
            b.add(m.content + tok.eos_token, supervised=True)
            b.add(sep)
    return b.result()


BUILTINS: dict[str, Callable[[tuple[Message, ...], Tokenizer], Rendered]] = {
    "llama3": _llama3, "chatml": _chatml, "plain": _plain,
}


def check_template(name: str, tok: Tokenizer) -> None:
    """A built-in template whose markers are not single tokens would train on garbage: refuse it (DataError)."""
    if name in TOKENIZER_TEMPLATES:
        if not tok.chat_template:
            raise DataError(f"template={name!r}", f"{tok.name} has no chat_template")
        _warn_without_stop(tok)
        if name == GENERATION:
            from bft_megatron.data.generation import warn_without_generation_prompt  # builds on this module

            warn_without_generation_prompt(tok)
        return
    for marker in REQUIRED_TOKENS[name]:
        ids, _ = tok.encode_offsets(marker)
        if len(ids) != 1:
            raise DataError(f"template={name!r}", f"needs {marker!r} as one token, but {tok.name} splits it into {ids}")
    if name == "plain":  # plain writes bos/eos as text: they must map back to their own ids
        for marker, want in ((tok.eos_token, tok.eos_id), (tok.bos_token, tok.bos_id)):
            if marker and tok.encode_offsets(marker)[0] != [want]:
                raise DataError("template='plain'", f"{tok.name} does not encode {marker!r} as id {want}")


def _warn_without_stop(tok: Tokenizer) -> None:
    """A template that closes an answer with no token of its own (GLM-4.5's turn ends where the next role tag
    begins) trains no stop: say so once, before the whole data set is rendered that way."""
    try:
        probe = _render_tokenizer(Conversation((Message("user", "Hi"), Message("assistant", "Fine")), "probe"), tok)
    except DataError:
        return
    start, end = probe.spans[-1]
    if probe.text[start:end].strip() == "Fine":
        log.warning("%s's chat template writes nothing after an assistant answer that closes it (no %s): answers "
                    "are supervised without an end-of-turn token, so the model is not trained to stop; choose a "
                    "built-in template (data.template) or a tokenizer whose template ends each turn with one",
                    tok.name, " / ".join(dict.fromkeys(_end_markers(tok))))


def _end_markers(tok: Tokenizer) -> tuple[str, ...]:
    """The end-of-turn markers an answer may be closed with: the tokenizer's eos, then the known ones."""
    return tuple(m for m in (tok.eos_token, *EOT_CANDIDATES) if m)


def eot_end(text: str, pos: int, tok: Tokenizer) -> int | None:
    """End of the end-of-turn marker that follows the answer at ``pos``, if one is there."""
    for marker in _end_markers(tok):
        if text.startswith(marker, pos):
            return pos + len(marker)
    return None


def _answer_span(text: str, lo: int, hi: int, content: str, tok: Tokenizer, where: str, anchor: int | None = None,
                 open_tail: bool = True) -> Span:
    """Locate ``content`` in ``text[lo:hi]`` and extend it over the closing end-of-turn marker.

    ``anchor`` is where the chat with a stand-in for this answer departs from ``text``: where the template starts
    writing the answer. The answer is the stripped content's occurrence that covers it, the nearest one (it may
    begin before it: a template that opens the answer with text the answer also starts with, Qwen3-Thinking's
    '<think>\n'); never one that ends before it (the words in a system or user message) or begins after it (in
    text the template writes between the turn's header and the answer: Qwen3's empty think block, gpt-oss's
    channel). Without an anchor (the template refused the stand-in) the first occurrence from ``lo`` is taken.
    The stripped content is searched because Llama's template trims it; where the text around it repeats the
    content's own leading / trailing whitespace (Qwen's keeps content verbatim), that whitespace is part of what
    the model must emit and is included. A known end-of-turn marker right after the answer is included; without
    one, what the template appended up to ``hi`` is kept, unless ``open_tail`` is false (``hi`` is not this turn's
    end)."""
    core = content.strip()
    lead, trail = content[:len(content) - len(content.lstrip())], content[len(content.rstrip()):]
    if anchor is None:
        start = text.find(core, lo, hi)
    else:
        start = text.rfind(core, lo, min(hi, anchor + len(lead) + len(core)))
        if start < 0 or start + len(core) <= anchor:
            # none covers it: a template whose text before the answer depends on the answer (a header that
            # names its kind) departs earlier; what ends before the anchor is also in the stand-in's chat
            start = text.find(core, max(lo, anchor), hi)
    if start < 0:
        raise DataError(where, f"assistant answer {core[:40]!r} not found in the rendered chat template")
    end = start + len(core)
    if lead and start - len(lead) >= (lo if anchor is None else min(anchor, start)) \
            and text.startswith(lead, start - len(lead)):
        start -= len(lead)
    if trail and end + len(trail) <= hi and text.startswith(trail, end):
        end += len(trail)
    eot = eot_end(text, end, tok)  # also past hi: Qwen1.5 closes a turn only once another follows it
    if eot is not None:
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
        upto = partial_render(tok, msgs[: i + 1])
        bounded = upto is not None and full.startswith(upto)  # this turn ends where the full chat's does
        mark = STAND_IN_ALT if m.content.strip().startswith(STAND_IN[0]) else STAND_IN
        marked = partial_render(tok, msgs[:i] + [{"role": "assistant", "content": mark}] + msgs[i + 1:])
        anchor = common_prefix_len(marked, full) if marked is not None else None
        span = _answer_span(full, cursor, len(upto) if bounded else len(full), m.content, tok, conv.origin,
                            anchor=anchor, open_tail=bounded or i == last)
        spans.append(span)
        cursor = span[1]
    return _close_last_answer(full, spans, msgs, tok)


def _close_last_answer(full: str, spans: list[Span], msgs: list[dict[str, str]], tok: Tokenizer) -> Rendered:
    """A template that closes a turn only when another follows (Qwen1.5's writes ``<|im_end|>`` between turns, none
    after the last) would train the chat's last answer without its stop token: where the chat with a user turn
    after it closes that answer with a known end-of-turn marker, the marker is written and supervised."""
    start, end = spans[-1]
    if full[end:].strip() or full[:end].endswith(_end_markers(tok)):
        return Rendered(full, tuple(spans))
    longer = partial_render(tok, msgs + [{"role": "user", "content": STAND_IN}])
    eot = eot_end(longer, end, tok) if longer is not None and longer.startswith(full[:end]) else None
    if eot is None:
        return Rendered(full, tuple(spans))
    return Rendered(full[:end] + longer[end:eot] + full[end:], (*spans[:-1], (start, eot)))


STAND_IN = "\x00\x01"  # an answer's stand-in: no chat text starts with it (one that does gets STAND_IN_ALT)
STAND_IN_ALT = "\x01\x00"


def common_prefix_len(a: str, b: str) -> int:
    """Length of the common prefix, by bisection over C-speed comparisons (os.path.commonprefix compares
    character by character in Python: once per answer over the whole chat, it doubled preparation time)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a.startswith(b[:mid]):
            lo = mid
        else:
            hi = mid - 1
    return lo


def partial_render(tok: Tokenizer, msgs: list[dict[str, str]], generation: bool = False) -> str | None:
    """The chat template over another chat than the record's (its first turns, a stand-in answer, one more turn);
    None where the template rejects that chat (roles must alternate, ...): the caller then does without."""
    try:
        return tok.apply_chat_template(msgs, add_generation_prompt=generation)
    except Exception:  # noqa: BLE001 - jinja TemplateError, ValueError, IndexError on messages[0], ...
        return None


def render(conv: Conversation, template: str, tok: Tokenizer) -> Rendered:
    if template == "tokenizer":
        return _render_tokenizer(conv, tok)
    if template == GENERATION:
        from bft_megatron.data.generation import render_generation  # it builds on this module's helpers

        return render_generation(conv, tok)
    return BUILTINS[template](conv.messages, tok)
