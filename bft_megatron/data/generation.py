"""``template: tokenizer_generation``: train each record's last answer as the model writes it at inference.

The chat before the last answer is rendered by the tokenizer's chat template with ``add_generation_prompt=True``,
exactly the prompt the model gets when it is used; the answer follows, then the marker that closes the turn.
Only that answer is supervised (``data.supervise: last``; records end with their last answer).

Why a mode of its own: reasoning models' templates (the DeepSeek-R1 distills, QwQ) strip ``<think>...</think>``
from every assistant turn they render, and their generation prompt opens ``<think>\\n`` itself, so the full chat
(``template: tokenizer``) holds no reasoning to train on. Here, where the template renders the last answer in full
after that same prompt (Llama-3, Qwen2.5, Qwen3's last turn), the template's text of it is supervised; where it
strips or rewrites it, the answer's own text follows the prompt, less what the prompt already opened.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from bft_megatron.data.errors import DataError
from bft_megatron.data.records import Conversation
from bft_megatron.data.templates import STAND_IN, Rendered, common_prefix_len, eot_end, partial_render
from bft_megatron.data.tokenizer import Tokenizer

Chat = list[dict[str, str]]
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Turn:
    """How the template writes an assistant turn that ends the chat, learnt from a stand-in answer."""

    header: str | None  # between the chat before it and the answer (None: not known)
    closing: str  # the end-of-turn marker after the answer ("" where none is known: warned at check_template)
    trailer: str  # what follows the closing when the turn is the chat's last ("\n" in chatml)
    closed_when_last: bool  # False where the closing is written only once another turn follows (Qwen1.5)


def render_generation(conv: Conversation, tok: Tokenizer) -> Rendered:
    msgs = [{"role": m.role, "content": m.content} for m in conv.messages]
    context, answer = msgs[:-1], msgs[-1]["content"]
    if not context:
        raise DataError(conv.origin, "the chat starts with its answer: template tokenizer_generation needs a prompt "
                                     "(a user or system turn) before it")
    try:
        prompt = tok.apply_chat_template(context, add_generation_prompt=True)
        full = tok.apply_chat_template(msgs, add_generation_prompt=False)
    except Exception as exc:  # noqa: BLE001 - a template's raise_exception is a jinja TemplateError
        raise DataError(conv.origin, f"the tokenizer's chat template rejects this chat: {exc}") from exc
    plain = partial_render(tok, context)
    turn = _turn_shape(tok, context, plain)
    kept = _as_rendered(full, prompt, plain, answer, turn)
    if kept is not None:
        return kept
    body = _after_opener(answer, _opener(prompt, plain, turn.header), conv.origin)
    text = prompt + body + turn.closing
    return Rendered(text + turn.trailer, ((len(prompt), len(text)),), len(prompt))


def warn_without_generation_prompt(tok: Tokenizer) -> None:
    """What follows the generation prompt is supervised: a template that writes an assistant header before each
    answer but none for ``add_generation_prompt`` leaves that header in what is trained. (Mistral's writes no
    header at all: its '[/INST]' ends the user turn.)"""
    chat = [{"role": "user", "content": "Hi"}]
    plain = partial_render(tok, chat)
    header = _turn_shape(tok, chat, plain).header
    if header and header.strip() and partial_render(tok, chat, generation=True) == plain:
        log.warning("%s's chat template writes nothing for add_generation_prompt=True, though it opens each answer "
                    "with %r: with template tokenizer_generation that header is supervised as part of the answer",
                    tok.name, header)


def _as_rendered(full: str, prompt: str, plain: str | None, answer: str, turn: _Turn) -> Rendered | None:
    """The full chat's own rendering of the last answer, where it continues the generation prompt and keeps every
    word of the answer (whitespace aside: Qwen3 normalises the lines around its think block; the prompt may already
    hold the answer's start, Qwen3-Thinking's '<think>\\n'); None where the template strips or rewrites it."""
    end = len(full) - len(turn.trailer)
    if not full.startswith(prompt) or not full.endswith(turn.trailer) or end < len(prompt):
        return None
    start = len(plain) if plain is not None and full.startswith(plain) else len(prompt)
    if _squeeze(answer) not in _squeeze(full[start:end]):
        return None
    if turn.closed_when_last:
        return Rendered(full, ((len(prompt), end),), len(prompt))
    return Rendered(full[:end] + turn.closing + full[end:], ((len(prompt), end + len(turn.closing)),), len(prompt))


def _turn_shape(tok: Tokenizer, context: Chat, plain: str | None) -> _Turn:
    answer = [{"role": "assistant", "content": STAND_IN}]
    marked = partial_render(tok, context + answer)
    if marked is None or STAND_IN not in marked:
        return _Turn(None, "", "", True)
    at = marked.rfind(STAND_IN)
    after = at + len(STAND_IN)
    header = marked[len(plain):at] if plain is not None and marked.startswith(plain) else None
    eot = eot_end(marked, after, tok)
    if eot is not None:
        return _Turn(header, marked[after:eot], marked[eot:], True)
    longer = partial_render(tok, context + answer + [{"role": "user", "content": STAND_IN}])
    eot = eot_end(longer, after, tok) if longer is not None and longer.startswith(marked[:after]) else None
    if eot is not None:
        return _Turn(header, longer[after:eot], marked[after:], False)
    # no known marker right after it: keep what the template appends (Mistral's ' </s>'; GLM's nothing)
    tail = marked[after:].rstrip()
    return _Turn(header, tail, marked[after + len(tail):], True)


def _opener(prompt: str, plain: str | None, header: str | None) -> str:
    """What the generation prompt writes past the header of a finished turn: the opening of the answer itself
    ('<think>\\n' for the R1 distills and QwQ); '' for templates whose prompt is the bare header."""
    if plain is None or header is None or not prompt.startswith(plain):
        return ""
    added = prompt[len(plain):]
    return added[common_prefix_len(added, header):]


def _after_opener(answer: str, opener: str, where: str) -> str:
    """The answer less what the generation prompt already wrote of it: the opener, then as much of the answer's
    following whitespace as the prompt wrote after it. An answer that continues the opened block (its reasoning,
    then the closing tag: distilled data that began after '<think>\n') is kept whole; one that neither starts with
    the opener nor closes it would be trained inside an unclosed block: refused."""
    core = opener.strip()
    if not core:
        return answer
    body = answer.lstrip()
    if body.startswith(core):
        body = body[len(core):]
    elif not (core.startswith("<") and "</" + core[1:] in answer):  # continues the opened block: kept whole
        raise DataError(where, f"the chat template's generation prompt opens every answer with {opener!r}, but this "
                               f"answer does not start with {core!r} (it would be trained inside that block): write "
                               "the answer's reasoning first, or choose another template")
    written = opener[len(opener.rstrip()):]
    return body[common_prefix_len(written, body):]


def _squeeze(text: str) -> str:
    return "".join(text.split())
