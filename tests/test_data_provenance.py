"""A prepared split is reused only while it is what the config describes (``bft_megatron.data.provenance``).

* With ``data.train`` sources every recorded setting, the tokenizer (by fingerprint) and the sources (by
  weight and content: size, then mtime, else sha256) must match; each difference is named with both values.
  A source touched but unchanged is hashed once: its new mtime is recorded in the index.
* With only ``data.output_dir``, only what the config sets to a non-default value is compared.
* An index written before these records existed still loads, with a warning naming what cannot be checked.
* Data prepared under other record-to-token rules (``RULES_VERSION``) differs in both modes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from bft_megatron.config.data import DataConfig, SourceConfig
from bft_megatron.config.schema import load_config
from bft_megatron.data import provenance
from bft_megatron.data.provenance import PreparedDataMismatch
from bft_megatron.data.prepare import run
from bft_megatron.data.storage import read_index
from bft_megatron.data.tokenizer import tokenizer_fingerprint
from bft_megatron.train import main as train_main
from bft_megatron.training.data import open_datasets
from tests.data_fixtures import CHATS, DEMO_SP, hf_tokenizer, logged, synthetic_chats, write_jsonl

BASE = ["data.seq_length=256", "data.template=chatml", "model.vocab_size=4096"]


def _setup(tmp: Path, valid: bool = False, extra: list[str] = ()) -> tuple[Path, list[str]]:
    """Sources prepared on first use into ``tmp/out``; returns the train source and the overrides."""
    src = write_jsonl(tmp / "train.jsonl", synthetic_chats(24, seed=3))
    over = [f"data.train={src}", f"data.tokenizer={DEMO_SP}", f"data.output_dir={tmp / 'out'}", *BASE, *extra]
    if valid:
        over.append(f"data.valid={write_jsonl(tmp / 'valid.jsonl', CHATS)}")
    open_datasets(load_config(None, over))
    return src, over


def _mismatch(over: list[str]) -> str:
    with pytest.raises(PreparedDataMismatch) as info:
        open_datasets(load_config(None, over))
    return str(info.value)


def copy_hf(tmp: Path) -> str:
    """An HF tokenizer directory other than the demo's sentencepiece model."""
    return str(shutil.copytree(hf_tokenizer("qwen_plain"), tmp / "hf_tok"))


def test_changed_settings_are_named_with_both_values(tmp_path):
    _, over = _setup(tmp_path, valid=True)
    message = _mismatch(over + ["data.packing=false"])  # the walkthrough's case: it used to train on packed rows
    assert "data.packing: prepared true, configured false" in message
    assert str(tmp_path / "out" / "train") in message and str(tmp_path / "out" / "valid") in message
    assert "Use a new data.output_dir, or delete" in message and "bft-megatron prepare" in message
    message = _mismatch(over + ["data.template=plain", "data.seed=5", "data.supervise=last", "data.truncation=drop",
                                "data.seq_length=512"])
    for line in ("data.template: prepared chatml, configured plain", "data.seed: prepared 1234, configured 5",
                 "data.supervise: prepared all, configured last", "data.truncation: prepared truncate, configured drop",
                 "data.seq_length: prepared 256, configured 512"):
        assert line in message
    open_datasets(load_config(None, over + ["data.num_workers=2"]))  # does not change the data


def test_sources_are_compared_by_weight_and_content(tmp_path, monkeypatch):
    src, over = _setup(tmp_path)
    assert "data.train[0].weight: prepared 1.0, configured 0.5" in _mismatch(over + [f"data.train={src}:0.5"])
    assert "prepared from 1 source(s)" in _mismatch(over + [f"data.train=[{src}, {src}]"])
    copy = shutil.copy(src, tmp_path / "moved.jsonl")  # same contents, other path and mtime: the same source
    open_datasets(load_config(None, over + [f"data.train={copy}"]))
    os.utime(src, ns=(1, 1))  # touched only: hashed once, unchanged, and its new mtime recorded
    with logged(logging.INFO) as records:
        open_datasets(load_config(None, over))
    assert any("recorded the new mtimes" in r.getMessage() for r in records)
    assert read_index(tmp_path / "out" / "train")["sources"][0]["files"][0]["mtime_ns"] == 1
    hashed = []
    monkeypatch.setattr(provenance, "sha256_file", lambda path: hashed.append(path) or "")
    open_datasets(load_config(None, over))  # unchanged since the record: stat() only, no hashing
    assert hashed == []
    monkeypatch.undo()
    text = src.read_bytes()
    src.write_bytes(text.replace(b"Question 0:", b"Question 9:"))  # same size, other contents
    assert "same size but other contents than when prepared" in _mismatch(over)
    src.write_bytes(text + b"\n")
    assert f"{len(text)} bytes when prepared, {len(text) + 1} now" in _mismatch(over)
    src.unlink()
    assert "does not exist" in _mismatch(over)


