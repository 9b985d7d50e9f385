"""``bft-megatron prepare``: summary, byte-reproducibility, config handling, policies, workers (mixing:
tests/test_data_mixing.py)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest

from bft_megatron.config.data import DataConfig, SourceConfig
from bft_megatron.data.errors import DataError
from bft_megatron.data.prepare import FLAGS, _parser, as_flags, main, preparation_warnings, run
from bft_megatron.data.storage import PackedDataset
from tests.data_fixtures import CHATS, DEMO_SP, hf_tokenizer, logged, prepare_dir, synthetic_chats, write_jsonl


def _digest(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_cli_prints_summary_and_is_byte_reproducible(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", synthetic_chats(40) + CHATS)
    val = write_jsonl(tmp_path / "val.jsonl", CHATS)
    args = ["--input", str(src), "--valid", str(val), "--tokenizer", DEMO_SP, "--seq-length", "256",
            "--no-progress"]
    assert main(args + ["--output", str(tmp_path / "a")]) == 0
    summary = capsys.readouterr().out
    for key in ("[train] records=44 samples=44", "supervised_tokens=", "packing_efficiency=", "truncated=0",
                "skipped=0", "tok/s", "[valid] records=4 samples=4"):
        assert key in summary, key
    assert main(args + ["--output", str(tmp_path / "b")]) == 0
    a, b = _digest(tmp_path / "a"), _digest(tmp_path / "b")
    assert a.pop(".prepare.lock") and b.pop(".prepare.lock")  # the lock's last holder (pid, time): not data
    assert set(a) == {f"{s}/{f}" for s in ("train", "valid") for f in
                      ("index.json", "tokens.npy", "loss_mask.npy", "sample_offsets.npy", "row_offsets.npy",
                       "sample_ids.npy")}
    assert a == b


def test_config_yaml_and_flag_override(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", CHATS)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  train:\n    - path: {src}\n  tokenizer: {DEMO_SP}\n  seq_length: 128\n"
                   f"  packing: false\n  output_dir: {tmp_path / 'out'}\n", encoding="utf-8")
    assert main(["--config", str(cfg), "--no-progress", "--seq-length", "200"]) == 0
    index = json.loads((tmp_path / "out" / "train" / "index.json").read_text())
    assert index["seq_length"] == 200 and index["packed"] is False and index["num_rows"] == 4
    cfg.write_text("data:\n  tokeniser: x\n", encoding="utf-8")
    assert main(["--config", str(cfg)]) == 2  # the logged error names the key (see test_data_config)
    cfg.write_text("data:\n\ttokenizer: x\n", encoding="utf-8")  # a tab: a YAML syntax error, no traceback
    with logged(logging.ERROR) as records:
        assert main(["--config", str(cfg)]) == 2
    assert "c.yaml: invalid YAML at line 2, column 1" in records[0].getMessage()


def test_missing_output_names_the_flag(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", CHATS)
    with logged(logging.ERROR) as records:
        assert main(["--input", str(src), "--tokenizer", DEMO_SP, "--no-progress"]) == 2
    assert any("pass --output DIR" in r.getMessage() for r in records)


def test_missing_input_or_tokenizer_names_the_flag(tmp_path):
    """Without them the data config's messages named data fields ("data config: train=[]: needs at least one
    source", "tokenizer='': ...") that a command-line user never wrote."""
    src = write_jsonl(tmp_path / "in.jsonl", CHATS)
    out = ["--output", str(tmp_path / "out"), "--no-progress"]
    for args, flag in ((["--tokenizer", DEMO_SP], "pass --input PATH[:WEIGHT]"), (["--input", str(src)],
                                                                                 "pass --tokenizer")):
        with logged(logging.ERROR) as records:
            assert main(args + out) == 2
        assert any(flag in r.getMessage() for r in records), flag


