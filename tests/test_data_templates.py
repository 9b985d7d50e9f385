"""Templates and masking: supervised tokens are exactly each answer plus its end-of-turn token."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from bft_megatron.data.errors import DataError
from bft_megatron.data.records import Conversation, Message
from bft_megatron.data.templates import check_template, render
from bft_megatron.data.tokenize import encode, supervised_tokens
from bft_megatron.data.tokenizer import Tokenizer, load_tokenizer
from tests.data_fixtures import DEMO_SP, hf_tokenizer, logged

CONV = Conversation((Message("system", "Be brief."), Message("user", "What is microcephaly?"),
                     Message("assistant", "A small head circumference."), Message("user", "Which genes?"),
                     Message("assistant", "Many, for example ASPM.")), "test:line 1")
ANSWERS = ["A small head circumference.", "Many, for example ASPM."]
NO_SYSTEM = Conversation(CONV.messages[1:], "test:line 2")


def _tok(name: str):
    return load_tokenizer(DEMO_SP if name == "sp" else hf_tokenizer(name))


def supervised_runs(enc) -> list[list[int]]:
    """Contiguous runs of supervised *target* tokens (undo the shift: target[t+1] = loss_mask[t])."""
    target = np.zeros(len(enc.tokens), dtype=bool)
    target[1:] = enc.loss_mask[:-1].astype(bool)
    runs, cur = [], []
    for tok_id, sup in zip(enc.tokens.tolist(), target.tolist()):
        if sup:
            cur.append(tok_id)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


CASES = [  # tokenizer, template, end-of-turn text
    ("sp", "chatml", "<|im_end|>"), ("sp", "llama3", "<|eot_id|>"),
    ("llama31", "llama3", "<|eot_id|>"), ("llama31", "tokenizer", "<|eot_id|>"),
    ("qwen25", "chatml", "<|im_end|>"), ("qwen25", "tokenizer", "<|im_end|>"), ("qwen25", "plain", "<|im_end|>"),
    ("rewriting", "tokenizer", "<|im_end|>"), ("phi4", "tokenizer", "<|im_end|>"),
    ("gemma3", "tokenizer", "<end_of_turn>"),
]


@pytest.mark.parametrize("tok_name,template,eot", CASES, ids=[f"{a}-{b}" for a, b, _ in CASES])
@pytest.mark.parametrize("conv", [CONV, NO_SYSTEM], ids=["system", "nosystem"])
def test_supervised_tokens_are_answer_plus_eot(tok_name, template, eot, conv):
    tok = _tok(tok_name)
    check_template(template, tok)
    enc = encode(conv, template, tok)
    runs = supervised_runs(enc)
    assert [tok.decode(r) for r in runs] == [a + eot for a in ANSWERS]
    assert enc.loss_mask[-1] == 0 and enc.tokens.dtype == np.int32
    # everything before the first answer (system prompt, injected dates, headers) is masked
    first = tok.encode_offsets(render(conv, template, tok).text)[0]
    assert list(enc.tokens) == first


def test_plain_template_with_sentencepiece_control_eos():
    tok = _tok("sp")
    enc = encode(CONV, "plain", tok)
    runs = supervised_runs(enc)
    assert [r[-1] for r in runs] == [tok.eos_id, tok.eos_id]
    # "Assistant: " ends with a space that sentencepiece merges into the answer's first piece ("▁A"):
    # a token overlapping the answer is supervised, as the model must emit it at inference time
    assert [tok.decode(r[:-1]) for r in runs] == [" " + a for a in ANSWERS]
    assert enc.tokens[0] == tok.bos_id
    assert "User: What is microcephaly?\n\nAssistant: " in tok.decode(enc.tokens)


def test_plain_template_labels_each_answer_not_each_question():
    """Two questions in a row are both 'User:' turns, an answer opening the chat is labelled 'Assistant:'; the
    usual alternation renders as before."""
    tok = _tok("sp")
    conv = Conversation((Message("assistant", "Hello."), Message("user", "Hi."), Message("user", "What is ataxia?"),
                         Message("assistant", "Poor coordination.")), "test:line 3")
    bos, eos = tok.bos_token or "", tok.eos_token
    assert render(conv, "plain", tok).text == (f"{bos}Assistant: Hello.{eos}\n\nUser: Hi.\n\nUser: What is ataxia?"
                                               f"\n\nAssistant: Poor coordination.{eos}")
    assert render(NO_SYSTEM, "plain", tok).text == (f"{bos}User: What is microcephaly?\n\nAssistant: {ANSWERS[0]}{eos}"
                                                    f"\n\nUser: Which genes?\n\nAssistant: {ANSWERS[1]}{eos}")


def test_supervise_last_only():
    tok = _tok("sp")
    enc = encode(CONV, "chatml", tok, supervise="last")
    assert [tok.decode(r) for r in supervised_runs(enc)] == [ANSWERS[1] + "<|im_end|>"]


def test_builtin_and_tokenizer_templates_agree_on_supervised_tokens():
    """Llama-3.1-like template injects dates; Qwen2.5-like injects a default system prompt."""
    for name, builtin in (("llama31", "llama3"), ("qwen25", "chatml")):
        tok = _tok(name)
        a, b = encode(NO_SYSTEM, builtin, tok), encode(NO_SYSTEM, "tokenizer", tok)
        assert supervised_runs(a) == supervised_runs(b)
        assert len(b.tokens) > len(a.tokens)  # the injected text is there, and masked
    assert "Today Date" in render(NO_SYSTEM, "tokenizer", _tok("llama31")).text
    assert "You are Qwen" in render(NO_SYSTEM, "tokenizer", _tok("qwen25")).text


def test_llama3_trims_content_like_meta_template():
    tok = _tok("llama31")
    conv = Conversation((Message("user", "hi"), Message("assistant", "  padded answer \n")), "t")
    assert [tok.decode(r) for r in supervised_runs(encode(conv, "llama3", tok))] == ["padded answer<|eot_id|>"]
    assert supervised_runs(encode(conv, "llama3", tok)) == supervised_runs(encode(conv, "tokenizer", tok))


def test_missing_template_tokens_are_refused():
    with pytest.raises(ValueError, match="needs '<\\|im_start\\|>' as one token"):
        check_template("chatml", _tok("llama31"))
    with pytest.raises(ValueError, match="needs '<\\|begin_of_text\\|>'"):
        check_template("llama3", _tok("qwen25"))
    with pytest.raises(ValueError, match="has no chat_template"):
        check_template("tokenizer", _tok("qwen_plain"))


class _EosInPieces(Tokenizer):
    """A tokenizer whose eos text '</s>' does not encode to its eos id (eos not registered as special)."""

    name, vocab_size, eos_id, bos_id, pad_id, fingerprint = "stub", 10, 5, None, 5, "x"

    def encode_offsets(self, text):
        if text == "</s>":
            return [1, 2], [(0, 2), (2, 4)]
        return [7] * len(text), [(i, i + 1) for i in range(len(text))]

    def id_to_token(self, idx):
        return "</s>" if idx == 5 else f"t{idx}"


def test_plain_template_refuses_an_eos_that_does_not_encode_to_its_id():
    """Else the model would learn to emit the pieces of '</s>' and never the id that stops generation."""
    with pytest.raises(ValueError, match=r"template='plain': stub does not encode '</s>' as id 5"):
        check_template("plain", _EosInPieces())


def test_hf_tokenizer_without_pad_pads_with_eos():
    tok = _tok("llama31")  # defines no pad token
    assert tok.pad_id == tok.eos_id


def test_template_that_rewrites_answers_is_an_error():
    with pytest.raises(DataError, match="test:line 1: assistant answer .* not found"):
        encode(CONV, "tokenizer", _tok("upper"))


def test_supervised_tokens_overlap_rule():
    offsets = [(0, 3), (3, 5), (5, 5), (5, 9), (9, 12), (12, 12), (4, 4)]
    got = supervised_tokens(offsets, [(4, 6), (10, 11)])
    # overlap counts; a zero-width token counts where it stands (5 is inside [4, 6), 12 is not)
    assert got.tolist() == [False, True, True, True, True, False, True]
    assert supervised_tokens([(0, 4), (4, 8)], [(4, 8)]).tolist() == [False, True]  # touching is not overlap
    assert supervised_tokens(offsets, []).tolist() == [False] * 7


def test_template_without_known_end_marker_supervises_its_closing_text():
    tok = _tok("hashes")
    enc = encode(NO_SYSTEM, "tokenizer", tok)
    assert [tok.decode(r) for r in supervised_runs(enc)] == [a + " ###" for a in ANSWERS]


def test_sentencepiece_with_default_normalisation(tmp_path):
    """A model trained here with sentencepiece defaults (NFKC, whitespace collapsing, dummy prefix,
    no pad id): offsets still map onto the original text, and masks still follow answer boundaries."""
    import io

    import sentencepiece as spm

    from tests.data_fixtures import CORPUS

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=model, vocab_size=70,
                                   hard_vocab_limit=False, user_defined_symbols=["<|im_start|>", "<|im_end|>"],
                                   num_threads=1, minloglevel=2)
    (tmp_path / "d.model").write_bytes(model.getvalue())
    tok = load_tokenizer(str(tmp_path / "d.model"))
    assert tok.pad_id == tok.eos_id  # no pad piece: fall back to eos
    enc = encode(CONV, "chatml", tok)
    runs = supervised_runs(enc)
    im_end = tok.token_to_id("<|im_end|>")
    assert len(runs) == 2 and [r[-1] for r in runs] == [im_end, im_end]
    first, second = (tok.decode(r[:-1]) for r in runs)  # tiny vocab: some letters decode as unknown
    assert first.endswith("small head circumference.") and second.strip().startswith("Many, for example")
    prompt = tok.decode(enc.tokens[: int(np.argmax(enc.loss_mask)) + 1].tolist())
    assert "microcephaly?" in prompt and "circumference" not in prompt


def test_a_chat_the_tokenizer_template_refuses_is_a_data_error_naming_the_record():
    """Templates that raise_exception on some chats (roles that do not alternate, in Mistral's, Llama-2's and
    Gemma's) must give a DataError naming the record, so that on_error: skip counts it as a template_error
    instead of aborting the whole preparation with a bare jinja2 TemplateError."""
    tok = _tok("alternating")
    ok = Conversation((Message("user", "q"), Message("assistant", "a")), "t")
    assert [tok.decode(r) for r in supervised_runs(encode(ok, "tokenizer", tok))] == ["a<|im_end|>"]
    twice = Conversation((Message("user", "q"), Message("user", "again"), Message("assistant", "a")),
                         "chats.jsonl:line 7")
    with pytest.raises(DataError, match=r"chats\.jsonl:line 7: .*chat template.*roles must alternate"):
        encode(twice, "tokenizer", tok)


def test_answer_with_leading_whitespace_is_supervised_whole_with_tokenizer_template():
    """Qwen's template keeps content verbatim: the answer's leading whitespace is part of what the model emits and
    is supervised as with the built-in chatml; it was cut off by searching for the stripped answer. Llama's template
    trims, and so does the built-in llama3: there the stripped answer is what is rendered."""
    conv = Conversation((Message("user", "hi"), Message("assistant", "\n  - padded answer \n")), "t")
    for name, builtin in (("qwen25", "chatml"), ("llama31", "llama3")):
        tok = _tok(name)
        assert supervised_runs(encode(conv, "tokenizer", tok)) == supervised_runs(encode(conv, builtin, tok)), name
    tok = _tok("qwen25")
    assert [tok.decode(r) for r in supervised_runs(encode(conv, "tokenizer", tok))][0].endswith(
        "  - padded answer \n<|im_end|>")


def test_an_answer_is_not_matched_in_a_later_turn():
    """Where spans are searched over the rest of the chat (templates that rewrite earlier turns), the answer is the
    first occurrence of its stripped text; its leading whitespace is added only where the text repeats it. Searching
    the verbatim ' Yes' would have matched the later user turn of a template that trims the answer."""
    from bft_megatron.data.templates import _answer_span

    tok = _tok("qwen25")
    text = "<|im_start|>assistant\nYes<|im_end|>\n<|im_start|>user\nI said Yes<|im_end|>\n"
    start, end = _answer_span(text, 0, len(text), " Yes", tok, "t")
    assert text[start:end] == "Yes<|im_end|>"
    kept = "<|im_start|>assistant\n Yes <|im_end|>\n"  # a verbatim template keeps both sides' whitespace
    start, end = _answer_span(kept, 0, len(kept), " Yes ", tok, "t")
    assert kept[start:end] == " Yes <|im_end|>"
    # without an end-of-turn marker the answer's own trailing whitespace, where rendered, is still its end
    bare = "assistant: Yes \n"
    start, end = _answer_span(bare, 0, len(bare), "Yes \n", tok, "t")
    assert bare[start:end] == "Yes \n"
    # whitespace is added only inside text[lo:hi]: what lies outside belongs to the turns around it
    start, end = _answer_span(kept, kept.index("Yes"), len(kept), " Yes ", tok, "t")
    assert (start, kept[start:end]) == (kept.index("Yes"), "Yes <|im_end|>")
    start, end = _answer_span(bare, 0, bare.index(" \n"), "Yes \n", tok, "t")
    assert bare[start:end] == "Yes"


def _reference_char_offsets(sp, text: str, base: int) -> tuple[list[int], list[tuple[int, int]]]:
    """The per-character mapping the vectorised SPTokenizer._encode_plain replaced (byte -> character offsets)."""
    proto = sp.encode(text, return_type="proto")
    raw = text.encode("utf-8")
    char_of_byte, pos = [0] * (len(raw) + 1), 0
    for ci, ch in enumerate(text):
        for b in range(len(ch.encode("utf-8"))):
            char_of_byte[pos + b] = ci
        pos += len(ch.encode("utf-8"))
    char_of_byte[len(raw)] = len(text)
    return ([int(p.id) for p in proto.pieces],
            [(base + char_of_byte[p.begin], base + char_of_byte[p.end]) for p in proto.pieces])


@pytest.mark.parametrize("byte_fallback", [False, True])
def test_sentencepiece_offsets_are_character_offsets_for_multibyte_text(tmp_path, byte_fallback):
    """ASCII, 2-, 3- and 4-byte characters, unknown ones (byte fallback splits a character over several
    pieces), control symbols in the text, an empty text: the same ids and character offsets as a per-character
    mapping."""
    import io

    import sentencepiece as spm

    from tests.data_fixtures import CORPUS

    model = io.BytesIO()
    extra = ["Mikrozephalie ist häufig, Ödem: 頭囲 小さい"]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS + extra), model_writer=model, vocab_size=400,
                                   hard_vocab_limit=False, num_threads=1, byte_fallback=byte_fallback, minloglevel=2)
    (tmp_path / "m.model").write_bytes(model.getvalue())
    tok = load_tokenizer(str(tmp_path / "m.model"))
    texts = ["", "plain ascii text.", "Ödem und Mikrozephalie: häufig ✓", "頭囲が小さい 🧬 gene ASPM",
             "🧬🧬 x", "  leading   and trailing  ", f"a{tok.eos_token}b ü{tok.eos_token}"]
    for text in texts:
        expected_ids: list[int] = []
        expected_offsets: list[tuple[int, int]] = []
        pos = 0
        for part in tok._split.split(text) if tok._split else [text]:
            if part in tok._controls:
                expected_ids.append(tok._controls[part])
                expected_offsets.append((pos, pos + len(part)))
            elif part:
                ids, offs = _reference_char_offsets(tok._sp, part, pos)
                expected_ids += ids
                expected_offsets += offs
            pos += len(part)
        ids, offsets = tok.encode_offsets(text)
        assert (ids, offsets) == (expected_ids, expected_offsets), text
        assert all(type(i) is int for i in ids) and all(type(o) is tuple for o in offsets)


PROMPT_HOLDS_ANSWER = [  # the answer's words stand earlier in a user message, closed by the end-of-turn marker
    (Conversation((Message("user", "Is 7 prime? Answer Yes or No."), Message("assistant", "Yes")), "t:1"), ["Yes"]),
    (Conversation((Message("user", "Just say OK"), Message("assistant", "OK"), Message("user", "Thanks"),
                   Message("assistant", "You are welcome.")), "t:2"), ["OK", "You are welcome."]),
]


@pytest.mark.parametrize("tok_name,eot", [("thinking", "<|im_end|>"), ("rewriting", "<|im_end|>"),
                                          ("qwen25", "<|im_end|>"), ("llama31", "<|eot_id|>")])
@pytest.mark.parametrize("conv,answers", PROMPT_HOLDS_ANSWER, ids=["one_turn", "two_turns"])
def test_answer_words_in_the_prompt_are_not_supervised(tok_name, eot, conv, answers):
    """A generation prompt that opens text the full chat lacks (QwQ's and R1-Distill's '<think>\\n') or a template
    that rewrites earlier turns sends the answer search to its fallback; it must start after the prompt the turn
    shares with the full chat, not at the chat's start (where it took the user's words, and the rest of the chat,
    as the answer)."""
    tok = _tok(tok_name)
    assert [tok.decode(r) for r in supervised_runs(encode(conv, "tokenizer", tok))] == [a + eot for a in answers]
    rendered = render(conv, "tokenizer", tok)
    for start, end in rendered.spans:  # in the assistant's turn, not in the user's that says the same words
        assert rendered.text.rfind("assistant", 0, start) > rendered.text.rfind("user", 0, start)


def test_an_assistant_first_chat_is_not_matched_in_the_injected_system_prompt():
    tok = _tok("qwen25")  # its default system prompt says "You are a helpful assistant."
    conv = Conversation((Message("assistant", "helpful"), Message("user", "Thanks")), "t:3")
    assert [tok.decode(r) for r in supervised_runs(encode(conv, "tokenizer", tok))] == ["helpful<|im_end|>"]


def test_a_rewritten_turn_without_end_marker_is_an_error_not_a_span_to_the_chat_end():
    tok = _tok("rewriting_hashes")  # earlier answers rewritten, turns closed by ' ###' (no known marker)
    with pytest.raises(DataError, match=r"t:2: cannot tell where assistant answer 'OK' ends"):
        encode(PROMPT_HOLDS_ANSWER[1][0], "tokenizer", tok)
    conv = PROMPT_HOLDS_ANSWER[0][0]  # the last turn may keep what its template appended
    assert [tok.decode(r) for r in supervised_runs(encode(conv, "tokenizer", tok))] == ["Yes ###"]


@pytest.mark.parametrize("answer", ["n", ">", "think", "Fine."])
def test_text_the_template_writes_before_the_answer_is_not_supervised(answer):
    """Qwen3's template writes an empty think block between the turn's header and the answer: an answer whose
    words occur in it was matched there (the block and the answer supervised), before the stand-in anchor."""
    tok = _tok("qwen3")
    conv = Conversation((Message("user", "Continue? (y/n)"), Message("assistant", answer)), "t:4")
    assert [tok.decode(r) for r in supervised_runs(encode(conv, "tokenizer", tok))] == [answer + "<|im_end|>"]


def test_an_answer_that_opens_with_the_generation_prompts_text_is_found():
    """Qwen3-Thinking's generation prompt ends with '<think>\\n', inside an answer that starts with its reasoning:
    the answer begins before the point where the chat with a stand-in departs (it was 'not found')."""
    tok = _tok("qwen3")
    answer = "<think>\nThe user asks 2+2.\n</think>\n\n4"
    conv = Conversation((Message("user", "2+2?"), Message("assistant", answer), Message("user", "And 3+3?"),
                         Message("assistant", "6")), "t:5")
    runs = [tok.decode(r) for r in supervised_runs(encode(conv, "tokenizer", tok))]
    assert runs == [answer + "<|im_end|>", "6<|im_end|>"]


def test_the_last_answer_gets_the_end_of_turn_the_template_writes_between_turns():
    """Qwen1.5-Chat's template writes '<|im_end|>' only between turns: every answer was trained without a stop.
    An earlier answer's marker lies past its own partial rendering; the last one's is taken from the chat with a
    user turn after it and written into the text."""
    tok = _tok("qwen15")
    enc = encode(CONV, "tokenizer", tok)
    assert [tok.decode(r) for r in supervised_runs(enc)] == [a + "<|im_end|>" for a in ANSWERS]
    assert tok.decode(enc.tokens.tolist()).endswith(ANSWERS[1] + "<|im_end|>")


def test_a_template_that_writes_no_end_of_turn_is_warned_about():
    with logged(logging.WARNING) as records:
        check_template("tokenizer", _tok("role_tags"))
    assert any("writes nothing after an assistant answer that closes it" in r.getMessage() and
               "the model is not trained to stop" in r.getMessage() for r in records)
    with logged(logging.WARNING) as records:
        for name in ("qwen25", "llama31", "qwen15", "qwen3", "hashes"):
            check_template("tokenizer", _tok(name))
    assert not records


def test_a_header_that_depends_on_the_answer_still_finds_it():
    """A template whose text before the answer depends on it departs from the stand-in's chat before the answer:
    no occurrence covers that point, so the first one after it is the answer (it was 'not found')."""
    from tests.data_fixtures import _build_hf

    tok = load_tokenizer(_build_hf("qwen", (
        "{%- for m in messages %}{%- if m['role'] == 'assistant' and '```' in m['content'] %}"
        "{{- '<|im_start|>assistant [code]\\n' }}{%- else %}{{- '<|im_start|>' + m['role'] + '\\n' }}{%- endif %}"
        "{{- m['content'] + '<|im_end|>\\n' }}{%- endfor %}")))
    conv = Conversation((Message("user", "Code?"), Message("assistant", "```print(1)```")), "t:6")
    assert [tok.decode(r) for r in supervised_runs(encode(conv, "tokenizer", tok))] == ["```print(1)```<|im_end|>"]


def test_an_answer_that_starts_like_the_stand_in_is_found():
    tok = _tok("qwen25")
    conv = Conversation((Message("user", "Q"), Message("assistant", "\x00\x01"), Message("user", "R"),
                         Message("assistant", "\x00y")), "t:7")
    assert [r[1] - r[0] for r in render(conv, "tokenizer", tok).spans] == [2 + len("<|im_end|>"), 2 + len("<|im_end|>")]

