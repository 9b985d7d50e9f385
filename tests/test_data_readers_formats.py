"""Readers: files Arrow misreads (fields of mixed types, rows not one per line, text not UTF-8), gzip-compressed
files, directories with files that would not be read, and datasets' save_to_disk folders."""

from __future__ import annotations

import gzip
import json
import logging
import re
from pathlib import Path

import pytest

from bft_megatron.data.errors import DataError, SkipLog
from bft_megatron.data.readers import local_source_problem, read_records
from tests.data_fixtures import CHATS, DEMO_SP, logged, write_jsonl
from tests.test_data_readers import _convs


def _raw(path: Path, policy: str = "raise", split: str | None = None) -> tuple[list, SkipLog]:
    skips = SkipLog(policy=policy)
    return list(read_records(str(path), split, skips, cache_dir=str(path.parent / "cache"))), skips


def _chat(question, answer) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def test_fields_of_mixed_types_reach_the_records_as_written(tmp_path):
    """datasets 5 reads a field whose type differs between rows (one OpenAI list-of-parts 'content', one numeric
    'output') as JSON text and json.loads every value of it back: the answer '"Yes"' was trained as Yes, '0012'
    became 12, '["A", "B"]' a list, 'true' True, 'null' None."""
    answers = ['"Yes"', "0012", '["BRCA1", "BRCA2"]', "true", "null", '  "padded"  ']
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Which genes?"}]},
                          {"role": "assistant", "content": "x"}]}
    records = [_chat("Which genes?", a) for a in answers] + [parts]
    path = write_jsonl(tmp_path / "mixed.jsonl", records)
    with logged(logging.WARNING) as warnings:
        raws, _ = _raw(path)
    assert [r.data["messages"][1]["content"] for r in raws[:-1]] == answers
    assert raws[-1].data == parts and raws[-1].where.endswith("mixed.jsonl:line 7")
    assert not warnings  # .jsonl is read with the json module: nothing to re-read
    (tmp_path / "mixed.json").write_text(json.dumps(records), encoding="utf-8")  # a .json document goes via Arrow
    with logged(logging.WARNING) as warnings:
        raws, _ = _raw(tmp_path / "mixed.json")
    assert [r.data["messages"][1]["content"] for r in raws[:-1]] == answers and raws[-1].data == parts
    assert "fields of mixed types" in warnings[0].getMessage() and "mixed.json" in warnings[0].getMessage()
    alpaca = [{"instruction": "Count?", "output": "0012"}, {"instruction": "Count?", "output": 12}]
    (tmp_path / "a.json").write_text(json.dumps({"data": alpaca}), encoding="utf-8")  # nested in a {"data"} file
    assert [r.data["output"] for r in _raw(tmp_path / "a.json")[0]] == ["0012", 12]


@pytest.mark.parametrize("text,raised,kept", [
    ("\n" + json.dumps([_chat("Q0", "A0"), _chat("Q1", "A1")]) + "\n",
     r"a\.jsonl:line 2: record must be a JSON object, got list", []),
    (json.dumps(CHATS[2]) + " " + json.dumps(CHATS[3]) + "\n\n" + json.dumps(CHATS[1]) + "\n",
     r"a\.jsonl:line 1: malformed JSON \(Extra data at column \d+\)", ["line 3"]),
    (json.dumps(CHATS[2], indent=2) + "\n" + json.dumps(CHATS[3], indent=2) + "\n",
     r"a\.jsonl:line 1: malformed JSON \(Expecting property name enclosed in double quotes at column 2\): '\{'$", []),
], ids=["array", "two_on_a_line", "pretty_printed"])
def test_jsonl_rows_that_are_not_one_per_line_name_their_line(tmp_path, text, raised, kept):
    """Arrow reads a JSON array, or two objects on a line, as several rows, and an object over several lines as
    one: the line of row i was taken to be the i-th non-blank line, which raised a bare IndexError (even under
    on_error: skip) or named the wrong line (pretty-printed records, which Arrow accepts, were lines 1 and 2)."""
    path = tmp_path / "a.jsonl"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match=raised):
        _convs(path)
    convs, skips = _convs(path, policy="skip")
    assert [c.origin.rsplit(":", 1)[1] for c in convs] == kept and skips.total >= 1


def _gzip(path: Path, text: str) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write(text)
    return path