def test_an_output_that_is_a_file_is_an_error_not_a_traceback(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", CHATS)
    (tmp_path / "out").write_text("x")
    with logged(logging.ERROR) as records:
        assert main(["--input", str(src), "--tokenizer", DEMO_SP, "--output", str(tmp_path / "out"),
                     "--no-progress"]) == 2
    assert any("out': exists and is not a directory" in r.getMessage() for r in records)


def test_truncation_policies_are_counted(tmp_path):
    chats = synthetic_chats(30, seed=4)
    trunc = PackedDataset(prepare_dir(tmp_path / "t", chats, seq_length=64, truncation="truncate"))
    stats = trunc.index["stats"]
    assert stats["truncated"] > 0 and stats["samples"] + stats["dropped_no_supervision"] == 30
    assert np.diff(trunc.sample_offsets).max() <= 64
    drop = PackedDataset(prepare_dir(tmp_path / "d", chats, seq_length=64, truncation="drop"))
    dstats = drop.index["stats"]
    assert dstats["dropped_too_long"] == stats["truncated"] + stats["dropped_no_supervision"]
    assert dstats["samples"] == 30 - dstats["dropped_too_long"]


def test_cli_warnings_name_the_flags_the_trainer_names_as_config_keys(tmp_path):
    """The length-policy warning is shared with the trainer (data.truncation=drop); `prepare` names its flags."""
    src = write_jsonl(tmp_path / "in.jsonl", synthetic_chats(30, seed=4))
    with logged(logging.WARNING) as warnings:
        assert main(["--input", str(src), "--tokenizer", DEMO_SP, "--output", str(tmp_path / "o"),
                     "--seq-length", "64", "--no-progress"]) == 0
    text = warnings[0].getMessage()
    assert "longer than --seq-length 64 and truncated (--truncation truncate): raise --seq-length" in text
    assert "or set --truncation drop" in text and "data." not in text
    options = {option for action in _parser()._actions for option in action.option_strings}
    assert set(FLAGS.values()) <= options and set(FLAGS) <= {f.name for f in dataclasses.fields(DataConfig)}
    assert as_flags("data.output_dir=/x: data.train, data.foo=1") == "--output /x: --input, data.foo=1"
    # a value ends before , ) : (the next key=value is converted on its own)
    assert as_flags("(data.seed=1,data.seq_length=8:data.packing=false)") == "(--seed 1,--seq-length 8:--packing false)"
    text = "config file data.seed.yaml: No such file; in/data.train.jsonl:line 2; runs/data.seed=1/x"  # paths stay
    assert as_flags(text) == text
    # the key where it is meant (a --config key), and a YAML path into the sources (--input[0] is no flag)
    for text in ("pass --input PATH (or list data.train in --config)", "or set data.tokenizer in --config)",
                 "unknown key 'pth' in section 'data.train[0]'"):
        assert as_flags(text) == text


@pytest.mark.parametrize("workers, seconds, cores, warned", [(1, 1165.0, 32, True), (1, 30.0, 32, False),
                                                            (4, 1165.0, 32, False), (1, 120.0, 32, True),
                                                            (1, 1165.0, 1, False)])
def test_a_long_single_process_preparation_suggests_num_workers(monkeypatch, workers, seconds, cores, warned):
    """200k chats take ~20 min on one worker; the output does not depend on the worker count, so say so (from 2
    minutes on, and not on a machine with one core)."""
    from bft_megatron.data.pipeline import SplitStats

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    warnings = preparation_warnings(DataConfig(num_workers=workers), {"train": SplitStats(records=200000,
                                                                                          seconds=seconds)})
    want = (f"[train] preparing 200000 records took {seconds:.0f} s in one process: data.num_workers=16 tokenizes "
            "on 16 of this machine's 32 cores (the output is byte-identical)")
    assert warnings == ([want] if warned else [])
    assert "--num-workers 16 tokenizes" in as_flags(want)


def test_on_error_raise_names_file_and_line_and_skip_counts(tmp_path, capsys):
    src = write_jsonl(tmp_path / "bad.jsonl", CHATS, raw_lines=['{"prompt": ', json.dumps({"messages": []})])
    cfg = DataConfig(train=[SourceConfig(path=str(src))], tokenizer=DEMO_SP, output_dir=str(tmp_path / "o"))
    with pytest.raises(DataError, match=r"bad\.jsonl:line 5: malformed JSON"):
        run(cfg)
    with logged(logging.WARNING) as warnings:
        assert main(["--input", str(src), "--tokenizer", DEMO_SP, "--output", str(tmp_path / "o2"),
                     "--on-error", "skip", "--no-progress"]) == 0
    assert warnings[-1].getMessage() == ("[train] 2 of 6 records (33.3%) were skipped as unusable "
                                         "(--on-error skip); the summary names the first ones")
    out = capsys.readouterr().out
    assert "records=6 samples=4" in out and "skipped=invalid_record=1, malformed_json=1" in out
    assert "bad.jsonl:line 5" in out and "bad.jsonl:line 6: empty conversation" in out


@pytest.mark.parametrize("tok, warned", [("dated", True), ("qwen25", False)])
def test_a_template_that_writes_todays_date_is_warned_about(tmp_path, tok, warned):
    """template: tokenizer with a chat template that calls strftime_now (Llama-3.2's 'Today Date'): the prepared
    tokens depend on the day, which a reproducible preparation must say."""
    src = write_jsonl(tmp_path / "a.jsonl", CHATS)
    cfg = DataConfig(train=[SourceConfig(path=str(src))], tokenizer=hf_tokenizer(tok), template="tokenizer",
                     seq_length=256, output_dir=str(tmp_path / "o"))
    with logged(logging.WARNING) as warnings:
        run(cfg)
    assert any("writes today's date (strftime_now" in w.getMessage() for w in warnings) == warned


def test_a_named_template_that_writes_todays_date_is_warned_about(tmp_path):
    """A tokenizer with several named chat templates (its chat_template is a dict) is warned about as well when
    one of them writes today's date: the check reads the templates, not the dict's names."""
    import shutil

    tok_dir = tmp_path / "tok"
    shutil.copytree(hf_tokenizer("qwen25"), tok_dir)
    dated = (Path(hf_tokenizer("dated")) / "chat_template.jinja").read_text(encoding="utf-8")
    (tok_dir / "additional_chat_templates").mkdir()
    (tok_dir / "additional_chat_templates" / "dated.jinja").write_text(dated, encoding="utf-8")
    src = write_jsonl(tmp_path / "a.jsonl", CHATS)
    cfg = DataConfig(train=[SourceConfig(path=str(src))], tokenizer=str(tok_dir), template="tokenizer",
                     seq_length=256, output_dir=str(tmp_path / "o"))
    with logged(logging.WARNING) as warnings:
        run(cfg)
    assert any("writes today's date (strftime_now" in w.getMessage() for w in warnings)


def test_workers_do_not_change_the_output(tmp_path):
    chats = synthetic_chats(150, seed=5)
    one = prepare_dir(tmp_path / "w1", chats, num_workers=1)
    two = prepare_dir(tmp_path / "w2", chats, num_workers=2)
    a, b = _digest(one), _digest(two)
    ia, ib = (json.loads((d / "index.json").read_text()) for d in (one, two))
    files = []
    for index in (ia, ib):  # the only difference: the input files (same contents) are named after the output dirs
        index["stats"]["per_source"][0].pop("path")
        files.append([(f["size"], f["sha256"]) for f in index.pop("sources")[0]["files"]])
    assert files[0] == files[1] and ia == ib and a.pop("index.json") and b.pop("index.json") and a == b


def test_supervise_last_reduces_supervision(tmp_path):
    all_ = PackedDataset(prepare_dir(tmp_path / "a", CHATS[:1], supervise="all"))
    last = PackedDataset(prepare_dir(tmp_path / "l", CHATS[:1], supervise="last"))
    assert 0 < last.index["supervised_tokens"] < all_.index["supervised_tokens"]


def test_split_with_no_usable_sample_is_an_error(tmp_path):
    src = write_jsonl(tmp_path / "bad.jsonl", [], raw_lines=["{", "{"])
    cfg = DataConfig(train=[SourceConfig(path=str(src))], tokenizer=DEMO_SP, output_dir=str(tmp_path / "o"),
                     on_error="skip")
    with pytest.raises(DataError, match="train split: no usable samples: 2 records"):
        run(cfg)
    assert not (tmp_path / "o").exists()  # the failed first try leaves no empty o/train/
    (tmp_path / "kept" / "valid").mkdir(parents=True)
    (tmp_path / "kept" / "valid" / "index.json").write_text("{}")
    with pytest.raises(DataError, match="no usable samples"):
        run(dataclasses.replace(cfg, output_dir=str(tmp_path / "kept")))
    # the user's directory stays (with the preparation lock file, kept: another job may be waiting on it)
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == [".prepare.lock", "valid"]
    assert main(["--input", str(src), "--tokenizer", DEMO_SP, "--output", str(tmp_path / "o"),
                 "--on-error", "skip", "--no-progress"]) == 2
    long = write_jsonl(tmp_path / "long.jsonl", synthetic_chats(3, seed=2))
    dropped = DataConfig(train=[SourceConfig(path=str(long))], tokenizer=DEMO_SP, output_dir=str(tmp_path / "d"),
                         seq_length=8, truncation="drop")
    with pytest.raises(DataError, match=r"'dropped_too_long': 3\}; every sample is longer than data.seq_length=8: "
                                        r"raise data.seq_length, or set data.truncation=truncate"):
        run(dropped)
    with logged(logging.ERROR) as records:  # the command names its flags, as its warnings do
        assert main(["--input", str(long), "--tokenizer", DEMO_SP, "--output", str(tmp_path / "d"), "--seq-length",
                     "8", "--truncation", "drop", "--no-progress"]) == 2
    assert ("every sample is longer than --seq-length 8: raise --seq-length, or set --truncation truncate"
            in records[-1].getMessage())
    dropped.truncation = "truncate"
    with pytest.raises(DataError, match=r"truncation to data.seq_length=8 left no supervised \(assistant\) token in "
                                        r"any sample: raise data.seq_length"):
        run(dropped)


def test_chats_the_tokenizer_template_refuses_are_skipped_as_template_errors(tmp_path):
    """A template's raise_exception (roles that do not alternate) stops prepare with the record's file and line
    under on_error: raise, and is a counted template_error under skip (it used to escape as a TemplateError)."""
    from tests.data_fixtures import hf_tokenizer

    twice = {"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "again"},
                          {"role": "assistant", "content": "a"}]}
    src = write_jsonl(tmp_path / "in.jsonl", [CHATS[2], twice, CHATS[3]])
    cfg = DataConfig(train=[SourceConfig(path=str(src))], tokenizer=hf_tokenizer("alternating"),
                     template="tokenizer", seq_length=128, output_dir=str(tmp_path / "o"))
    with pytest.raises(DataError, match=r"in\.jsonl:line 2: the tokenizer's chat template rejects this chat"):
        run(cfg)
    cfg.on_error, cfg.output_dir = "skip", str(tmp_path / "o2")
    stats = run(cfg)["train"]
    assert stats.samples == 2 and dict(stats.skips.counts) == {"template_error": 1}
    assert "in.jsonl:line 2" in stats.skips.examples[0]


