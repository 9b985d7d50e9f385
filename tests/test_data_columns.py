"""A source's ``columns`` (its own names for the record fields) and reasoning kept apart from the answer.

Reasoning in its own field (``reasoning`` next to ``response``/``output``; ``reasoning_content`` or ``reasoning``
in an assistant message) is written before the answer as ``<think>\\n...\\n</think>\\n\\n`` (the oracle below).
Medical-o1-reasoning-SFT's shape (``Question``, ``Complex_CoT``, ``Response``) is the motivating case.
"""

from __future__ import annotations

import re

import pytest

from bft_megatron.config.data import DataConfig, SourceConfig
from bft_megatron.config.schema import load_config
from bft_megatron.data.errors import DataError
from bft_megatron.data.provenance import PreparedDataMismatch
from bft_megatron.data.records import to_conversation
from bft_megatron.training.data import open_datasets
from tests.data_fixtures import DEMO_SP, hf_tokenizer, write_jsonl

O1 = {"Question": "A child has a small head. Diagnosis?", "Complex_CoT": "\nHead circumference is low.\n",
      "Response": "Microcephaly."}
O1_COLUMNS = {"prompt": "Question", "reasoning": "Complex_CoT", "response": "Response"}


def _reference_with_reasoning(reasoning: str, answer: str) -> str:
    return "<think>\n" + reasoning.strip() + "\n</think>\n\n" + answer.lstrip()


def _answer(record, fmt="auto", columns=None) -> str:
    return to_conversation(record, fmt, "test:line 1", columns).messages[-1].content


def test_columns_name_the_fields_and_reasoning_precedes_the_answer():
    conv = to_conversation(O1, "auto", "t", O1_COLUMNS)
    assert [(m.role, m.content) for m in conv.messages] == [
        ("user", O1["Question"]), ("assistant", _reference_with_reasoning(O1["Complex_CoT"], O1["Response"]))]
    alpaca = {"instruction": "Q", "output": "A", "reasoning": "r"}
    assert _answer(alpaca) == _reference_with_reasoning("r", "A")
    assert _answer({"prompt": "Q", "response": "A", "reasoning": "  \n"}) == "A"  # blank reasoning: none


