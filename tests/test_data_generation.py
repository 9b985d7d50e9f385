"""``template: tokenizer_generation``: the last answer is trained after the template's generation prompt.

Oracle: ``_reference_generation`` builds the expected text by hand from the tokenizer's own generation prompt and
the answer (a reasoning model's prompt opens ``<think>\\n``; the answer then continues it), independently of the
stand-in machinery in :mod:`bft_megatron.data.generation`.
"""

from __future__ import annotations

import logging

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bft_megatron.config.data import DataConfig, SourceConfig
from bft_megatron.data.errors import DataError
from bft_megatron.data.records import Conversation, Message
from bft_megatron.data.templates import check_template, render
from bft_megatron.data.tokenize import encode
from bft_megatron.data.tokenizer import load_tokenizer
from tests.data_fixtures import hf_tokenizer, logged, metaspace_tokenizer, write_jsonl

GEN = "tokenizer_generation"
EOS_R1 = "<｜end▁of▁sentence｜>"


@pytest.fixture(scope="module")
def toks():
    return {name: load_tokenizer(hf_tokenizer(name)) for name in
            ("r1", "thinking", "qwen3", "llama31", "qwen25", "qwen15", "alternating", "role_tags",
             "no_generation_prompt", "mistral")}


def _chat(*turns: str) -> Conversation:
    roles = ("user", "assistant") * len(turns)
    return Conversation(tuple(Message(r, t) for r, t in zip(roles, turns)), "test:line 1")


def _supervised(conv: Conversation, tok) -> tuple[str, str]:
    """(the text before the supervised span, the supervised text)."""
    r = render(conv, GEN, tok)
    (start, end), = r.spans
    return r.text[:start], r.text[start:end]


def _reference_generation(conv: Conversation, tok, continuation: str, closing: str) -> tuple[str, str]:
    msgs = [{"role": m.role, "content": m.content} for m in conv.messages[:-1]]
    return tok.apply_chat_template(msgs, add_generation_prompt=True), continuation + closing


def test_r1_trains_the_reasoning_its_template_strips(toks):
    """The R1 distills' template drops everything up to '</think>' from an answer: the full chat has no reasoning.
    Here the answer continues the prompt's '<think>\\n' with its reasoning and its final answer."""
    tok = toks["r1"]
    conv = _chat("Which gene?", "<think>\nIt is ASPM.\n</think>\n\nASPM.")
    assert "It is ASPM" not in tok.apply_chat_template([{"role": "assistant", "content": conv.messages[1].content}],
                                                       add_generation_prompt=False)
    assert _supervised(conv, tok) == _reference_generation(conv, tok, "It is ASPM.\n</think>\n\nASPM.", EOS_R1)


def test_r1_history_is_rendered_as_at_inference(toks):
    """Earlier answers are context, stripped as the template strips them when the model is used; only the last
    answer is supervised, and the encoded mask covers exactly its tokens."""
    tok = toks["r1"]
    conv = _chat("Q1", "<think>\nold reasoning\n</think>\n\nA1", "Q2", "<think>\nnew\n</think>\n\nA2")
    before, supervised = _supervised(conv, tok)
    assert "old reasoning" not in before and "A1" in before
    assert before.endswith("<｜Assistant｜><think>\n") and supervised == "new\n</think>\n\nA2" + EOS_R1
    enc = encode(conv, GEN, tok, supervise="last")
    labels = [int(t) for t, m in zip(enc.tokens[1:], enc.loss_mask[:-1]) if m]
    assert tok.decode(labels) == supervised


@pytest.mark.parametrize("answer, continuation", [
    ("<think>r</think>A", "r</think>A"),  # the prompt's newline after '<think>' is not doubled or demanded
    ("  <think>\n\nr\n</think>\n\nA", "\nr\n</think>\n\nA"),  # one newline written by the prompt, one by the answer
    ("<think>\n</think>\n\nA", "</think>\n\nA"),  # an empty think block
])
def test_r1_answer_continues_what_the_prompt_opened(toks, answer, continuation):
    conv = _chat("Q", answer)
    assert _supervised(conv, toks["r1"]) == _reference_generation(conv, toks["r1"], continuation, EOS_R1)