def test_hub_datasets_use_the_hugging_face_cache(tmp_path, monkeypatch):
    """prepare reads local files through a temporary datasets cache; a hub dataset must not go there: it would be
    downloaded again into a directory deleted after every prepare, and an offline node (HF_DATASETS_OFFLINE=1)
    could not load the copy already in the Hugging Face cache."""
    import datasets

    calls = []

    def fake_load(name, split=None, cache_dir=None, **kwargs):
        calls.append((name, split, cache_dir))
        return [CHATS[2], CHATS[3]]

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    monkeypatch.chdir(tmp_path)
    stats = run(DataConfig(train=[SourceConfig(path="org/chat-set", split="validation")], tokenizer=DEMO_SP,
                           seq_length=128, output_dir=str(tmp_path / "o")))
    assert stats["train"].samples == 2
    assert calls == [("org/chat-set", "validation", None)]


@pytest.mark.parametrize("tmpdir", [None, "scratch"])
def test_the_arrow_copy_of_local_sources_goes_beside_the_output_or_to_tmpdir(tmp_path, monkeypatch, tmpdir):
    """datasets copies a local .json/.parquet source to Arrow first (as large as the source): into $TMPDIR when
    set, else a hidden folder in data.output_dir, not /tmp (RAM or small on many cluster nodes); removed afterwards
    either way. A .jsonl source is read line by line, without one."""
    from bft_megatron.data import readers

    seen, load = [], readers._load_with_datasets
    monkeypatch.setattr(readers, "_load_with_datasets", lambda path, cache: seen.append(cache) or load(path, cache))
    if tmpdir:
        (tmp_path / tmpdir).mkdir()
        monkeypatch.setenv("TMPDIR", str(tmp_path / tmpdir))
    else:
        monkeypatch.delenv("TMPDIR", raising=False)
    out = tmp_path / "o"
    run(DataConfig(train=[SourceConfig(str(write_jsonl(tmp_path / "in.jsonl", CHATS)))], tokenizer=DEMO_SP,
                   seq_length=128, output_dir=str(out)))
    assert seen == []
    (tmp_path / "in.json").write_text(json.dumps(CHATS), encoding="utf-8")
    run(DataConfig(train=[SourceConfig(str(tmp_path / "in.json"))], tokenizer=DEMO_SP, seq_length=128,
                   output_dir=str(out)))
    [cache] = seen
    parent = tmp_path / tmpdir if tmpdir else out
    assert os.path.dirname(cache) == str(parent) and os.path.basename(cache).startswith(".bft-prepare-cache-")
    assert not os.path.exists(cache) and sorted(os.listdir(out)) == [".prepare.lock", "train"]


