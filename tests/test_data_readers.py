"""Readers (json/jsonl/parquet through datasets), record shapes, and every bad-input path."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from bft_megatron.data.errors import DataError, SkipLog
from bft_megatron.data.readers import read_records
from bft_megatron.data.records import Message, to_conversation
from tests.data_fixtures import CHATS, write_jsonl


def _convs(path: Path, policy: str = "raise", fmt: str = "auto"):
    skips = SkipLog(policy=policy)
    out = []
    for raw in read_records(str(path), None, skips, cache_dir=str(path.parent / "cache")):
        try:
            out.append(to_conversation(raw.data, fmt, raw.where))
        except DataError as err:
            skips.handle(err, "invalid_record")
    return out, skips


EXPECTED_ROLES = [("system", "user", "assistant", "user", "assistant"), ("user", "assistant"),
                  ("user", "assistant"), ("user", "assistant")]


def test_jsonl_all_shapes(tmp_path):
    convs, skips = _convs(write_jsonl(tmp_path / "a.jsonl", CHATS))
    assert [tuple(m.role for m in c.messages) for c in convs] == EXPECTED_ROLES
    assert convs[1].messages[0] == Message("user", "Define ataxia.\n\nAnswer in one sentence.")
    assert convs[1].messages[1].content == "Poor coordination of movement."
    assert convs[2].messages == (Message("user", "Hello, how are you?"), Message("assistant", "Fine, thank you."))
    assert convs[0].origin.endswith("a.jsonl:line 1") and convs[3].origin.endswith("a.jsonl:line 4")
    assert skips.total == 0


def test_json_array_and_parquet_match_jsonl(tmp_path):
    import datasets

    (tmp_path / "a.json").write_text(json.dumps(CHATS), encoding="utf-8")
    ref, _ = _convs(write_jsonl(tmp_path / "c.jsonl", CHATS))
    got, _ = _convs(tmp_path / "a.json")
    assert [c.messages for c in got] == [c.messages for c in ref]
    # Dataset.from_list takes its schema from the first record, so give parquet one shape only
    datasets.Dataset.from_list([CHATS[0], CHATS[3]]).to_parquet(str(tmp_path / "b.parquet"))
    got, _ = _convs(tmp_path / "b.parquet")
    assert [c.messages for c in got] == [ref[0].messages, ref[3].messages]
    assert _convs(tmp_path / "b.parquet")[0][1].origin.endswith("b.parquet:row 1")


def test_directory_reads_files_in_sorted_order(tmp_path):
    d = tmp_path / "dir"
    d.mkdir()
    write_jsonl(d / "b.jsonl", CHATS[3:4])
    write_jsonl(d / "a.jsonl", CHATS[2:3])
    (d / "notes.txt").write_text("ignored")
    convs, _ = _convs(d)
    assert [c.messages[1].content for c in convs] == ["Fine, thank you.", "The quick brown fox."]


def test_blank_lines_keep_true_line_numbers(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text(f"\n{json.dumps(CHATS[2])}\n\n{json.dumps({'prompt': 'x'})}\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"a\.jsonl:line 4: missing field 'response'"):
        _convs(p)


BAD = [
    ('{"prompt": "a", "response": "b"', "malformed JSON"),
    (json.dumps({"messages": [{"role": "robot", "content": "x"}]}), "unknown role 'robot'"),
    (json.dumps({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}), "missing field 'content'"),
    (json.dumps({"messages": [{"content": "x"}]}), "missing field 'role'"),
    (json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}),
     "empty assistant turn"),
    (json.dumps({"messages": [{"role": "user", "content": " \n"}, {"role": "assistant", "content": "a"}]}),
     "messages[0]: empty user turn"),
    (json.dumps({"messages": [{"role": "user", "content": "q"}]}), "no assistant turn"),
    (json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"},
                              {"role": "assistant", "content": "a"}]}), "system message is only allowed first"),
    (json.dumps({"messages": "hello"}), "must be a list"),
    (json.dumps({"instruction": "do it"}), "missing field 'output'"),
    (json.dumps({"prompt": "p", "response": 3}), "must be a string"),
    (json.dumps({"prompt": "p"}), "missing field 'response'"),
    (json.dumps({"text": "just text"}), "unrecognised record shape"),
    (json.dumps(["not", "an", "object"]), "must be a JSON object"),
]


@pytest.mark.parametrize("line,message", BAD, ids=[m for _, m in BAD])
def test_bad_record_names_file_line_and_problem(tmp_path, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", CHATS[2:4], raw_lines=[line])
    with pytest.raises(DataError) as info:
        _convs(path)
    assert "bad.jsonl:line 3" in str(info.value) and message in str(info.value)


def test_skip_policy_counts_and_keeps_good_records(tmp_path):
    lines = [BAD[0][0], BAD[1][0], BAD[4][0]]
    path = write_jsonl(tmp_path / "mixed.jsonl", CHATS[2:4], raw_lines=lines)
    convs, skips = _convs(path, policy="skip")
    assert len(convs) == 2
    assert skips.counts == {"malformed_json": 1, "invalid_record": 2}
    assert any("mixed.jsonl:line 3" in e for e in skips.examples)


def test_a_malformed_line_is_reported_once_with_its_line_number(tmp_path, capfd):
    """datasets' JSON builder logged "Failed to load JSON ... in row 1" (0-based) before the fallback's DataError
    named "line 3" of the same file: two reports, numbered differently."""
    path = write_jsonl(tmp_path / "bad.jsonl", CHATS[2:4], raw_lines=[BAD[0][0]])
    capfd.readouterr()
    with pytest.raises(DataError, match=r"bad\.jsonl:line 3: malformed JSON \(Expecting ',' delimiter at column 32\)"):
        _convs(path)  # the column where the cut-short line ends, not column 1 of the text after its newline
    out, err = capfd.readouterr()
    assert "Failed to load JSON" not in out + err and "in row" not in out + err


def test_malformed_json_array_names_line(tmp_path):
    p = tmp_path / "a.json"
    p.write_text('[\n {"prompt": "a", "response": "b"},\n {"prompt": }\n]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"a\.json:line 3: malformed JSON"):
        _convs(p)
    convs, skips = _convs(p, policy="skip")
    assert convs == [] and skips.counts == {"malformed_json": 1} and "whole file" in skips.examples[0]


def test_turns_after_the_last_answer_are_dropped():
    """A chat ending on a question trains nothing on it: the trailing turns are left out (tokens saved, and the
    last answer renders as the last turn)."""
    record = {"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                           {"role": "user", "content": "q2"}]}
    assert to_conversation(record, "auto", "x").messages == (Message("user", "q1"), Message("assistant", "a1"))


def test_sharegpt_conversations_map_roles_and_keep_the_rules():
    """ShareGPT (``conversations`` of ``from``/``value``; human/gpt or user/assistant; optional ``system``)."""
    record = {"system": "You are a clinician.",
              "conversations": [{"from": "human", "value": "Define ataxia."},
                                {"from": "gpt", "value": "Poor coordination."},
                                {"from": "user", "value": "And chorea?"},
                                {"from": "assistant", "value": "Jerky moves."}]}
    conv = to_conversation(record, "auto", "x.jsonl:line 1")
    assert conv.messages == (Message("system", "You are a clinician."), Message("user", "Define ataxia."),
                             Message("assistant", "Poor coordination."), Message("user", "And chorea?"),
                             Message("assistant", "Jerky moves."))
    assert to_conversation(record, "sharegpt", "x").messages == conv.messages
    bad = [({"conversations": [{"from": "tool", "value": "{}"}]}, "conversations[0]: unknown role 'tool'"),
           ({"conversations": [{"from": "human"}]}, "conversations[0]: missing field 'value'"),
           ({"conversations": [{"from": "human", "value": "q"}, {"from": "system", "value": "s"}]},
            "conversations[1]: a system message is only allowed first"),
           ({"system": "s", "conversations": [{"from": "system", "value": "s2"}, {"from": "gpt", "value": "a"}]},
            "both a 'system' field and a system turn"),
           ({"conversations": [{"from": "human", "value": "q"}]}, "no assistant turn")]
    for rec, message in bad:
        with pytest.raises(DataError, match=re.escape(message)):
            to_conversation(rec, "auto", "x.jsonl:line 2")
    with pytest.raises(DataError, match="field 'conversations' must be a list"):
        to_conversation({"messages": [], "conversations": None}, "sharegpt", "x")


@pytest.mark.parametrize("record,fmt", [
    ({"system": "Be brief.", "instruction": "Define ataxia.", "input": "", "output": "Poor coordination."}, "alpaca"),
    ({"system": "Be brief.", "prompt": "Define ataxia.", "response": "Poor coordination."}, "prompt_response"),
    ({"system": "Be brief.", "conversations": [{"from": "human", "value": "Define ataxia."},
                                               {"from": "gpt", "value": "Poor coordination."}]}, "sharegpt"),
])
def test_optional_system_field_becomes_the_first_turn(record, fmt):
    """A record's top-level 'system' (LLaMA-Factory's column) is the chat's system turn, auto-detected or named."""
    want = (Message("system", "Be brief."), Message("user", "Define ataxia."),
            Message("assistant", "Poor coordination."))
    for name in (fmt, "auto"):
        assert to_conversation(record, name, "test").messages == want
    without = {k: v for k, v in record.items() if k != "system"}
    assert to_conversation(without, fmt, "test").messages == want[1:]


