"""Turn one raw record (any supported shape) into a validated list of chat messages.

Shapes: ``messages`` (system/user/assistant, multi-turn), ShareGPT ``conversations`` (``from``: system/human/gpt,
``value``), alpaca (``instruction``/``input``/``output``) and ``prompt``/``response``; each with an optional
top-level ``system``. Reasoning kept apart from the answer (a ``reasoning`` field next to ``output``/``response``,
``reasoning_content`` or ``reasoning`` in an assistant message) is joined to the chat's last answer as
``data.reasoning_format`` says (:mod:`bft_megatron.data.reasoning`). A source's ``columns`` maps these field names
onto its own (``{prompt: Question, reasoning: Complex_CoT, response: Response}``). Readers built on
Arrow fill absent keys with None, so "missing" and "null" are reported alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from bft_megatron.config.data import FIELDS_READ, REASONING_FORMAT
from bft_megatron.data.errors import DataError, check_unicode
from bft_megatron.data.reasoning import joined, reasoning_of

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    # an answer's reasoning kept apart from it, and the field it came from ("messages[1]"); the chat's last answer
    # has it joined by to_conversation (data/reasoning.py), an earlier one keeps it here, not trained
    reasoning: str = field(default="", compare=False)
    reasoning_at: str = field(default="", compare=False)


@dataclass(frozen=True)
class Conversation:
    """A validated chat; ``origin`` says where it came from (``file:line N``) for later errors."""

    messages: tuple[Message, ...]
    origin: str


def detect_format(record: Mapping[str, Any]) -> str:
    """Pick the record shape from the keys that carry a value."""
    present = {k for k, v in record.items() if v is not None}
    if "messages" in present:
        return "messages"
    if "conversations" in present:
        return "sharegpt"
    if {"instruction", "output"} & present:
        return "alpaca"
    if {"prompt", "response"} & present:
        return "prompt_response"
    raise DataError("", f"unrecognised record shape (keys {sorted(present)}); expected 'messages', ShareGPT "
                        "'conversations', alpaca 'instruction'/'input'/'output' or 'prompt'/'response'")


def _text(record: Mapping[str, Any], key: str, *, required: bool) -> str:
    value = record.get(key)
    if value is None:
        if required:
            raise DataError("", f"missing field {key!r}")
        return ""
    if not isinstance(value, str):
        raise DataError("", f"field {key!r} must be a string, got {type(value).__name__} {value!r:.60}")
    check_unicode(value, f"field {key!r}:")
    return value


def _system(record: Mapping[str, Any]) -> list[Message]:
    system = _text(record, "system", required=False)
    return [Message("system", system)] if system.strip() else []


def _turns(record: Mapping[str, Any], field: str, role_key: str, text_key: str,
           roles: Mapping[str, str]) -> list[Message]:
    """Validated turns of the list ``record[field]``: ``item[role_key]`` (mapped through ``roles``) and
    ``item[text_key]``; errors name ``field[i]`` and the record's own key names."""
    raw = record.get(field)
    if not isinstance(raw, (list, tuple)):
        raise DataError("", f"field {field!r} must be a list, got {type(raw).__name__}")
    out: list[Message] = []
    for i, item in enumerate(raw):
        where = f"{field}[{i}]"
        if not isinstance(item, Mapping):
            raise DataError("", f"{where} must be an object, got {item!r:.60}")
        role = item.get(role_key)
        if role is None:
            raise DataError("", f"{where}: missing field {role_key!r}")
        if not isinstance(role, str) or role not in roles:  # a list or object would fail the lookup as unhashable
            raise DataError("", f"{where}: unknown role {role!r} (expected one of {tuple(roles)})")
        calls = [key for key in ("tool_calls", "function_call") if item.get(key)]
        if calls:  # no template here renders them: the call would vanish from what the answer trains
            raise DataError("", f"{where}: {calls[0]!r} is not supported (tool use: the call would be dropped from "
                                "the trained answer); leave such records out")
        content = item.get(text_key)
        if content is None:
            raise DataError("", f"{where}: missing field {text_key!r}")
        if not isinstance(content, str):
            raise DataError("", f"{where}: {text_key!r} must be a string, got {content!r:.60}")
        check_unicode(content, f"{where}: {text_key!r} is")
        if roles[role] == "system" and i != 0:
            raise DataError("", f"{where}: a system message is only allowed first")
        _check_nonempty(roles[role], content, where)
        reasoning = reasoning_of(item, where, roles[role])
        out.append(Message(roles[role], content, reasoning, where if reasoning else ""))
    return out


def rename_columns(record: Mapping[str, Any], columns: Mapping[str, str]) -> Mapping[str, Any]:
    """``record`` with each field read from the column ``columns`` names for it (a source's ``columns``). A column
    this record lacks leaves its field absent (an optional one, e.g. reasoning in some records only; a required one
    is then reported by its field and column, :func:`_name_columns`); a record with none of them is an error. A
    column no record of a source has is the pipeline's error (``data/pipeline.py``)."""
    if not columns or not isinstance(record, Mapping):
        return record
    if not any(column in record for column in columns.values()):
        missing = [f"{column!r} (columns.{name})" for name, column in columns.items()]
        raise DataError("", f"no column {', '.join(missing)}; the record has {sorted(record)}")
    renamed = {k: v for k, v in record.items() if k not in columns.values()}
    renamed.update({name: record[column] for name, column in columns.items() if column in record})
    return renamed