def test_read_only_prepared_data_is_still_used_after_a_touch(tmp_path, monkeypatch):
    import bft_megatron.data.storage as storage

    src, over = _setup(tmp_path)
    os.utime(src, ns=(1, 1))

    def read_only(*_args):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(storage, "publish_index", read_only)
    with logged(logging.INFO) as records:
        train, _ = open_datasets(load_config(None, over))
    assert len(train) > 0 and any("could not record their new mtimes" in r.getMessage() for r in records)


def test_new_mtimes_are_not_written_over_an_index_changed_meanwhile(tmp_path):
    """Another job rebuilt the split (or is rebuilding it) between our read and our write: leave its index."""
    from bft_megatron.data.storage import PackedDataset
    from bft_megatron.data.provenance import record_new_mtimes

    _setup(tmp_path)
    ds = PackedDataset(tmp_path / "out" / "train")
    before = (tmp_path / "out" / "train" / "index.json").read_text()
    ds.index["sources"][0]["files"][0]["mtime_ns"] = 1
    with logged(logging.INFO) as records:
        record_new_mtimes(ds.directory, ds.index, json.dumps({"an": "older read"}, sort_keys=True))
    assert (tmp_path / "out" / "train" / "index.json").read_text() == before
    assert any("changed since it was read" in r.getMessage() for r in records)