def test_json_data_wrapper_is_unwrapped(tmp_path):
    """docs/data.md: a .json file holds a list of records or ``{"data": [...]}``. datasets reads the wrapper as one
    row with a 'data' column, which used to become one 'unrecognised record shape' error."""
    (tmp_path / "w.json").write_text(json.dumps({"version": "1", "data": CHATS}), encoding="utf-8")
    ref, _ = _convs(write_jsonl(tmp_path / "c.jsonl", CHATS))
    got, skips = _convs(tmp_path / "w.json")
    assert [c.messages for c in got] == [c.messages for c in ref] and skips.total == 0
    assert got[3].origin.endswith("w.json:record 3")


def test_records_with_a_data_field_are_not_unwrapped(tmp_path):
    """Only a file that is a {"data": [...]} object is unwrapped: a list of records that carry a 'data' field
    (a list or not), even a list of one, yields those records, as the json module reads them; so does a .jsonl
    file. A one-record list used to yield the items of its 'data' field as the records."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rec = {"prompt": "Define ataxia.", "response": "Poor coordination.", "data": ["a", "b"]}
    cases = {"one.json": json.dumps([rec]), "two.json": json.dumps([rec, rec]),
             "text.json": json.dumps([{**rec, "data": "notes"}]), "line.jsonl": json.dumps(rec) + "\n",
             "lines.json": json.dumps(rec) + "\n" + json.dumps(rec) + "\n",  # JSON lines in a .json file
             "textline.json": json.dumps({**rec, "data": "notes"}) + "\n"}
    want = {"line.jsonl": [rec], "lines.json": [rec, rec], "textline.json": [{**rec, "data": "notes"}],
            "one.parquet": [rec]}
    pq.write_table(pa.Table.from_pylist([rec]), tmp_path / "one.parquet")
    for name in [*cases, "one.parquet"]:
        if name in cases:
            (tmp_path / name).write_text(cases[name], encoding="utf-8")
        got = [r.data for r in read_records(str(tmp_path / name), None, SkipLog(policy="raise"),
                                            cache_dir=str(tmp_path / "cache"))]
        assert got == (want[name] if name in want else json.loads(cases[name])), name


def test_strings_that_look_like_timestamps_stay_strings(tmp_path):
    """Arrow's JSON reader turns a top-level column of strings such as "2021-03-04" into timestamps; JSON has no
    timestamp type, so such records used to fail as "must be a string, got datetime"."""
    path = write_jsonl(tmp_path / "dates.jsonl", [{"prompt": "When was it described?", "response": "2021-03-04"}])
    convs, skips = _convs(path)
    assert convs[0].messages[1] == Message("assistant", "2021-03-04") and skips.total == 0
    alpaca = [{"system": "2024-07-26", "instruction": "Date of the update?", "output": "2021-03-05 10:00:00"}] * 2
    convs, _ = _convs(write_jsonl(tmp_path / "alpaca.jsonl", alpaca))
    assert convs[1].messages == (Message("system", "2024-07-26"), Message("user", "Date of the update?"),
                                 Message("assistant", "2021-03-05 10:00:00"))
    assert convs[1].origin.endswith("alpaca.jsonl:line 2")


def test_a_parquet_timestamp_column_is_read_as_is(tmp_path):
    """Parquet has a real timestamp type: a metadata column of them (created_at) is no misread JSON string, so the
    file is read by datasets as usual, not refused."""
    import datetime

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": "Define ataxia.", "response": "Poor coordination.",
             "created_at": datetime.datetime(2021, 3, 4, 10, 0)}] * 2
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    convs, skips = _convs(tmp_path / "t.parquet")
    assert [c.messages[1] for c in convs] == [Message("assistant", "Poor coordination.")] * 2 and skips.total == 0


def test_nested_strings_that_look_like_timestamps_stay_strings(tmp_path):
    """Arrow also types nested strings as timestamps: inside the records of a {"data": [...]} file, and the turns of
    'messages'. Only top-level columns were looked at, so these records still failed as "got datetime"."""
    qa = [{"prompt": "When was it described?", "response": "2021-03-04"}] * 2
    (tmp_path / "w.json").write_text(json.dumps({"data": qa}), encoding="utf-8")
    convs, skips = _convs(tmp_path / "w.json")
    assert [c.messages[1] for c in convs] == [Message("assistant", "2021-03-04")] * 2 and skips.total == 0
    chat = {"messages": [{"role": "user", "content": "2021-03-04"}, {"role": "assistant", "content": "2021-03-05"}]}
    convs, skips = _convs(write_jsonl(tmp_path / "m.jsonl", [chat, chat]))
    assert convs[1].messages == (Message("user", "2021-03-04"), Message("assistant", "2021-03-05"))
    assert convs[1].origin.endswith("m.jsonl:line 2") and skips.total == 0


def test_json_lines_in_a_json_file_name_the_bad_line(tmp_path):
    """datasets reads a .json file laid out as JSON lines; when one line is bad, the json-module re-read must not
    call the whole file unreadable (naming line 2, "Extra data") and, under skip, drop every good record."""
    p = tmp_path / "lines.json"
    p.write_text("\n".join([json.dumps(CHATS[2]), json.dumps(CHATS[3]), '{"prompt": ', json.dumps(CHATS[1])]) + "\n",
                 encoding="utf-8")
    with pytest.raises(DataError, match=r"lines\.json:line 3: malformed JSON"):
        _convs(p)
    convs, skips = _convs(p, policy="skip")
    assert [c.origin.rsplit(":", 1)[1] for c in convs] == ["line 1", "line 2", "line 4"]
    assert skips.counts == {"malformed_json": 1} and "lines.json:line 3" in skips.examples[0]
    p.write_text("\n" + p.read_text(encoding="utf-8"), encoding="utf-8")  # a leading blank line: still JSON lines
    with pytest.raises(DataError, match=r"lines\.json:line 4: malformed JSON"):
        _convs(p)


@pytest.mark.parametrize("record,message", [
    ({"system": "S", "conversations": [{"from": "human", "value": " "}, {"from": "gpt", "value": "a"}]},
     "conversations[0]: empty user turn"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "\n"}]},
     "conversations[1]: empty assistant turn"),
    ({"instruction": "Define ataxia.", "output": "  "}, "field 'output': empty assistant turn"),
    ({"instruction": " ", "input": "", "output": "a"}, "field 'instruction': empty user turn"),
    ({"system": "S", "prompt": "p", "response": "\n"}, "field 'response': empty assistant turn"),
    ({"prompt": "", "response": "r"}, "field 'prompt': empty user turn"),
])
def test_empty_turn_errors_name_the_records_own_field(record, message):
    """An empty turn is named by the record's own field and index: ShareGPT's 'conversations[i]' (not a shifted
    'messages[i+1]' when a 'system' field is present), alpaca's 'output', prompt/response's 'prompt'."""
    with pytest.raises(DataError) as info:
        to_conversation(record, "auto", "f.jsonl:line 3")
    assert str(info.value) == f"f.jsonl:line 3: {message}"


def test_a_role_that_is_not_a_string_is_a_data_error(tmp_path):
    """A list or object as the role used to escape as a bare TypeError (unhashable type), with no file or line,
    that aborted prepare even under on_error: skip."""
    lines = [json.dumps({"messages": [{"role": ["user"], "content": "q"}, {"role": "assistant", "content": "a"}]}),
             json.dumps({"conversations": [{"from": {"name": "human"}, "value": "q"}]})]
    _two_bad_lines(tmp_path / "roles.jsonl", lines, r"roles\.jsonl:line 2: messages\[0\]: unknown role \['user'\]",
                   "roles.jsonl:line 3: conversations[0]: unknown role {'name': 'human'}")


def _two_bad_lines(path, lines: list[str], raised: str, second_skip: str) -> None:
    """One good chat then ``lines``: the first bad line raises ``raised``; under skip both are counted and the
    second's example contains ``second_skip``."""
    write_jsonl(path, CHATS[2:3], raw_lines=lines)
    with pytest.raises(DataError, match=raised):
        _convs(path)
    convs, skips = _convs(path, policy="skip")
    assert len(convs) == 1 and skips.counts == {"invalid_record": 2}
    assert second_skip in skips.examples[1]