@pytest.mark.parametrize("key", ["reasoning_content", "reasoning"])
def test_message_reasoning_is_trained_before_the_last_answer_only(key):
    """Reasoning models' templates drop reasoning from earlier turns (the model never sees it in a prompt), and
    ``template: tokenizer`` would not find such an earlier answer: only the last answer's reasoning is kept."""
    record = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A1", key: "r1"},
                           {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2", key: "r2"}]}
    conv = to_conversation(record, "auto", "t")
    assert conv.messages[1].content == "A1" and conv.messages[3].content == _reference_with_reasoning("r2", "A2")
    sharegpt = {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A", key: "r"}]}
    assert _answer(sharegpt) == _reference_with_reasoning("r", "A")
    blank_first = {"role": "assistant", "content": "A", "reasoning_content": " ", "reasoning": "r"}
    assert _answer({"messages": [{"role": "user", "content": "Q"}, blank_first]}) == _reference_with_reasoning("r", "A")
    both = {"role": "assistant", "content": "A", "reasoning_content": "rc", "reasoning": "r"}  # the first key wins
    assert _answer({"messages": [{"role": "user", "content": "Q"}, both]}) == _reference_with_reasoning("rc", "A")


def test_an_earlier_answers_dropped_reasoning_is_not_trained_without_it():
    """Reasoning on an earlier answer only: not carried to the last one; and since that earlier answer, trained
    with supervise: all, would teach answering without reasoning, encode refuses it there (last: fine)."""
    from bft_megatron.data.tokenize import encode
    from bft_megatron.data.tokenizer import load_tokenizer

    record = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A1", "reasoning": "r1"},
                           {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]}
    conv = to_conversation(record, "auto", "t:line 3")
    assert [m.content for m in conv.messages] == ["Q", "A1", "Q2", "A2"]
    tok = load_tokenizer(DEMO_SP)
    with pytest.raises(DataError, match=r"t:line 3: messages\[1\]: an earlier answer's reasoning is dropped .* "
                                        r"set data.supervise=last"):
        encode(conv, "chatml", tok, supervise="all")
    assert encode(conv, "chatml", tok, supervise="last").loss_mask.any()


def test_multi_turn_reasoning_renders_with_a_template_that_strips_earlier_reasoning():
    """Qwen3-like templates drop reasoning from turns before the last: with it joined into every answer, the
    earlier answers were not found in the rendering and the whole record was a template_error."""
    from bft_megatron.data.templates import render
    from bft_megatron.data.tokenizer import load_tokenizer

    tok = load_tokenizer(hf_tokenizer("qwen3_strip"))
    record = {"messages": [{"role": "user", "content": "Q1"},
                           {"role": "assistant", "content": "A1", "reasoning": "r1"},
                           {"role": "user", "content": "Q2"},
                           {"role": "assistant", "content": "A2", "reasoning": "r2"}]}
    rendered = render(to_conversation(record, "auto", "t"), "tokenizer", tok)
    assert [rendered.text[a:b] for a, b in rendered.spans] == ["A1<|im_end|>",
                                                               "<think>\nr2\n</think>\n\nA2<|im_end|>"]


def test_record_errors_name_the_column_and_field():
    """A record lacking an optional column (reasoning in some records only) trains without it, as the rows Arrow
    filled with None did; a required one is named by field and column; none of them at all is an error."""
    assert _answer({k: v for k, v in O1.items() if k != "Complex_CoT"}, columns=O1_COLUMNS) == O1["Response"]
    with pytest.raises(DataError, match=r"test:line 1: missing field 'response' \(column 'Response'\)$"):
        _answer({k: v for k, v in O1.items() if k != "Response"}, columns=O1_COLUMNS)
    with pytest.raises(DataError, match=r"test:line 1: no column 'Question' \(columns.prompt\), 'Complex_CoT' "
                                        r"\(columns.reasoning\), 'Response' \(columns.response\); the record has "
                                        r"\['question', 'response'\]"):
        _answer({"question": "Q", "response": "A"}, columns=O1_COLUMNS)
    with pytest.raises(DataError, match=r"field 'reasoning': reasoning given in its own field, and the answer "
                                        r"already holds '<think>'"):
        _answer({"prompt": "Q", "response": "<think>x</think>A", "reasoning": "r"})
    bad = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A", "reasoning": 3}]}
    with pytest.raises(DataError, match=r"messages\[1\]: 'reasoning' must be a string"):
        _answer(bad)
    both = {"messages": [{"role": "user", "content": "Q"},
                         {"role": "assistant", "content": "<think>x</think>A", "reasoning": "r"}]}
    with pytest.raises(DataError, match=r"messages\[1\]: reasoning given in its own field, and the answer already "
                                        r"holds '<think>'"):
        _answer(both)
    chat = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}], "CoT": "r"}
    with pytest.raises(DataError, match=r"columns.reasoning: a messages record has no such field \(it reads "
                                        r"messages, system\)"):
        _answer(chat, columns={"reasoning": "CoT"})


@pytest.mark.parametrize("columns, fmt, field, why", [
    ({"question": "Question"}, "auto", "train[0].columns.question", "is not a record field"),
    ({"prompt": ""}, "auto", "train[0].columns.prompt", "must be the source's column name"),
    (["prompt"], "auto", "train[0].columns", "must map record fields"),
    ({"reasoning": "R"}, "messages", "train[0].columns.reasoning", r"is not a messages record field: one of "
                                                                   r"\('messages', 'system'\)"),
    ({"prompt": "Q", "response": "Q"}, "auto", "train[0].columns.response", "the same column as columns.prompt"),
])
def test_config_validation_names_the_bad_column(tmp_path, columns, fmt, field, why):
    cfg = DataConfig(train=[SourceConfig(path="a.jsonl", format=fmt, columns=columns)], tokenizer="t",
                     output_dir=str(tmp_path))
    with pytest.raises(ValueError, match=rf"data config: {re.escape(field)}=.*{why}"):
        cfg.validate()