def test_tokenizer_is_compared_by_fingerprint(tmp_path):
    _, over = _setup(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    copy = shutil.copy(DEMO_SP, tmp_path / "elsewhere")  # the same tokenizer file in another directory: fine
    open_datasets(load_config(None, over + [f"data.tokenizer={copy}"]))
    message = _mismatch(over + [f"data.tokenizer={hf_tokenizer('qwen25')}"])
    assert f"data.tokenizer: prepared with {DEMO_SP} (fingerprint {tokenizer_fingerprint(DEMO_SP)})" in message
    # a model directory's weights are not part of its tokenizer's fingerprint (nor read to compute it)
    model_dir = Path(shutil.copytree(hf_tokenizer("qwen25"), tmp_path / "model"))
    before = tokenizer_fingerprint(str(model_dir))
    (model_dir / "model.safetensors").write_bytes(b"weights")
    (model_dir / "config.json").write_text("{}")
    assert tokenizer_fingerprint(str(model_dir)) == before


def test_skipped_records_differ_from_on_error_raise(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", CHATS, raw_lines=["{not json"])
    over = [f"data.train={bad}", f"data.tokenizer={DEMO_SP}", f"data.output_dir={tmp_path / 'out'}", *BASE]
    open_datasets(load_config(None, over + ["data.on_error=skip"]))
    assert "data.on_error: prepared with skip (1 records skipped), configured raise" in _mismatch(over)


def test_output_dir_only_compares_what_the_config_sets(tmp_path):
    _setup(tmp_path, extra=["data.packing=false", "data.template=llama3"])
    only = [f"data.output_dir={tmp_path / 'out'}", "model.vocab_size=4096"]
    train, _ = open_datasets(load_config(None, only + ["data.seed=7", "data.seq_length=512"]))  # defaults: unset
    assert not train.packed
    message = _mismatch(only + ["data.template=plain", "data.seq_length=128", f"data.tokenizer={copy_hf(tmp_path)}"])
    assert "data.template: prepared llama3, configured plain" in message
    assert "data.seq_length: prepared rows are up to 256 tokens, configured 128" in message
    assert "data.tokenizer: prepared with" in message and "With only data.output_dir" in message
    open_datasets(load_config(None, only + [f"data.tokenizer={DEMO_SP}", "data.template=llama3"]))


def test_older_index_loads_with_a_warning(tmp_path):
    src, over = _setup(tmp_path)
    path = tmp_path / "out" / "train" / "index.json"
    index = json.loads(path.read_text())
    for key in ("sources", "on_error", "seed", "rules_version"):
        index.pop(key)
    index["tokenizer"].pop("fingerprint_version")
    path.write_text(json.dumps(index))
    with logged(logging.WARNING) as records:
        open_datasets(load_config(None, over + ["data.seed=5"]))  # not recorded: not compared
    assert len(records) == 1 and "older version" in records[0].getMessage()
    assert "contents, hub split and format (only paths and weights)" in records[0].getMessage()
    assert "data.seed" in records[0].getMessage()
    assert "the version of the record-to-token rules" in records[0].getMessage()
    # what it does record is still compared: settings, source paths and weights, a sentencepiece fingerprint
    assert "data.packing: prepared true, configured false" in _mismatch(over + ["data.packing=false"])
    assert "data.train[0].weight" in _mismatch(over + [f"data.train={src}:2"])
    assert "data.tokenizer: prepared with" in _mismatch(over + [f"data.tokenizer={copy_hf(tmp_path)}"])


@pytest.mark.parametrize("strict", [True, False])
def test_data_prepared_by_other_rules_differs(tmp_path, strict):
    """Data prepared by a version whose record-to-token rules differ (RULES_VERSION) is not reused silently, also
    when only data.output_dir is given: the same records would now give other tokens or masks."""
    _, over = _setup(tmp_path)
    path = tmp_path / "out" / "train" / "index.json"
    index = json.loads(path.read_text())
    assert index["rules_version"] == provenance.RULES_VERSION
    index["rules_version"] = provenance.RULES_VERSION - 1
    path.write_text(json.dumps(index))
    only = [f"data.output_dir={tmp_path / 'out'}", "model.vocab_size=4096"]
    message = _mismatch(over if strict else only)
    assert (f"data preparation rules: prepared with version {provenance.RULES_VERSION - 1}, this version prepares "
            f"with {provenance.RULES_VERSION}") in message
    index["rules_version"] = provenance.RULES_VERSION + 1  # prepared by a newer version (then this one was reinstalled)
    path.write_text(json.dumps(index))
    assert f"data preparation rules: prepared with version {provenance.RULES_VERSION + 1}" in _mismatch(
        over if strict else only)


def _sources_index(*sources: SourceConfig, **extra) -> dict:
    """An index recording only ``sources`` (settings not recorded: unchecked, not compared)."""
    return {"sources": [provenance.source_record(s) for s in sources], **extra}


def test_fewer_configured_sources_than_prepared_differ(tmp_path):
    a = SourceConfig(path=str(write_jsonl(tmp_path / "a.jsonl", CHATS)))
    b = SourceConfig(path=str(write_jsonl(tmp_path / "b.jsonl", synthetic_chats(4, seed=1))))
    index = _sources_index(a, b)
    assert provenance.compare(index, DataConfig(), "train", [a, b], strict=True)[0] == []
    problems, _ = provenance.compare(index, DataConfig(), "train", [a], strict=True)  # b dropped from the mix
    assert problems == [f"data.train: prepared from 2 source(s) {[a.path, b.path]}, configured 1 {[a.path]}"]


def test_source_format_and_hub_name_and_split_are_compared(tmp_path):
    local = SourceConfig(path=str(write_jsonl(tmp_path / "a.jsonl", CHATS)))
    index = _sources_index(local)
    problems, _ = provenance.compare(index, DataConfig(), "train", [replace(local, format="sharegpt")], strict=True)
    assert problems == ["data.train[0].format: prepared auto, configured sharegpt"]
    hub = SourceConfig(path="some-org/chats", split="train")  # not a local path: compared by name and split
    index = _sources_index(hub)
    assert "files" not in index["sources"][0]
    assert provenance.compare(index, DataConfig(), "train", [hub], strict=True)[0] == []
    problems, _ = provenance.compare(index, DataConfig(), "train", [replace(hub, split="test")], strict=True)
    assert problems == ["data.train[0].split: prepared train, configured test"]
    problems, _ = provenance.compare(index, DataConfig(), "train", [replace(hub, path="other-org/chats")], strict=True)
    assert problems == ["data.train[0].path: prepared some-org/chats, configured other-org/chats"]


def test_older_index_compares_source_paths(tmp_path):
    """An index from before ``sources`` was recorded: its stats still name each source's path and weight."""
    index = {"stats": {"per_source": [{"path": str(tmp_path / "a.jsonl"), "weight": 1.0}]}}
    same = SourceConfig(path=str(tmp_path / "a.jsonl"))
    problems, unchecked = provenance.compare(index, DataConfig(), "train", [same], strict=True)
    assert problems == [] and any("only paths and weights" in u for u in unchecked)
    other = SourceConfig(path=str(tmp_path / "b.jsonl"))
    problems, _ = provenance.compare(index, DataConfig(), "train", [other], strict=True)
    assert problems == [f"data.train[0].path: prepared {tmp_path / 'a.jsonl'}, configured {other.path}"]


def test_skipped_records_are_only_an_error_when_the_config_lists_the_sources():
    """With only data.output_dir, on_error is not set (its default is raise): a split that skipped records is
    used as prepared."""
    index = {"stats": {"skipped": {"bad_json": 2}}, "sources": []}
    problems, _ = provenance.compare(index, DataConfig(), "train", None, strict=False)
    assert problems == []
    problems, _ = provenance.compare(index, DataConfig(), "train", None, strict=True)
    assert problems == ["data.on_error: prepared with skip (2 records skipped), configured raise"]


def test_output_dir_only_refuses_a_valid_split_prepared_otherwise_than_train(tmp_path):
    """`bft-megatron prepare` run again into the same --output without --valid rewrites train/ only; the
    older valid/ (another template here) must not silently validate a model trained on the new train/."""
    out = tmp_path / "out"
    src = write_jsonl(tmp_path / "train.jsonl", synthetic_chats(24, seed=3))
    valid = write_jsonl(tmp_path / "valid.jsonl", CHATS)
    run(DataConfig(train=[SourceConfig(str(src))], valid=[SourceConfig(str(valid))], tokenizer=DEMO_SP,
                   template="llama3", seq_length=256, output_dir=str(out)))
    only = [f"data.output_dir={out}", "model.vocab_size=4096"]
    open_datasets(load_config(None, only))  # prepared together: consistent
    run(DataConfig(train=[SourceConfig(str(src))], tokenizer=DEMO_SP, template="chatml", seq_length=256,
                   output_dir=str(out)))
    message = _mismatch(only)
    assert "data.template: train/ chatml, valid/ llama3" in message
    assert f"delete {out / 'valid'}" in message and "--valid" in message
    model = ["model.hidden_size=64", "model.num_layers=2", "model.num_attention_heads=4", "model.ffn_hidden_size=128",
             "model.max_position_embeddings=256", "data.seq_length=256"]
    with logged(logging.ERROR) as records:  # the SLURM pre-flight finds it too, before any job step starts
        assert train_main([*only, *model, "--check"]) == 2
    assert "data.template: train/ chatml, valid/ llama3" in records[0].getMessage()
    from bft_megatron.training.preflight import load_checked

    # A real run leaves prepared data to rank 0's trainer (the data may be on its node alone): no refusal here.
    assert load_checked(None, [*only, *model], logging.getLogger("t"), check=False, dry_run=False) is not None
    shutil.rmtree(out / "valid")  # the way out the message names
    open_datasets(load_config(None, only))
    assert train_main([*only, *model, "--check"]) == 0


def test_check_leaves_a_configured_split_not_prepared_yet_to_the_trainer(tmp_path):
    """`train --check` with data.train and data.valid sources, only train/ prepared so far: the trainer would
    prepare valid/ on first use, so the pre-flight checks train/ and passes (and still refuses a train/ the config
    no longer describes)."""
    out = tmp_path / "out"
    src = write_jsonl(tmp_path / "train.jsonl", synthetic_chats(24, seed=3))
    valid = write_jsonl(tmp_path / "valid.jsonl", CHATS)
    run(DataConfig(train=[SourceConfig(str(src))], tokenizer=DEMO_SP, template="chatml", seq_length=256,
                   output_dir=str(out)))
    assert not (out / "valid").exists()
    over = [f"data.output_dir={out}", f"data.train=[{{path: {src}}}]", f"data.valid=[{{path: {valid}}}]",
            f"data.tokenizer={DEMO_SP}", "data.template=chatml", "model.vocab_size=4096", "model.hidden_size=64",
            "model.num_layers=2", "model.num_attention_heads=4", "model.ffn_hidden_size=128",
            "model.max_position_embeddings=256", "data.seq_length=256"]
    assert train_main([*over, "--check"]) == 0
    assert train_main([*over, "data.template=llama3", "--check"]) == 2