def test_gzip_compressed_json_files_are_read(tmp_path):
    """.jsonl.gz and .json.gz, as files and in a directory: a folder with part-000.jsonl and part-001.jsonl.gz
    read the first alone; the stdlib re-read and the {"data": [...]} check opened the compressed bytes as text."""
    lines = "\n".join(json.dumps(c) for c in CHATS) + "\n"
    convs, _ = _convs(_gzip(tmp_path / "a.jsonl.gz", lines))
    assert len(convs) == len(CHATS) and convs[3].origin.endswith("a.jsonl.gz:line 4")
    convs, _ = _convs(_gzip(tmp_path / "w.json.gz", json.dumps({"data": CHATS})))
    assert len(convs) == len(CHATS) and convs[3].origin.endswith("w.json.gz:record 3")
    bad = _gzip(tmp_path / "bad.jsonl.gz", lines + '{"prompt": \n' + json.dumps(CHATS[1]) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl\.gz:line 5: malformed JSON"):
        _convs(bad)
    d = tmp_path / "dir"
    d.mkdir()
    write_jsonl(d / "part-000.jsonl", CHATS[:1])
    _gzip(d / "part-001.jsonl.gz", "\n".join(json.dumps(c) for c in CHATS[1:]) + "\n")
    convs, _ = _convs(d)
    assert [c.origin.rsplit("/", 1)[1] for c in convs] == ["part-000.jsonl:line 1"] + [
        f"part-001.jsonl.gz:line {i}" for i in (1, 2, 3)]
    assert local_source_problem(str(d)) is None and local_source_problem(str(bad)) is None
    # a missing .jsonl.gz path is a missing file, not a hub dataset id
    assert local_source_problem("no-such-folder/x.jsonl.gz").startswith("no such file or directory (hub")


def test_a_directory_with_data_files_that_would_not_be_read_is_an_error(tmp_path):
    """Other compressions, Arrow files, CSV... in a data directory were skipped silently; notes are still ignored."""
    d = tmp_path / "dir"
    d.mkdir()
    write_jsonl(d / "a.jsonl", CHATS[:1])
    (d / "README.md").write_text("notes")
    (d / "notes.txt").write_text("notes")
    assert len(_convs(d)[0]) == 1
    for name in ("b.jsonl.bz2", "c.parquet.gz", "d.arrow", "e.csv", "F.JSONL"):
        (d / name).write_bytes(b"x")
    want = "files that would not be read: F.JSONL, b.jsonl.bz2, c.parquet.gz, d.arrow, e.csv (supported: .jsonl"
    with pytest.raises(DataError, match=re.escape(f"dir: {want}")):
        _convs(d)
    assert local_source_problem(str(d)).startswith(want)
    with pytest.raises(DataError, match=r"unsupported file type '\.parquet\.gz'"):
        _convs(d / "c.parquet.gz")


def _save(path: Path, splits: dict[str, list[dict]] | None = None, rows: list[dict] | None = None) -> Path:
    import datasets

    datasets.disable_progress_bars()
    if rows is not None:
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    else:
        datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(str(path))
    return path


def test_save_to_disk_folders_are_read_with_load_from_disk(tmp_path):
    """A save_to_disk folder was read as a directory of its metadata json files ("unrecognised record shape (keys
    ['citation', ...])"). A DatasetDict's split is the source's split (default train)."""
    qa = [{"prompt": f"Q{i}", "response": f"A{i}"} for i in range(3)]
    saved = _save(tmp_path / "saved", rows=qa)
    raws, _ = _raw(saved)
    assert [r.data for r in raws] == qa and raws[2].where == f"{saved}:row 2"
    assert local_source_problem(str(saved)) is None
    dd = _save(tmp_path / "dd", splits={"train": qa[:2], "test": qa[2:]})
    assert [r.where for r in _raw(dd)[0]] == [f"{dd}[train]:row 0", f"{dd}[train]:row 1"]
    assert [r.data for r in _raw(dd, split="test")[0]] == qa[2:]
    with pytest.raises(DataError, match=r"dd: no split 'valid' in this saved DatasetDict \(splits: train, test\)"):
        _raw(dd, split="valid")
    assert local_source_problem(str(dd)) is None
    assert local_source_problem(str(dd), "valid").startswith("no split 'valid'")


def test_a_save_to_disk_source_is_prepared_and_its_files_are_recorded(tmp_path):
    from bft_megatron.config.data import DataConfig, SourceConfig
    from bft_megatron.data.prepare import run
    from bft_megatron.data.provenance import source_record

    # Dataset.from_list takes its schema from the first record: one shape per split
    dd = _save(tmp_path / "dd", splits={"train": [{"prompt": "Q", "response": "A"}], "test": [CHATS[0], CHATS[3]]})
    src = SourceConfig(path=str(dd), split="test")
    stats = run(DataConfig(train=[src], tokenizer=DEMO_SP, output_dir=str(tmp_path / "o")))
    assert stats["train"].records == 2
    names = [f["name"] for f in source_record(src)["files"]]
    assert names == ["dataset_dict.json", "train/state.json", "train/dataset_info.json",
                     "train/data-00000-of-00001.arrow", "test/state.json", "test/dataset_info.json",
                     "test/data-00000-of-00001.arrow"]


LATIN1 = '{"prompt": "Dose in \xb5g?", "response": "5 \xb5g"}'.encode("latin-1")


def test_a_line_that_is_not_utf8_names_its_line(tmp_path):
    """A Windows-1252 'µ' (byte 0xb5) on line 2: "prepare failed: 'utf-8' codec can't decode byte 0xb5 in
    position 8", with no file or line, even under on_error: skip."""
    path = tmp_path / "l.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(CHATS[2]).encode() + b"\n" + LATIN1 + b"\n"
                     + json.dumps(CHATS[3]).encode() + b"\n")  # with a byte-order mark
    with pytest.raises(DataError, match=r"l\.jsonl:line 2: not UTF-8 text \(byte 0xb5 at column 21\): save the "
                                        r"file as UTF-8$"):
        _convs(path)
    convs, skips = _convs(path, policy="skip")
    assert [c.origin.rsplit(":", 1)[1] for c in convs] == ["line 1", "line 3"] and skips.counts == {"not_utf8": 1}
    doc = tmp_path / "d.json"
    doc.write_bytes(b"[\n" + json.dumps(CHATS[2]).encode() + b",\n" + LATIN1 + b"\n]\n")
    with pytest.raises(DataError, match=r"d\.json:line 3: not UTF-8 text \(byte 0xb5 at column 21\).*whole file"):
        _convs(doc)
    assert _convs(doc, policy="skip")[1].counts == {"not_utf8": 1}


