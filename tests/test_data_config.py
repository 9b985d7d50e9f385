"""DataConfig validation names the field and the bad value; the YAML mapping loader rejects unknown keys."""

from __future__ import annotations

import dataclasses

import pytest

from bft_megatron.config.data import DataConfig, SourceConfig, data_config_from_dict


def _good() -> DataConfig:
    return DataConfig(train=[SourceConfig(path="a.jsonl")], tokenizer="tok.model", output_dir="out")


def test_good_config_validates():
    _good().validate()


@pytest.mark.parametrize("field,value", [
    ("train", []), ("tokenizer", ""), ("template", "vicuna"), ("seq_length", 1), ("seq_length", "2048"),
    ("packing", "yes"), ("truncation", "cut"), ("on_error", "ignore"), ("supervise", "first"), ("seed", -1),
    ("num_workers", 0), ("output_dir", ""),
])
def test_bad_field_is_named_with_its_value(field, value):
    cfg = dataclasses.replace(_good(), **{field: value})
    with pytest.raises(ValueError, match=f"{field}={value!r}".replace("[", r"\[").replace("]", r"\]")):
        cfg.validate()


@pytest.mark.parametrize("src,match", [
    (SourceConfig(path=""), r"train\[0\]\.path=''"), (SourceConfig(path="a", weight=0), r"train\[0\]\.weight=0"),
    (SourceConfig(path="a", format="csv"), r"train\[0\]\.format='csv'"),
])
def test_bad_source_is_named(src, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(_good(), train=[src]).validate()


def test_from_dict():
    cfg = data_config_from_dict({"train": ["a.jsonl", {"path": "b.parquet", "weight": 0.5}],
                                 "valid": "v.jsonl", "tokenizer": "t", "output_dir": "o"})
    assert cfg.train == [SourceConfig(path="a.jsonl"), SourceConfig(path="b.parquet", weight=0.5)]
    assert cfg.valid == [SourceConfig(path="v.jsonl")]
    cfg.validate()
    with pytest.raises(ValueError, match=r"unknown key 'tokeniser' in section 'data'"):
        data_config_from_dict({"tokeniser": "x"})
    with pytest.raises(ValueError, match=r"unknown key 'wieght' in section 'data.train\[0\]'"):
        data_config_from_dict({"train": [{"path": "a", "wieght": 2}]})
    with pytest.raises(ValueError, match=r"data.seq_length must be an integer, got 'long'"):
        data_config_from_dict({"seq_length": "long"})


def test_training_config_accepts_the_source_shorthands():
    """The trainer's config goes through the same loader: bare paths and a single source work there too."""
    from bft_megatron.config import load_config

    cfg = load_config(None, ["data.train=a.jsonl", "data.tokenizer=t"])
    assert cfg.data.train == [SourceConfig(path="a.jsonl")]
    cfg = load_config(None, ["data.train=[a.jsonl,{path: b.jsonl, weight: 2}]"])
    assert cfg.data.train == [SourceConfig(path="a.jsonl"), SourceConfig(path="b.jsonl", weight=2.0)]
    assert data_config_from_dict({"train": {"path": "a"}, "valid": None}).valid == []  # `valid:` left empty
    # A dotted override cannot reach into a list (it used to replace the whole list silently).
    with pytest.raises(ValueError, match=r"override 'data.train.path': data.train is a list"):
        load_config(None, ["data.train.path=b.jsonl"])


def test_path_weight_shorthand_is_the_same_in_overrides_yaml_and_prepare():
    """``path:weight`` (a number after the last colon) means the same everywhere a bare string is a source."""
    from bft_megatron.config import load_config
    from bft_megatron.data.prepare import _apply_flags, _parser

    want = [SourceConfig(path="a.jsonl"), SourceConfig(path="dir/b.jsonl", weight=0.5)]
    assert load_config(None, ["data.train=[a.jsonl, dir/b.jsonl:0.5]"]).data.train == want
    assert data_config_from_dict({"train": ["a.jsonl", "dir/b.jsonl:0.5"]}).train == want
    args = _parser().parse_args(["--input", "a.jsonl", "--input", "dir/b.jsonl:0.5", "--valid", "v.jsonl:2"])
    cfg = _apply_flags(DataConfig(), args)
    assert cfg.train == want and cfg.valid == [SourceConfig(path="v.jsonl", weight=2.0)]
    # not a number after the colon: the whole string is the path; the mapping form's path is literal
    assert SourceConfig.from_str("org/set:v2") == SourceConfig(path="org/set:v2")
    assert data_config_from_dict({"train": [{"path": "b.jsonl:0.5"}]}).train == [SourceConfig(path="b.jsonl:0.5")]
    with pytest.raises(ValueError, match=r"train\[0\]\.weight=inf: must be a finite number > 0"):
        dataclasses.replace(_good(), train=[SourceConfig.from_str("a.jsonl:inf")]).validate()


@pytest.mark.parametrize("packing", ["true", "false"])
def test_every_prepare_flag_sets_its_field_and_unset_flags_keep_the_config(packing):
    """Each of FLAGS' flags lands in its own DataConfig field (a 0 or 'false' is a value, not 'unset')."""
    from bft_megatron.data.prepare import _apply_flags, _parser

    args = _parser().parse_args(["--input", "a.jsonl", "--valid", "v.jsonl", "--tokenizer", "t", "--output", "o",
                                 "--template", "llama3", "--seq-length", "64", "--packing", packing, "--truncation",
                                 "drop", "--on-error", "skip", "--supervise", "last", "--seed", "0", "--num-workers",
                                 "3"])
    cfg = _apply_flags(DataConfig(packing=packing != "true"), args)
    assert cfg == DataConfig(train=[SourceConfig(path="a.jsonl")], valid=[SourceConfig(path="v.jsonl")], tokenizer="t",
                             output_dir="o", template="llama3", seq_length=64, packing=packing == "true",
                             truncation="drop", on_error="skip", supervise="last", seed=0, num_workers=3)
    assert _apply_flags(dataclasses.replace(cfg), _parser().parse_args([])) == cfg
