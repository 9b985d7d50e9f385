"""Record content that would not train what it says: fields no template renders are refused (never dropped from the
training text unnoticed); control-token text in a message is counted and warned about."""

from __future__ import annotations

import re

import pytest

from bft_megatron.data.errors import DataError
from bft_megatron.data.records import to_conversation

CALL = {"id": "c1", "type": "function", "function": {"name": "dose", "arguments": "{\"mg\": 5}"}}


@pytest.mark.parametrize("key, value", [("tool_calls", [CALL]), ("function_call", CALL["function"])])
@pytest.mark.parametrize("last", [True, False])
def test_an_answer_with_a_tool_call_is_refused_naming_the_turn(key, value, last):
    """OpenAI-style tool use: the call would vanish from the trained answer ('Let me compute that.' only)."""
    turns = [{"role": "user", "content": "Dose?"},
             {"role": "assistant", "content": "Let me compute that.", key: value}]
    if not last:
        turns += [{"role": "user", "content": "And then?"}, {"role": "assistant", "content": "Then stop."}]
    with pytest.raises(DataError, match=re.escape(f"x.jsonl:line 4: messages[1]: '{key}' is not supported (tool use")):
        to_conversation({"messages": turns}, "auto", "x.jsonl:line 4")


@pytest.mark.parametrize("empty", [None, [], {}])
def test_an_empty_tool_call_field_is_no_call(empty):
    """Exports that write 'tool_calls': null (or []) on every assistant message train as plain answers."""
    turns = [{"role": "user", "content": "Dose?"}, {"role": "assistant", "content": "5 mg.", "tool_calls": empty}]
    assert to_conversation({"messages": turns}, "auto", "x")


def _chat(question, answer):
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


@pytest.mark.parametrize("workers", [1, 2])
def test_control_token_text_in_messages_is_counted_and_warned_about(tmp_path, workers):
    """'<|im_end|>' typed in an answer is encoded as the end-of-turn token (as HF's apply_chat_template would): the
    tokens stay, the summary counts the samples and the warning names the first ones; 'a < b' is no markup."""
    import json

    from bft_megatron.config.data import DataConfig, SourceConfig
    from bft_megatron.data.prepare import preparation_warnings, run
    from tests.data_fixtures import DEMO_SP, write_jsonl

    chats = [_chat("Is p < 0.05 <i>significant</i>?", "Yes."), _chat("Dose?", "5 mg.<|im_end|> Then stop."),
             _chat("x <s> y", "Fine."), _chat("Why?", "Because.")]
    src = write_jsonl(tmp_path / "in.jsonl", chats)
    cfg = DataConfig(train=[SourceConfig(path=str(src))], tokenizer=DEMO_SP, template="chatml", seq_length=128,
                     output_dir=str(tmp_path / "out"), num_workers=workers)
    results = run(cfg)
    assert json.loads((tmp_path / "out" / "train" / "index.json").read_text())["stats"]["special_text"] == 2
    [warning] = [w for w in preparation_warnings(cfg, results) if "control-token" in w]
    assert warning.startswith(f"[train] 2 of 4 samples hold the tokenizer's control-token text in a message (first: "
                              f"{src}:line 2: '<|im_end|>' in an assistant message; {src}:line 3: '<s>' in a user "
                              "message); it is encoded as that control token")


def test_the_reasoning_formats_own_markers_are_not_control_token_text():
    """Reasoning from its own field is written between the format's '<think>' markers, a control token of some
    tokenizers: not the data's text (a record holding them is refused), so not counted; elsewhere they are."""
    from types import SimpleNamespace

    from bft_megatron.config.data import REASONING_FORMAT
    from bft_megatron.data.tokenize import special_text_finder

    tok = SimpleNamespace(special_texts=("<think>", "</think>", "<|im_end|>"))
    find = special_text_finder(tok, REASONING_FORMAT)
    record = {"prompt": "Dose?", "reasoning": "Weight-based.", "response": "5 mg."}
    assert find(to_conversation(record, "auto", "x")) is None
    assert find(to_conversation({**record, "prompt": "Dose? <think>"}, "auto", "x")) == "'<think>' in a user message"
    assert find(to_conversation({**record, "response": "5 mg.<|im_end|>"}, "auto", "x")) == (
        "'<|im_end|>' in an assistant message")
    assert special_text_finder(tok)(to_conversation(record, "auto", "x")) == "'<think>' in an assistant message"