def test_an_empty_tmpdir_is_unset_for_the_arrow_copy(tmp_path, monkeypatch):
    """TMPDIR='' (as tempfile treats it) is not a directory: the copy goes beside the output, which is created."""
    from bft_megatron.data.pipeline import _scratch_parent

    monkeypatch.setenv("TMPDIR", "")
    out = tmp_path / "o"
    assert _scratch_parent(DataConfig(output_dir=str(out))) == str(out) and out.is_dir()


def test_a_bad_record_with_workers_is_raised_not_a_hang(tmp_path):
    """With num_workers > 1 the records are read in the pool's task-feeding thread; its DataError (on_error: raise)
    is pickled to a worker to be re-raised. DataError did not unpickle (two-argument __init__), so the worker died
    and prepare waited forever. Run in a subprocess, so that a regression fails instead of hanging the suite."""
    import os
    import pickle
    import subprocess
    import sys

    err = pickle.loads(pickle.dumps(DataError("a.jsonl:line 5", "bad")))
    assert (type(err), err.where, err.message, str(err)) == (DataError, "a.jsonl:line 5", "bad", "a.jsonl:line 5: bad")
    src = write_jsonl(tmp_path / "in.jsonl", CHATS, raw_lines=[json.dumps({"prompt": "x", "response": ""})])
    code = ("from bft_megatron.config.data import DataConfig, SourceConfig\nfrom bft_megatron.data.prepare import run\n"
            "if __name__ == '__main__':\n"
            f"    run(DataConfig(train=[SourceConfig(path={str(src)!r})], tokenizer={DEMO_SP!r}, seq_length=128,\n"
            f"                   output_dir={str(tmp_path / 'o')!r}, num_workers=2))\n")
    (tmp_path / "job.py").write_text(code, encoding="utf-8")
    repo = str(Path(__file__).resolve().parents[1])  # this checkout's package, in the job and its workers
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(tmp_path / "job.py")], capture_output=True, text=True, timeout=240,
                          cwd=repo, env=env)
    assert proc.returncode != 0 and "in.jsonl:line 5: field 'response': empty assistant turn" in proc.stderr


def test_rewriting_train_only_warns_about_the_valid_split_left_beside_it(tmp_path):
    """`prepare` again into the same --output without --valid rewrites train/ and keeps the older valid/: said at
    once, with the differences when the trainer would refuse the pair (provenance.splits_disagree)."""
    src, valid, out = write_jsonl(tmp_path / "t.jsonl", CHATS), write_jsonl(tmp_path / "v.jsonl", CHATS), tmp_path / "o"
    base = ["--input", str(src), "--tokenizer", DEMO_SP, "--output", str(out), "--no-progress"]
    assert main(base + ["--valid", str(valid), "--template", "llama3"]) == 0
    with logged(logging.WARNING) as records:  # --force: train/ is up to date, kept without it
        assert main(base + ["--template", "llama3", "--force"]) == 0
    assert any("was kept from an earlier preparation" in r.getMessage() for r in records)
    with logged(logging.WARNING) as records:
        assert main(base + ["--template", "chatml"]) == 0
    message = "\n".join(r.getMessage() for r in records)
    assert "--template: train/ chatml, valid/ llama3" in message and "trainer refuses" in message
