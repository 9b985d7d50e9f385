"""Where records come from: missing local paths vs hub dataset ids, formats and suffixes, tokenizer paths; each
error says what is wrong with the path."""

from __future__ import annotations

import pytest

from bft_megatron.data.errors import DataError, SkipLog
from bft_megatron.data.readers import read_records
from bft_megatron.data.records import to_conversation
from tests.data_fixtures import CHATS, write_jsonl
from tests.test_data_readers import _convs


def test_hub_name_is_a_thin_datasets_call(monkeypatch):
    import datasets

    calls = []

    def fake_load(name, subset=None, split=None, cache_dir=None):
        calls.append((name, subset, split))
        return [CHATS[2], CHATS[3]]

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    skips = SkipLog()
    raws = list(read_records("org/chat-set", "validation", skips))
    assert calls == [("org/chat-set", None, "validation")]  # no configuration: as load_dataset(name)
    assert [r.where for r in raws] == ["hub:org/chat-set[validation]:row 0", "hub:org/chat-set[validation]:row 1"]
    assert to_conversation(raws[1].data, "auto", raws[1].where).messages[1].content == "The quick brown fox."
    # a dataset with configurations (medical-o1-reasoning-SFT's "en", "zh", ...): load_dataset's name
    raws = list(read_records("org/chat-set", None, skips, subset="en"))
    assert calls[-1] == ("org/chat-set", "en", "train") and raws[0].where == "hub:org/chat-set/en[train]:row 0"


def test_subset_of_a_local_path_is_refused(tmp_path):
    """By the config's validation (before anything is prepared), naming the field; and by the reader."""
    from bft_megatron.config.data import DataConfig, SourceConfig

    path = write_jsonl(tmp_path / "a.jsonl", [CHATS[2]])
    cfg = DataConfig(train=[SourceConfig(path=str(tmp_path))], valid=[SourceConfig(path=str(path), subset="en")],
                     tokenizer="t", output_dir=str(tmp_path / "out"))
    with pytest.raises(ValueError, match=r"data config: valid\[0\].subset='en': names a configuration of a hub "
                                         r"dataset, but .*a.jsonl is a local path"):
        cfg.validate()
    with pytest.raises(DataError, match=r"subset='en' names a configuration of a hub dataset; this is a local path"):
        list(read_records(str(path), None, SkipLog(), subset="en"))


def test_explicit_format_is_enforced(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [CHATS[2]])
    with pytest.raises(DataError, match="missing field 'instruction'"):
        _convs(path, fmt="alpaca")


def test_missing_file_and_bad_suffix(tmp_path):
    with pytest.raises(DataError, match="no such file or directory"):
        _convs(tmp_path / "nope.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type"):
        _convs(tmp_path / "x.csv")


def test_missing_local_paths_are_not_sent_to_the_hub(tmp_path, monkeypatch):
    """A path that does not exist is a hub id only if it can be one; a failed hub load says both."""
    import datasets

    def offline(name, **kwargs):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mydata").mkdir()
    for path, match in [("mydata/train_dir", r"no such file or directory in mydata/ \(taken as a local path"),
                        ("a/b/c", "no such file or directory"), ("x.parquet", "no such file or directory"),
                        ("mydat/train_dir", r"not a local file or directory .*owner/name.*ConnectionError")]:
        with pytest.raises(DataError, match=match):
            list(read_records(path, None, SkipLog()))


def test_a_comma_separated_path_is_pointed_to_the_list_form(tmp_path, monkeypatch):
    """``data.train=a.jsonl,b.jsonl`` (no brackets) is one path: its error shows the list override."""
    from bft_megatron.data.readers import local_source_problem

    monkeypatch.chdir(tmp_path)
    for name in ("a.jsonl", "b.jsonl"):
        (tmp_path / name).write_text("")
    want = "several sources are a list: [a.jsonl,b.jsonl] (an override: 'data.train=[a.jsonl,b.jsonl]')"
    assert local_source_problem("a.jsonl,b.jsonl") == f"no such file or directory; {want}"
    assert "several sources" not in local_source_problem("x.jsonl,y.jsonl")   # neither exists: no guess


def test_tokenizer_path_errors_say_what_is_wrong(tmp_path):
    from bft_megatron.data.tokenizer import load_tokenizer

    with pytest.raises(ValueError, match=r"nonexist.model': no such file or directory; expected an HF"):
        load_tokenizer(str(tmp_path / "nonexist.model"))
    with pytest.raises(ValueError, match=r"no such file or directory \(relative paths are taken from .*\) \(a hub id "
                                         r"is not downloaded"):
        load_tokenizer("meta-llama/Llama-3.1-8B")
    with pytest.raises(ValueError, match=r"'tok/x.model': no such file or directory \(relative paths are taken from "):
        load_tokenizer("tok/x.model")  # a config's relative path, from another working directory
    (tmp_path / "tok.txt").write_text("x")
    with pytest.raises(ValueError, match=r"got a \.txt file"):
        load_tokenizer(str(tmp_path / "tok.txt"))
    # a convert import's layout (weights beside, the tokenizer in hf/): transformers' own message named neither
    (tmp_path / "hf").mkdir()  # the path nor the files it looked for
    (tmp_path / "hf" / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"a directory without tokenizer files .*keeps its tokenizer in hf/"):
        load_tokenizer(str(tmp_path))


def test_a_changed_subset_is_other_data():
    """Prepared from one configuration of a hub dataset, configured with another: named, so not reused."""
    from bft_megatron.config.data import SourceConfig
    from bft_megatron.data.provenance import _source_problems, source_record

    rec = source_record(SourceConfig(path="org/chat-set", subset="en"))
    assert _source_problems("data.train[0]", rec, SourceConfig(path="org/chat-set", subset="en")) == []
    assert _source_problems("data.train[0]", rec, SourceConfig(path="org/chat-set", subset="zh")) == [
        "data.train[0].subset: prepared en, configured zh"]