def test_answer_continuing_the_opened_block_is_kept_whole(toks):
    """Distilled data often starts after the prompt's '<think>\n' already: reasoning, '</think>', answer."""
    conv = _chat("Q", "R\n</think>\n\nA")
    assert _supervised(conv, toks["r1"]) == _reference_generation(conv, toks["r1"], "R\n</think>\n\nA", EOS_R1)


def test_the_sample_starts_with_the_tokens_of_the_inference_prompt():
    """Tokenized as one string, a prompt ending '<think>\n' and an answer continuing '\nR' merge into '>\n\n' with
    Qwen2's pre-tokenizer: the trained prompt would not be the one the model gets. The prompt is tokenized alone."""
    tok = load_tokenizer(hf_tokenizer("r1_newlines"))
    conv = _chat("Q", "<think>\n\nHello\n</think>\n\nA")
    prompt = _reference_generation(conv, tok, "", "")[0]
    prompt_ids = tok.encode_offsets(prompt)[0]
    assert tok.encode_offsets(prompt + "\nHello")[0][:len(prompt_ids)] != prompt_ids  # the fixture merges
    enc = encode(conv, GEN, tok, supervise="last")
    assert list(enc.tokens[:len(prompt_ids)]) == prompt_ids
    labels = [int(t) for t, m in zip(enc.tokens[1:], enc.loss_mask[:-1]) if m]
    assert tok.decode(labels) == "\nHello\n</think>\n\nA" + EOS_R1


def test_sentencepiece_style_answer_gets_no_leading_space():
    """A Metaspace tokenizer prepends '▁' to a text tokenized on its own: the answer must be tokenized in place, so
    its tokens are those of the whole chat (as ``template: tokenizer`` has them), not '▁'-prefixed."""
    tok = load_tokenizer(metaspace_tokenizer())
    conv = _chat("Hello, how are you?", "Microcephaly is a small head.")
    gen, full = encode(conv, GEN, tok, supervise="last"), encode(conv, "tokenizer", tok, supervise="last")
    assert gen.tokens.tolist() == full.tokens.tolist() and gen.loss_mask.tolist() == full.loss_mask.tolist()


def test_chat_starting_with_its_answer_is_refused(toks):
    conv = Conversation((Message("assistant", "A"),), "test:line 1")
    with pytest.raises(DataError, match="test:line 1: the chat starts with its answer"):
        render(conv, GEN, toks["qwen25"])


@pytest.mark.parametrize("name", ["r1", "thinking"])
def test_answer_without_the_opened_block_is_refused(toks, name):
    """After a prompt that opens '<think>\\n', an answer with no reasoning would be trained inside the block and
    the model never taught to close it: a DataError naming the opener (on_error: skip counts it)."""
    with pytest.raises(DataError, match=r"opens every answer with '<think>\\n'"):
        render(_chat("Q", "Just the answer."), GEN, toks[name])


def test_template_that_keeps_the_answer_is_trained_as_it_renders_it(toks):
    """Qwen3-Thinking-like: the last turn keeps its reasoning, with the lines around the think block normalised,
    and the prompt already holds '<think>\\n': what follows it in the template's own rendering is supervised."""
    conv = _chat("Q", "<think>r</think>A")
    assert _supervised(conv, toks["qwen3"]) == _reference_generation(conv, toks["qwen3"], "r\n</think>\n\nA",
                                                                       "<|im_end|>")
    conv = _chat("Q", "A")  # no reasoning: the template's empty block, which the model must then write
    assert _supervised(conv, toks["qwen3"])[1] == "\n</think>\n\nA<|im_end|>"


@pytest.mark.parametrize("name", ["llama31", "qwen25", "qwen15", "alternating"])
def test_same_as_the_full_template_where_nothing_is_stripped(toks, name):
    """For templates without a reasoning prompt the mode trains what ``template: tokenizer`` trains for the last
    answer, byte for byte (Qwen1.5's end-of-turn, written only between turns, is added in both)."""
    conv = _chat("Hello, how are you?", "Fine.", "Which genes?", " Many, for example ASPM. ")
    full = render(conv, "tokenizer", toks[name])
    gen = render(conv, GEN, toks[name])
    assert (gen.text, gen.spans) == (full.text, full.spans[-1:])
    assert gen.text[slice(*gen.spans[0])].endswith(("<|eot_id|>", "<|im_end|>"))