def test_columns_from_yaml_prepare_and_are_compared(tmp_path):
    """Through the trainer's config: a YAML source mapping with ``columns`` prepares on first use, and changed
    columns make the prepared split differ (its tokens would)."""
    src = write_jsonl(tmp_path / "o1.jsonl", [O1] * 4)
    yaml = tmp_path / "c.yaml"
    yaml.write_text(f"data:\n  train:\n    - path: {src}\n      columns: {{prompt: Question, response: Response, "
                    f"reasoning: Complex_CoT}}\n  tokenizer: {DEMO_SP}\n  template: chatml\n  seq_length: 256\n"
                    f"  output_dir: {tmp_path / 'out'}\nmodel:\n  vocab_size: 4096\n")
    open_datasets(load_config(str(yaml), []))
    open_datasets(load_config(str(yaml), []))  # the same columns: reused
    yaml.write_text(yaml.read_text().replace(", reasoning: Complex_CoT", ""))
    with pytest.raises(PreparedDataMismatch, match=r"data.train\[0\].columns: prepared"):
        open_datasets(load_config(str(yaml), []))


def test_medical_o1_shape_trains_its_reasoning_after_an_r1_prompt(tmp_path, capsys):
    """The use case end to end: Question / Complex_CoT / Response with an R1-distill-like tokenizer and
    ``template: tokenizer_generation``: the chain of thought is supervised after the prompt's '<think>\\n'."""
    from bft_megatron.data.prepare import run
    from bft_megatron.data.show import main as show

    src = write_jsonl(tmp_path / "o1.jsonl", [O1])
    run(DataConfig(train=[SourceConfig(path=str(src), columns=O1_COLUMNS)], tokenizer=hf_tokenizer("r1"),
                   template="tokenizer_generation", supervise="last", seq_length=256,
                   output_dir=str(tmp_path / "out")))
    capsys.readouterr()
    show([str(tmp_path / "out")])
    assert "<think>\n[[Head circumference is low.\n</think>\n\nMicrocephaly.<｜end▁of▁sentence｜>]]" in \
        capsys.readouterr().out


HUATUO = "## Thinking\n\n{reasoning}\n\n## Final Response\n\n{answer}"  # HuatuoGPT-o1's form (Llama-3.1/Qwen2.5)


def test_reasoning_format_writes_another_form():
    conv = to_conversation(O1, "auto", "t", O1_COLUMNS, reasoning_format=HUATUO)
    assert conv.messages[-1].content == ("## Thinking\n\nHead circumference is low.\n\n"
                                         "## Final Response\n\nMicrocephaly.")
    with pytest.raises(DataError, match=r"the answer already holds '## Thinking'"):
        to_conversation({**O1, "Response": "## Thinking\nx"}, "auto", "t", O1_COLUMNS, reasoning_format=HUATUO)


@pytest.mark.parametrize("value, why", [
    ("{reasoning}", "must hold {reasoning} and {answer} once each"),
    ("{reasoning}{answer}{extra}", "must hold"),
    ("{reasoning!r}{answer}", "must hold"),
    ("{ {reasoning}{answer}", "not a format string"),
    (3, "must hold"),
])
def test_reasoning_format_validation_names_the_value(tmp_path, value, why):
    cfg = DataConfig(train=[SourceConfig(path="a.jsonl")], tokenizer="t", output_dir=str(tmp_path),
                     reasoning_format=value)
    with pytest.raises(ValueError, match=rf"data config: reasoning_format={re.escape(repr(value))}: {re.escape(why)}"):
        cfg.validate()


def test_prepare_flag_and_provenance_of_the_reasoning_format(tmp_path, capsys):
    """``--reasoning-format`` reaches the records; the format is in index.json, compared with the config's, and the
    two splits of one directory must agree on it."""
    from bft_megatron.data.prepare import main
    from bft_megatron.data.provenance import splits_disagree
    from bft_megatron.data.show import main as show
    from bft_megatron.data.storage import read_index

    src = write_jsonl(tmp_path / "o1.jsonl", [{"prompt": O1["Question"], "reasoning": "low", "response": "Micro."}])
    out = tmp_path / "out"
    assert main(["--input", str(src), "--valid", str(src), "--tokenizer", DEMO_SP, "--template", "chatml",
                 "--reasoning-format", HUATUO, "--seq-length", "256", "--output", str(out)]) == 0
    capsys.readouterr()
    show([str(out)])
    assert "[[## Thinking\n\nlow\n\n## Final Response\n\nMicro.<|im_end|>]]" in capsys.readouterr().out
    train, valid = read_index(out / "train"), read_index(out / "valid")
    assert train["reasoning_format"] == HUATUO
    assert "data.reasoning_format: train/ " in splits_disagree(out, train, {**valid, "reasoning_format": "x"})
    over = [f"data.train={src}", f"data.tokenizer={DEMO_SP}", f"data.output_dir={out}", "data.seq_length=256",
            "data.template=chatml", "model.vocab_size=4096"]
    with pytest.raises(PreparedDataMismatch, match=r"data.reasoning_format: prepared"):
        open_datasets(load_config(None, over))  # the default format: other tokens