def test_a_lone_surrogate_is_a_data_error_naming_the_field(tmp_path):
    r"""JSON can escape half of a surrogate pair ("\ud83d" from a cut emoji); Arrow refuses it and the json module
    returns a str no tokenizer encodes: the tokenizer's TypeError used to abort prepare with no file or line."""
    lines = ['{"prompt": "Fever \\ud83d and rash?", "response": "Measles."}',
             '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a \\udc00"}]}']
    _two_bad_lines(tmp_path / "s.jsonl", lines,
                   r"s\.jsonl:line 2: field 'prompt': not valid Unicode .*'\\ud83d' at character 6",
                   "s.jsonl:line 3: messages[1]: 'content' is not valid Unicode")


def test_messages_with_a_top_level_system_field_keep_it():
    """A top-level 'system' is the system turn for every shape; with 'messages' it used to be dropped silently.
    Both a 'system' field and a system message is ambiguous, as for ShareGPT."""
    record = {"system": "You are a clinician.", "messages": [{"role": "user", "content": "Define ataxia."},
                                                             {"role": "assistant", "content": "Poor coordination."}]}
    assert to_conversation(record, "auto", "x").messages == (
        Message("system", "You are a clinician."), Message("user", "Define ataxia."),
        Message("assistant", "Poor coordination."))
    both = {**record, "messages": [{"role": "system", "content": "Be brief."}, *record["messages"]]}
    with pytest.raises(DataError, match=r"x\.jsonl:line 2: both a 'system' field and a system turn in 'messages'"):
        to_conversation(both, "messages", "x.jsonl:line 2")
    with pytest.raises(DataError, match=r"x:.*no assistant turn"):  # a DataError, not an IndexError
        to_conversation({"system": "S", "messages": []}, "messages", "x")
    repeated = {**record, "messages": [{"role": "system", "content": "You are a clinician."}, *record["messages"]]}
    assert to_conversation(repeated, "auto", "x").messages == to_conversation(record, "auto", "x").messages
    # the same text up to surrounding whitespace is the same system turn: the chat's own (rendered as written)
    spaced = {**record, "messages": [{"role": "system", "content": "You are a clinician.\n"}, *record["messages"]]}
    assert to_conversation(spaced, "auto", "x").messages[0] == Message("system", "You are a clinician.\n")
    # a chat that opens with an answer has no system turn: the field goes first
    opens = {"system": "S", "messages": [{"role": "assistant", "content": "Hello."},
                                         {"role": "user", "content": "Define ataxia."},
                                         {"role": "assistant", "content": "Poor coordination."}]}
    assert [m.role for m in to_conversation(opens, "auto", "x").messages] == [
        "system", "assistant", "user", "assistant"]


def test_a_byte_order_mark_is_not_part_of_the_first_record(tmp_path):
    """Windows editors and pandas' encoding='utf-8-sig' start a file with a UTF-8 byte-order mark. datasets skips
    it; the stdlib fallback (a file with a bad line) read it into line 1 and dropped that valid record as malformed
    JSON, and a {"data": [...]} file's wrapper was not recognised (its first character was the mark)."""
    text = "\n".join(json.dumps(c) for c in CHATS[2:4]) + "\n" + BAD[0][0] + "\n"
    (tmp_path / "bom.jsonl").write_text(text, encoding="utf-8-sig")
    convs, skips = _convs(tmp_path / "bom.jsonl", policy="skip")
    assert len(convs) == 2 and skips.counts == {"malformed_json": 1}
    assert any("bom.jsonl:line 3" in e for e in skips.examples)
    (tmp_path / "bom.json").write_text(json.dumps({"data": CHATS}), encoding="utf-8-sig")
    got, skips = _convs(tmp_path / "bom.json")
    assert len(got) == len(CHATS) and skips.total == 0