def test_mistral_everything_after_the_prompt_is_the_answer(toks):
    """Mistral's prompt ends at '[/INST]' (no header, no generation prompt): the model writes ' ' + answer, and the
    ' </s>' that closes it (whitespace before a known marker is part of the closing)."""
    conv = _chat("Q1", "A1", "Q2", "A2")
    assert _supervised(conv, toks["mistral"]) == _reference_generation(conv, toks["mistral"], " A2", " </s>")


def test_qwen15_last_answer_gets_its_stop(toks):
    before, supervised = _supervised(_chat("Q", "A"), toks["qwen15"])
    assert before.endswith("<|im_start|>assistant\n") and supervised == "A<|im_end|>"


def test_warnings_at_preparation(toks):
    """No end-of-turn token (GLM-like) and no generation prompt (the header would be trained) are warned about."""
    with logged() as records:
        check_template(GEN, toks["role_tags"])
        check_template(GEN, toks["no_generation_prompt"])
        check_template(GEN, toks["r1"])
        check_template(GEN, toks["mistral"])  # no header to supervise: nothing to warn about
    text = [r.getMessage() for r in records]
    assert sum("not trained to stop" in t for t in text) == 1
    assert sum("writes nothing for add_generation_prompt=True" in t for t in text) == 1
    assert not any(toks["r1"].name in t or toks["mistral"].name in t for t in text)


def test_config_requires_supervise_last(tmp_path):
    cfg = DataConfig(train=[SourceConfig(path="a.jsonl")], tokenizer="t", template=GEN, output_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"supervise='all'.*tokenizer_generation.*set data.supervise=last"):
        cfg.validate()
    cfg.supervise = "last"
    cfg.validate()


def test_prepare_names_the_flag(tmp_path, capsys):
    from bft_megatron.data.prepare import main

    src = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "Q", "response": "<think>r</think>A"}])
    with logged(logging.ERROR) as records:
        assert main(["--input", str(src), "--tokenizer", hf_tokenizer("r1"), "--template", GEN,
                     "--output", str(tmp_path / "out")]) == 2
    assert "set --supervise last" in records[-1].getMessage()


def test_prepare_and_show_data_train_the_reasoning(tmp_path, capsys):
    """End to end through ``bft-megatron prepare`` and ``show-data``: the reasoning is in the supervised text."""
    from bft_megatron.data.prepare import main
    from bft_megatron.data.show import main as show

    src = write_jsonl(tmp_path / "r.jsonl", [
        {"prompt": "Which gene?", "response": "<think>\nmicrocephaly points to ASPM\n</think>\n\nASPM."},
        {"prompt": "Define ataxia.", "response": "Poor coordination."}])  # no reasoning: skipped
    main(["--input", str(src), "--tokenizer", hf_tokenizer("r1"), "--template", GEN, "--supervise", "last",
          "--on-error", "skip", "--seq-length", "256", "--output", str(tmp_path / "out")])
    capsys.readouterr()
    show([str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert "[[microcephaly points to ASPM\n</think>\n\nASPM." in out and "Poor coordination" not in out


_TEXT = st.text(alphabet="ab \n.", min_size=1, max_size=12).filter(lambda s: s.strip())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lead=st.sampled_from(["", " ", "\n"]), gap=st.sampled_from(["", "\n", "\n\n"]), reasoning=_TEXT,
       final=_TEXT)
def test_r1_prompt_opener_plus_supervised_text_is_the_answer(toks, lead, gap, reasoning, final):
    """Whatever the whitespace: the prompt's '<think>\\n' followed by the supervised text reproduces the answer's
    words (whitespace aside), and the text ends with the stop token."""
    answer = f"{lead}<think>{gap}{reasoning}</think>{gap}{final}"
    before, supervised = _supervised(_chat("Q", answer), toks["r1"])
    assert before.endswith("<think>\n") and supervised.endswith(EOS_R1)
    assert "".join(("<think>\n" + supervised[:-len(EOS_R1)]).split()) == "".join(answer.split())
