"""``bft-megatron prepare`` keeps a split that is up to date (same sources by content, tokenizer, settings, rules)
and rebuilds one that is not, saying why; ``--force`` always rebuilds."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest

from bft_megatron.data.prepare import main
from tests.data_fixtures import CHATS, DEMO_SP, logged, synthetic_chats, write_jsonl

RUN = ["--seq-length", "128", "--no-progress"]


def _inode(out: Path, split: str = "train") -> int:
    """A rebuilt split is a new directory moved into place (storage.replace_split): new files, new inodes."""
    return os.stat(out / split / "tokens.npy").st_ino


def _run(args: list[str], capsys) -> tuple[str, list[str]]:
    """(stdout, log messages at INFO and above) of one prepare run, which must succeed."""
    with logged(logging.INFO) as records:
        assert main(args) == 0
    return capsys.readouterr().out, [r.getMessage() for r in records]


@pytest.fixture
def prepared(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", synthetic_chats(40) + CHATS)
    out = tmp_path / "o"
    args = ["--input", str(src), "--tokenizer", DEMO_SP, "--output", str(out)] + RUN
    first = _run(args, capsys)
    return args, src, out, first


def test_an_up_to_date_split_is_kept_with_its_recorded_summary_and_warnings(prepared, capsys):
    args, _, out, (summary, messages) = prepared
    before = _inode(out)
    again, again_messages = _run(args, capsys)
    assert _inode(out) == before
    assert f"{out / 'train'} is up to date (same sources, tokenizer and settings): kept" in again_messages
    assert again.startswith(f"up to date: {out} ") and "[train] up to date: kept as prepared before" in again
    # the recorded statistics give the same summary lines and the same warnings (truncation: 16 of 44)
    assert [line for line in summary.splitlines() if "records=" in line or "efficiency=" in line] == \
           [line for line in again.splitlines() if "records=" in line or "efficiency=" in line]
    warned = [m for m in messages if "truncated" in m]
    assert warned and warned == [m for m in again_messages if "truncated" in m]
    assert "reading" not in " ".join(again_messages)  # no source was read


def test_force_rebuilds_an_up_to_date_split(prepared, capsys):
    args, _, out, (summary, _) = prepared
    before = _inode(out)
    again, _ = _run(args + ["--force"], capsys)
    assert _inode(out) != before and "[train] tokenized 44 records" in again


@pytest.mark.parametrize("change, reason", [
    (["--seq-length", "256"], "data.seq_length: prepared 128, configured 256"),
    (["--template", "llama3"], "data.template: prepared chatml, configured llama3"),
    (["--seed", "5"], "data.seed: prepared 1234, configured 5"),
    (["--supervise", "last"], "data.supervise: prepared all, configured last"),
])
def test_a_changed_setting_rebuilds_and_says_why(prepared, capsys, change, reason):
    args, _, out, _ = prepared
    before = _inode(out)
    again, messages = _run(args + change, capsys)
    assert _inode(out) != before and "[train] tokenized" in again
    assert any(m.startswith(f"{out / 'train'} is rebuilt: ") and reason in m for m in messages), messages


def test_changed_sources_or_tokenizer_rebuild_and_a_touched_source_does_not(prepared, capsys, tmp_path):
    args, src, out, _ = prepared
    os.utime(src, ns=(10**18, 10**18))  # touched, same contents: kept, and the new mtime recorded
    before = _inode(out)
    _, messages = _run(args, capsys)
    assert _inode(out) == before and any("recorded the new mtimes" in m for m in messages)
    index = json.loads((out / "train" / "index.json").read_text())
    assert index["sources"][0]["files"][0]["mtime_ns"] == 10**18

    lines = src.read_bytes().splitlines(keepends=True)
    src.write_bytes(b"".join([lines[1], lines[0]] + lines[2:]))  # same size, other contents
    _, messages = _run(args, capsys)
    assert _inode(out) != before and any("same size but other contents" in m for m in messages)

    before = _inode(out)
    _, messages = _run(args + ["--input", str(src) + ":2.0"], capsys)  # a second source
    assert _inode(out) != before and any("prepared from 1 source(s)" in m for m in messages)

    other = tmp_path / "tok"
    other.mkdir()
    copy = shutil.copy(DEMO_SP, other)  # the same tokenizer file elsewhere: same fingerprint, kept
    before = _inode(out)
    _run(args[:2] + ["--input", str(src) + ":2.0", "--tokenizer", str(copy)] + args[4:], capsys)
    assert _inode(out) == before
    renamed = str(shutil.copy(DEMO_SP, other / "renamed.model"))  # a file's name is part of its fingerprint
    _, messages = _run(args[:2] + ["--input", str(src) + ":2.0", "--tokenizer", renamed] + args[4:], capsys)
    assert _inode(out) != before and any("is rebuilt: data.tokenizer: prepared with" in m for m in messages)


def test_a_valid_split_added_later_is_prepared_beside_the_kept_train_split(prepared, capsys):
    args, src, out, _ = prepared
    before = _inode(out)
    summary, _ = _run(args + ["--valid", str(src)], capsys)
    assert _inode(out) == before and "[train] up to date" in summary and "[valid] tokenized 44 records" in summary
    assert summary.startswith(f"prepared {out} ")


def test_a_split_the_index_cannot_vouch_for_is_rebuilt(prepared, capsys):
    """An unreadable split; an index without a source's file record (a hub dataset: its revision is not recorded);
    an index of an older version that does not record a setting."""
    args, _, out, _ = prepared
    (out / "train" / "loss_mask.npy").unlink()
    _, messages = _run(args, capsys)
    assert any(f"{out / 'train'} is rebuilt: it cannot be read" in m for m in messages), messages

    index_path = out / "train" / "index.json"
    index = json.loads(index_path.read_text())
    del index["sources"][0]["files"]
    index_path.write_text(json.dumps(index))
    _, messages = _run(args, capsys)
    assert any("a hub dataset's revision is not recorded, so it is read again" in m for m in messages), messages

    index = json.loads(index_path.read_text())
    del index["reasoning_format"]
    index_path.write_text(json.dumps(index))
    _, messages = _run(args, capsys)
    assert any("is rebuilt: its index.json does not record data.reasoning_format" in m for m in messages), messages


def test_a_kept_split_records_where_its_tokenizer_and_sources_are_now(prepared, capsys, tmp_path):
    """The same tokenizer and source files (by content) moved: the split is kept, and its index.json names them
    where they are now, as a rebuild would. The exporter and the checkpoint's hf/ copy take the tokenizer of data
    prepared into data.output_dir from that record: the old path, gone, exported no tokenizer."""
    from bft_megatron.convert.sources import training_tokenizer

    args, src, out, _ = prepared
    (tmp_path / "moved").mkdir()
    tok = shutil.copy(DEMO_SP, tmp_path / "moved")  # its file name is part of its fingerprint
    moved_src = shutil.move(src, tmp_path / "moved" / "chats.jsonl")
    before = _inode(out)
    _, messages = _run(["--input", str(moved_src), "--tokenizer", str(tok)] + args[4:], capsys)
    assert _inode(out) == before and any("recorded the tokenizer's path" in m for m in messages), messages
    index = json.loads((out / "train" / "index.json").read_text())
    assert index["tokenizer"]["path"] == str(tok) and index["sources"][0]["path"] == str(moved_src)
    assert index["sources"][0]["files"][0]["name"] == "chats.jsonl"
    assert index["stats"]["per_source"][0]["path"] == str(moved_src)
    assert training_tokenizer({"data": {"output_dir": str(out)}}) == str(tok)
    _, messages = _run(["--input", str(moved_src), "--tokenizer", str(tok)] + args[4:], capsys)
    assert _inode(out) == before and not any("recorded" in m for m in messages)  # nothing more to record


def test_an_up_to_date_output_directory_is_not_written_to(prepared, capsys, monkeypatch):
    """Every split kept: no scratch directory is made in the output directory (a team's prepared data, read-only to
    this user, failed with a PermissionError traceback although nothing was to be prepared)."""
    from bft_megatron.data import pipeline

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied", kwargs.get("dir"))

    monkeypatch.setattr(pipeline.tempfile, "TemporaryDirectory", refused)
    args, _, out, _ = prepared
    again, _ = _run(args, capsys)
    assert again.startswith(f"up to date: {out} ")


def test_a_kept_split_with_skipped_records_does_not_promise_their_names(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", CHATS, raw_lines=["{not json"])
    args = ["--input", str(src), "--tokenizer", DEMO_SP, "--output", str(tmp_path / "o"), "--on-error", "skip"] + RUN
    first, messages = _run(args, capsys)
    assert "skipped: " in first and any("the summary names the first ones" in m for m in messages)
    again, messages = _run(args, capsys)
    assert "skipped: " not in again and not any("the summary names the first ones" in m for m in messages)
    assert any("records only their counts: --force rebuilds it naming the first ones" in m for m in messages)


def test_an_interrupted_run_does_not_call_a_kept_split_published(prepared, capsys, monkeypatch, tmp_path):
    """Train kept (its index.json rewritten with a touched source's new mtime), valid interrupted: nothing was
    published by this run."""
    from bft_megatron.data import pipeline

    args, src, out, _ = prepared
    os.utime(src, ns=(10**18, 10**18))
    real = pipeline.prepare_split

    def interrupted(cfg, split, *rest, **kwargs):
        if split == "valid":
            raise KeyboardInterrupt
        return real(cfg, split, *rest, **kwargs)

    monkeypatch.setattr(pipeline, "prepare_split", interrupted)
    with logged(logging.INFO) as records:
        assert main(args + ["--valid", str(src)]) == 130
    messages = [r.getMessage() for r in records]
    assert any("recorded the new mtimes" in m for m in messages)
    assert "prepare interrupted: no split was published (one prepared before is kept as it was)" in messages


def test_a_valid_split_left_from_an_earlier_run_is_named_beside_a_kept_train_split(prepared, capsys):
    """`prepare` run again without --valid: train/ is up to date and kept, and the valid/ of an earlier run with
    --valid stays beside it, which the trainer validates on: said, as when train/ is rebuilt."""
    args, src, _, _ = prepared
    _run(args + ["--valid", str(src)], capsys)
    _, messages = _run(args, capsys)
    assert any("was kept from an earlier preparation" in m and "beside the kept train/ split" in m
               and "delete it to train without validation" in m for m in messages), messages


def test_valid_sources_alone_prepare_the_validation_split_only(prepared, capsys, tmp_path):
    """For ``train --eval-only`` on a held-out set: --valid without --input (and without data.train in --config)
    prepares valid/ alone; beside a kept train/ it leaves train/ as it was and says when the two disagree."""
    args, _, out, _ = prepared
    held_out = write_jsonl(tmp_path / "held_out.jsonl", CHATS)
    alone = tmp_path / "alone"
    stdout, _ = _run(["--valid", str(held_out), "--tokenizer", DEMO_SP, "--output", str(alone)] + RUN, capsys)
    assert (alone / "valid" / "index.json").is_file() and not (alone / "train").exists()
    assert "[valid] records=4" in stdout and "[train]" not in stdout
    train = _inode(out)
    only_valid = ["--valid", str(held_out), "--tokenizer", DEMO_SP, "--output", str(out)] + RUN
    _, logs = _run(only_valid, capsys)
    assert _inode(out) == train and (out / "valid" / "index.json").is_file()
    assert not [m for m in logs if "prepared otherwise" in m]  # prepared as train/ was
    _, logs = _run(only_valid + ["--template", "llama3"], capsys)
    assert _inode(out) == train
    assert [m for m in logs if "its valid/ split was prepared otherwise than its train/ split" in m
            and "--template: train/ chatml, valid/ llama3" in m]
    with logged(logging.ERROR) as records:
        assert main(["--tokenizer", DEMO_SP, "--output", str(tmp_path / "none")]) == 2
    assert "no data: pass --input PATH[:WEIGHT] for the training split and/or --valid" in records[0].getMessage()