def test_the_medical_o1_recipe_is_a_valid_data_config():
    from pathlib import Path

    from bft_megatron.data.prepare import load_config as load_data_config

    cfg = load_data_config(str(Path(__file__).resolve().parents[1] / "configs" / "data_medical_o1.yaml"))
    cfg.validate()
    assert (cfg.template, cfg.supervise, cfg.train[0].subset) == ("tokenizer_generation", "last", "en")
    assert cfg.train[0].columns == O1_COLUMNS


def test_reasoning_never_doubled_or_misplaced():
    """The format's markers in the answer or in the reasoning (an answer that continues a think block, '...</think>
    final', with its reasoning in a field too) would train two blocks; reasoning on a user or system message would be
    ignored: each is an error naming the field. The answer's leading whitespace gives way to the format's."""
    with pytest.raises(DataError, match=r"field 'reasoning': reasoning given in its own field, and the answer already "
                                        r"holds '</think>'"):
        _answer({"prompt": "Q", "response": "R</think>\n\nA", "reasoning": "r"})
    with pytest.raises(DataError, match=r"and the reasoning already holds '<think>'"):
        _answer({"prompt": "Q", "response": "A", "reasoning": "<think>r"})
    with pytest.raises(DataError, match=r"messages\[0\]: 'reasoning_content' on a user message"):
        _answer({"messages": [{"role": "user", "content": "Q", "reasoning_content": "x"},
                              {"role": "assistant", "content": "A"}]})
    with pytest.raises(DataError, match=r"'reasoning' is not valid Unicode \(lone surrogate"):
        _answer({"messages": [{"role": "user", "content": "Q"},
                              {"role": "assistant", "content": "A", "reasoning": "\ud83d"}]})
    assert _answer({"prompt": "Q", "response": "\n\nA", "reasoning": "r"}) == _reference_with_reasoning("r", "A")


def test_reasoning_format_with_escapes_typed_as_text_is_refused(tmp_path):
    """'<think>\\n{reasoning}...' in bash single quotes or a single-quoted YAML value is a backslash and an n: it
    would be trained as such."""
    cfg = DataConfig(train=[SourceConfig(path="a.jsonl")], tokenizer="t", output_dir=str(tmp_path),
                     reasoning_format=r"<think>\n{reasoning}\n</think>\n\n{answer}")
    with pytest.raises(ValueError, match=r"data config: reasoning_format=.*holds a backslash escape as text"):
        cfg.validate()


def test_a_column_no_record_of_the_source_has_is_an_error(tmp_path):
    """columns.reasoning=Complex_Cot (a typo): each record alone may lack an optional column, so the source as a
    whole must have it, or every answer would train without its reasoning unnoticed."""
    from bft_megatron.data.prepare import run

    src = write_jsonl(tmp_path / "o1.jsonl", [O1, {k: v for k, v in O1.items() if k != "Complex_CoT"}])
    typo = {**O1_COLUMNS, "reasoning": "Complex_Cot"}
    cfg = DataConfig(train=[SourceConfig(path=str(src), columns=typo)], tokenizer=DEMO_SP, seq_length=256,
                     output_dir=str(tmp_path / "out"), template="chatml")
    with pytest.raises(DataError, match=rf"{src}: no record has the column 'Complex_Cot' \(columns.reasoning\): "
                                        r"check the source's columns"):
        run(cfg)
    stats = run(DataConfig(**{**cfg.__dict__, "train": [SourceConfig(path=str(src), columns=O1_COLUMNS)]}))
    assert stats["train"].samples == 2  # the record without its reasoning trains its answer
