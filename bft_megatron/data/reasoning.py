"""Reasoning kept apart from an answer (a ``reasoning`` column, a message's ``reasoning_content``), joined to it.

Records carry it on the answer's :class:`~bft_megatron.data.records.Message` (``reasoning``, ``reasoning_at``);
``records.to_conversation`` writes the chat's last answer with it (:func:`joined`) as ``data.reasoning_format`` says,
by default
``<think>\\n{reasoning}\\n</think>\\n\\n{answer}``, the form reasoning models (DeepSeek-R1 and its distills, QwQ, Qwen3)
emit. An earlier answer's reasoning is not joined: reasoning models' templates drop it from history, so the model
never sees it in a prompt, and ``template: tokenizer`` would not find such an answer in the rendering. It stays on
the message, and ``tokenize.encode`` refuses to train that answer without it (``supervise: all``).
"""

from __future__ import annotations

from typing import Any, Mapping

from bft_megatron.data.errors import DataError, check_unicode

REASONING_KEYS = ("reasoning_content", "reasoning")  # vLLM's / Qwen3's template's name, and OpenAI-style


def reasoning_of(item: Mapping[str, Any], where: str, role: str) -> str:
    """The first non-blank reasoning field of a message ('' when none); on a user or system message one is an
    error, not ignored."""
    for key in REASONING_KEYS:
        value = item.get(key)
        if value is None:
            continue
        if role != "assistant":
            raise DataError("", f"{where}: {key!r} on a {role} message: only an answer's reasoning is trained")
        if not isinstance(value, str):
            raise DataError("", f"{where}: {key!r} must be a string, got {value!r:.60}")
        check_unicode(value, f"{where}: {key!r} is")
        if value.strip():
            return value
    return ""


def joined(answer: str, reasoning: str, reasoning_format: str, where: str) -> str:
    """``answer`` written after its ``reasoning`` as ``reasoning_format`` says. Neither may hold the format's own
    markers (``<think>``, ``</think>``): an answer that continues a think block (``...</think>final``) with its
    reasoning also in a field would be trained with two."""
    for marker in _markers(reasoning_format):
        for text, name in ((answer, "answer"), (reasoning, "reasoning")):
            if marker in text:
                raise DataError("", f"{where}: reasoning given in its own field, and the {name} already holds "
                                    f"{marker!r} (the reasoning would be there twice)")
    return reasoning_format.format(reasoning=reasoning.strip(), answer=answer.lstrip())


def _markers(reasoning_format: str) -> list[str]:
    """The format's literal text around ``{reasoning}`` and ``{answer}``, stripped: ['<think>', '</think>']."""
    text = reasoning_format.format(reasoning="\x00", answer="\x00")
    return [piece.strip() for piece in text.split("\x00") if piece.strip()]