def test_a_line_that_is_not_utf8_counts_as_a_record_read(tmp_path, capsys):
    from bft_megatron.data.prepare import main

    path = tmp_path / "l.jsonl"
    path.write_bytes(json.dumps(CHATS[2]).encode() + b"\n" + LATIN1 + b"\n" + json.dumps(CHATS[3]).encode() + b"\n")
    assert main(["--input", str(path), "--tokenizer", DEMO_SP, "--output", str(tmp_path / "o"), "--on-error",
                 "skip", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "records=3 samples=2" in out and "skipped=not_utf8=1" in out and "l.jsonl:line 2: not UTF-8" in out


def test_json_lines_with_a_raw_line_separator_name_the_bad_line(tmp_path):
    """U+2028 is valid raw inside a JSON string, but str.splitlines() split the first line there, so a .json file
    of JSON lines with one bad line was taken as one broken document: all of it one whole-file skip."""
    rec = _chat("line\u2028sep", "ok")
    path = tmp_path / "u.json"
    path.write_text("\n".join([json.dumps(rec, ensure_ascii=False)] * 3 + ['{"broken']) + "\n", encoding="utf-8")
    raws, skips = _raw(path, policy="skip")
    assert [r.data for r in raws] == [rec] * 3 and skips.counts == {"malformed_json": 1}
    assert "u.json:line 4: malformed JSON" in skips.examples[0]


def test_an_unreadable_file_says_so_and_a_damaged_gzip_file_says_that(tmp_path):
    from bft_megatron.data.json_text import read_jsonl_stdlib

    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(b'{"prompt": "q", "response": "a"}\n' * 50)[:40])
    with pytest.raises(DataError, match=r"cut\.jsonl\.gz:line \d+: cannot decompress the gzip file \("):
        list(read_jsonl_stdlib(tmp_path / "cut.jsonl.gz", SkipLog()))
    (tmp_path / "d.jsonl").mkdir()  # any OSError of a plain file (here: a directory), not a gzip problem
    with pytest.raises(DataError, match=r"d\.jsonl:line 1: cannot read the file \(\[Errno 21\]"):
        list(read_jsonl_stdlib(tmp_path / "d.jsonl", SkipLog()))