def _name_columns(message: str, columns: Mapping[str, str]) -> str:
    """An error about field ``response`` read from column ``Response`` names the column too."""
    for name, column in columns.items():
        message = message.replace(f"field {name!r}", f"field {name!r} (column {column!r})")
    return message


def _check_nonempty(role: str, content: str, where: str) -> None:
    """An empty answer would train on nothing but the end-of-turn token, an empty question on a bare header;
    ``where`` is the record's own field (``conversations[2]``, ``field 'output'``)."""
    if role in ("user", "assistant") and not content.strip():
        raise DataError("", f"{where}: empty {role} turn")


def _with_system_field(record: Mapping[str, Any], field: str, turns: list[Message]) -> list[Message]:
    """A top-level ``system`` (LLaMA-Factory's column) as the first turn; two different ones are ambiguous (some
    datasets repeat the system turn in the field: that is one)."""
    system = _system(record)
    if system and turns and turns[0].role == "system":
        if system[0].content.strip() == turns[0].content.strip():
            return turns
        raise DataError("", f"both a 'system' field and a system turn in {field!r}")
    return system + turns


def _from_messages(record: Mapping[str, Any]) -> list[Message]:
    return _with_system_field(record, "messages", _turns(record, "messages", "role", "content", {r: r for r in ROLES}))


# ShareGPT / LLaMA-Factory ``sharegpt``: human/gpt (also user/assistant) turns; tool turns are not supported.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def _from_sharegpt(record: Mapping[str, Any]) -> list[Message]:
    return _with_system_field(record, "conversations", _turns(record, "conversations", "from", "value", SHAREGPT_ROLES))


def _from_alpaca(record: Mapping[str, Any]) -> list[Message]:
    instruction = _text(record, "instruction", required=True)
    extra = _text(record, "input", required=False)
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    output = _text(record, "output", required=True)
    _check_nonempty("user", prompt, "field 'instruction'")
    _check_nonempty("assistant", output, "field 'output'")
    return _system(record) + [Message("user", prompt), _answer_with_reasoning(record, output)]


def _from_prompt_response(record: Mapping[str, Any]) -> list[Message]:
    prompt = _text(record, "prompt", required=True)
    response = _text(record, "response", required=True)
    _check_nonempty("user", prompt, "field 'prompt'")
    _check_nonempty("assistant", response, "field 'response'")
    return _system(record) + [Message("user", prompt), _answer_with_reasoning(record, response)]


def _answer_with_reasoning(record: Mapping[str, Any], answer: str) -> Message:
    reasoning = _text(record, "reasoning", required=False)
    return Message("assistant", answer, reasoning if reasoning.strip() else "", "field 'reasoning'")


_BUILDERS = {"messages": _from_messages, "sharegpt": _from_sharegpt, "alpaca": _from_alpaca,
             "prompt_response": _from_prompt_response}


def _check_columns_read(shape: str, columns: Mapping[str, str]) -> None:
    """A column mapped onto a field this record shape does not read would be ignored without a word."""
    unread = [f"columns.{name}" for name in columns if name not in FIELDS_READ[shape]]
    if unread:
        raise DataError("", f"{', '.join(unread)}: a {shape} record has no such field (it reads "
                            f"{', '.join(FIELDS_READ[shape])})")


def _check_turns(messages: list[Message]) -> None:
    """Reject chats that would train on nothing (empty turns are refused where their field is known)."""
    if not messages:
        raise DataError("", "empty conversation")
    if not any(m.role == "assistant" for m in messages):
        raise DataError("", "no assistant turn")


def to_conversation(record: Mapping[str, Any], fmt: str, origin: str, columns: Mapping[str, str] | None = None,
                    reasoning_format: str = REASONING_FORMAT) -> Conversation:
    """Validate ``record`` in shape ``fmt`` (or auto-detect), its fields read from ``columns``, the last answer's
    reasoning joined to it by ``reasoning_format``; errors carry ``origin``."""
    try:
        if not isinstance(record, Mapping):
            raise DataError("", f"record must be a JSON object, got {type(record).__name__}")
        record = rename_columns(record, columns or {})
        shape = detect_format(record) if fmt == "auto" else fmt
        _check_columns_read(shape, columns or {})
        messages = _BUILDERS[shape](record)
        _check_turns(messages)
        # Turns after the last answer train nothing (no supervised token; under causal attention no earlier token
        # sees them) but cost tokens, and a template that renders the last answer differently (loop.last) would
        # render it as an earlier one: dropped.
        last = max(i for i, m in enumerate(messages) if m.role == "assistant")
        answer = messages[last]
        if answer.reasoning:
            text = joined(answer.content, answer.reasoning, reasoning_format, answer.reasoning_at)
            answer = Message("assistant", text)
    except DataError as err:
        raise DataError(origin, _name_columns(err.message, columns or {})) from None
    return Conversation((*messages[:last], answer), origin)
