"""Typed config: strict YAML loading, dotted overrides, HF config import, validation messages."""

import importlib
import json

import pytest

from bft_megatron.config import Config, ConfigError, from_dict, load_config, validate
from bft_megatron.config.base import apply_overrides, load_yaml, parse_override

TINY = ["model.hidden_size=64", "model.num_layers=4", "model.num_attention_heads=4", "model.num_query_groups=2",
        "model.ffn_hidden_size=128", "model.vocab_size=128", "data.seq_length=32", "train.global_batch_size=8",
        "train.micro_batch_size=2"]


def cfg_with(*extra):
    return load_config(None, TINY + list(extra))


def test_unknown_key_names_key_and_section(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1.0e-4\n  learning_rate: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'learning_rate' in section 'train'"):
        load_config(str(path))
    with pytest.raises(ConfigError, match=r"unknown key 'rope_scalng' in section 'model' \(did you mean "
                                          r"'rope_scaling'\?\); valid keys: family, ffn_hidden_size"):
        from_dict(Config, {"model": {"rope_scalng": {}}})
    with pytest.raises(ConfigError, match=r"unknown key 'bogus' in section 'model.rope_scaling'"):
        from_dict(Config, {"model": {"rope_scaling": {"bogus": 1}}})
    with pytest.raises(ConfigError, match=r"unknown key 'optim' in section '<top>'"):
        from_dict(Config, {"optim": {}})


def test_unknown_override_key_rejected():
    with pytest.raises(ConfigError, match=r"override 'train.lrr': unknown key 'lrr' in section 'train' \(did you "
                                          r"mean 'lr'\?\); valid keys: adam_beta1, "):
        load_config(None, ["train.lrr=1"])
    with pytest.raises(ConfigError, match=r"unknown key 'trian' in section '<top>' \(did you mean 'train'\?\)"):
        load_config(None, ["trian.lr=1"])
    with pytest.raises(ConfigError, match=r"unknown key 'zzz' in section 'loss'; valid keys"):  # nothing close
        load_config(None, ["loss.zzz=1"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["train.lr"])


def test_a_key_without_its_section_points_to_the_sections_that_have_it(tmp_path):
    """``lr=1e-4`` (or ``lr:`` at the top of a YAML file) names ``train.lr``; a key two sections have names both."""
    with pytest.raises(ConfigError, match=r"override 'lr': unknown key 'lr' in section '<top>' \(did you mean "
                                          r"'train.lr'\?\)"):
        load_config(None, ["lr=1e-4"])
    path = tmp_path / "c.yaml"
    path.write_text("seq_length: 512\n")
    with pytest.raises(ConfigError, match=r"unknown key 'seq_length' in section '<top>' \(did you mean "
                                          r"'data.seq_length'\?\)"):
        load_config(str(path))
    with pytest.raises(ConfigError, match=r"unknown key 'seed' in section '<top>' \(did you mean 'train.seed' or "
                                          r"'data.seed'\?\)"):
        load_config(None, ["seed=3"])


def test_overrides_are_typed():
    assert parse_override("train.lr=1e-4", Config) == (["train", "lr"], 1e-4)
    assert parse_override("train.bf16=false", Config)[1] is False
    assert parse_override("parallel.vp=null", Config)[1] is None
    assert parse_override("parallel.tp=2", Config)[1] == 2
    assert parse_override("checkpoint.save=123", Config)[1] == "123"  # str field stays text
    cfg = load_config(None, ["train.lr=5e-5", "train.lr=6e-5", "model.rope_scaling.factor=32"])
    assert cfg.train.lr == 6e-5 and cfg.model.rope_scaling.factor == 32.0
    assert cfg.model.rope_scaling.original_max_position_embeddings == 8192
    with pytest.raises(ConfigError, match=r"train.micro_batch_size must be an integer, got 'two'"):
        load_config(None, ["train.micro_batch_size=two"])
    with pytest.raises(ConfigError, match=r"loss.method must be one of \['sft', 'dft', 'bft'\], got 'xft'"):
        load_config(None, ["loss.method=xft"])
    assert apply_overrides({"a": 1}, [], Config) == {"a": 1}


def test_yaml_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  hidden_size: 64\ntrain:\n  lr: 1.0e-3\n  decay: linear\n")
    cfg = load_config(str(path), ["train.lr=2e-3"])
    assert cfg.model.hidden_size == 64 and cfg.train.lr == 2e-3 and cfg.train.decay == "linear"


@pytest.mark.parametrize("text, message", [
    ("model:\n  hidden_size: 64\n num_layers: 2\n", r"c.yaml: invalid YAML at line 3, column 2: expected <block end>"),
    ("model:\n\thidden_size: 64\n", r"c.yaml: invalid YAML at line 2, column 1: found character '\\t'"),
    ("data:\n  train: [a.jsonl,\nmodel:\n  hidden_size: 3\n",
     r"c.yaml: invalid YAML at line 4, column 14: .* \(while parsing a flow sequence at line 2, column 10\)"),
])
def test_yaml_syntax_errors_name_the_file_and_line(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(str(path))


@pytest.mark.parametrize("text, message", [
    ("train: {lr: 1.0e-4, train_iters: 7}\nmodel: {hidden_size: 64}\ntrain:\n  seed: 5\n",
     r"c.yaml: key 'train' appears twice \(lines 1 and 3\); the second would silently replace the first, so merge"),
    ("train:\n  lr: 1.0e-4\n  lr: 2.0e-4\n", r"c.yaml: key 'lr' appears twice \(lines 2 and 3\)"),
])
def test_a_key_given_twice_in_a_yaml_file_is_an_error(tmp_path, text, message):
    """PyYAML keeps the last of two equal keys: a second ``train:`` section silently reset the first's lr and
    train_iters to their defaults. A key merged in with ``<<`` may still be overridden, as YAML means it."""
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(str(path))
    path.write_text("train:\n  <<: {lr: 1.0e-4, train_iters: 7}\n  lr: 2.0e-4\n")
    assert (load_config(str(path)).train.lr, load_config(str(path)).train.train_iters) == (2.0e-4, 7)
    # a mapping that merges one and is itself merged deeper down: PyYAML flattens it first, in place
    path.write_text("x-base: &base {lr: 1.0e-4, train_iters: 7}\nx-mid:\n  inner: &mid\n    <<: *base\n"
                    "    lr: 3.0e-4\ntrain:\n  <<: *mid\n")
    assert load_yaml(str(path))["train"] == {"lr": 3.0e-4, "train_iters": 7}


def test_a_config_file_given_as_an_override_is_pointed_to_config():
    with pytest.raises(ConfigError, match=r"override 'configs/demo_cpu.yaml' must look like section.key=value \(a "
                                          r"config file\? pass it as --config configs/demo_cpu.yaml\)"):
        load_config(None, ["configs/demo_cpu.yaml"])
    with pytest.raises(ConfigError, match=r"override 'lr' must look like section.key=value$"):
        load_config(None, ["lr"])


def test_bad_override_values_and_missing_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"override 'data.train=\[a.jsonl,': the value is not valid YAML \(.*\); "
                                          r"close every bracket and quote, e.g. data.train=\[a.jsonl,b.jsonl\]"):
        load_config(None, ["data.train=[a.jsonl,"])
    with pytest.raises(ConfigError, match=r"override 'train.bf16=\{': the value is not valid YAML"):
        load_config(None, ["train.bf16={"])
    with pytest.raises(ConfigError, match=r"config file .*nope.yaml: No such file or directory"):
        load_config(str(tmp_path / "nope.yaml"))


def test_from_hf_llama31(tmp_path):
    hf = {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "num_hidden_layers": 32,
          "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256,
          "max_position_embeddings": 131072, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
          "tie_word_embeddings": False,
          "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 8192}}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    cfg = load_config(None, [f"model.from_hf={tmp_path}", "model.num_layers=2"])
    m = cfg.model
    assert (m.hidden_size, m.num_layers, m.num_query_groups, m.ffn_hidden_size) == (4096, 2, 8, 14336)
    assert m.rope_theta == 500000.0 and m.rope_scaling.factor == 8.0 and not m.tie_embeddings and not m.qkv_bias


def test_from_hf_explicit_fields_that_disagree_are_warned_about(tmp_path):
    """Explicit fields still win over config.json (documented), but each disagreement is named with both values."""
    import logging

    from tests.data_fixtures import logged

    hf = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 128,
          "rope_theta": 500000.0, "rms_norm_eps": 1e-5}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with logged(logging.WARNING) as records:
        m = load_config(None, [f"model.from_hf={tmp_path}", "model.rope_theta=10000", "model.norm_epsilon=1e-6",
                               "model.hidden_size=64"]).model
    assert m.rope_theta == 10000.0 and m.norm_epsilon == 1e-6 and m.num_layers == 2
    assert len(records) == 1
    message = records[0].getMessage()
    assert "model.rope_theta=10000.0 (config.json: 500000.0)" in message
    assert "model.norm_epsilon=1e-06 (config.json: 1e-05)" in message
    assert "hidden_size" not in message  # an explicit field equal to config.json's is no news
    with logged(logging.WARNING) as records:
        load_config(None, [f"model.from_hf={tmp_path}", "model.num_layers=2"])
    assert records == []


def test_from_hf_qwen2_has_qkv_bias(tmp_path):
    hf = {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 896, "num_hidden_layers": 24,
          "num_attention_heads": 14, "num_key_value_heads": 2, "intermediate_size": 4864, "vocab_size": 151936,
          "tie_word_embeddings": True, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    m = load_config(None, [f"model.from_hf={tmp_path}"]).model
    assert m.family == "qwen2" and m.qkv_bias and m.tie_embeddings and m.rope_scaling is None


def test_from_hf_rejects_unknown_arch(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ConfigError, match="unsupported architectures"):
        load_config(None, [f"model.from_hf={tmp_path}"])


def test_from_hf_at_an_import_directory_points_at_its_hf_subdirectory(tmp_path):
    """`convert import` (and every trainer checkpoint) keeps config.json in hf/; from_hf=the import directory
    said only that DIR/config.json does not exist."""
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=rf"keeps it in hf/: model.from_hf={tmp_path}/hf\)"):
        load_config(None, [f"model.from_hf={tmp_path}"])
    with pytest.raises(ConfigError, match=r"config.json does not exist$"):  # nothing to point at
        load_config(None, [f"model.from_hf={tmp_path}/hf/nope"])


def test_valid_layouts():
    layout = validate(cfg_with(), 1)
    assert (layout.dp, layout.num_microbatches) == (1, 4)
    layout = validate(cfg_with("parallel.tp=2", "parallel.pp=2", "parallel.vp=2", "train.micro_batch_size=1"), 8)
    assert (layout.dp, layout.num_microbatches) == (2, 4)
    layout = validate(cfg_with("parallel.cp=2", "parallel.tp=2", "parallel.sequence_parallel=true"), 8)
    assert (layout.dp, layout.num_microbatches) == (2, 2)  # context parallel needs no Transformer Engine


@pytest.mark.parametrize("extra, world, message", [
    (["parallel.tp=2"], 3, r"world size 3 is not divisible by parallel.tp\*pp\*cp"),
    (["parallel.tp=8"], 8, r"model.num_attention_heads=4 must be divisible by parallel.tp=8"),
    (["parallel.tp=4"], 4, r"model.num_query_groups=2 must be divisible by parallel.tp=4"),
    (["parallel.pp=3"], 3, r"model.num_layers=4 must be divisible by parallel.pp\*vp"),
    (["parallel.tp=2", "model.ffn_hidden_size=129"], 2,
     r"model.ffn_hidden_size=129 must be divisible by parallel.tp=2"),
    (["parallel.pp=2", "parallel.vp=4"], 2, r"model.num_layers=4 must be divisible by parallel.pp\*vp = 2\*4"),
    (["parallel.vp=2"], 1, r"parallel.vp=2 .* requires parallel.pp > 1"),
    (["parallel.pp=2", "parallel.vp=-2"], 2, r"parallel.vp must be >= 1 or null \(no interleaving\), got -2"),
    (["parallel.pp=2", "parallel.vp=0"], 2, r"parallel.vp must be >= 1 or null \(no interleaving\), got 0"),
    (["parallel.cp=2", "data.seq_length=30"], 2, r"data.seq_length=30 must be divisible by 2\*parallel.cp = 4"),
    (["parallel.cp=2", "parallel.tp=4", "model.num_query_groups=4", "parallel.sequence_parallel=true",
      "data.seq_length=36"], 8, r"data.seq_length/parallel.cp = 36/2 must be divisible by parallel.tp=4"),
    (["parallel.tp=2", "parallel.sequence_parallel=true", "data.seq_length=33"], 2,
     r"data.seq_length/parallel.cp = 33/1 must be divisible by parallel.tp=2"),
    (["parallel.sequence_parallel=true"], 1, r"sequence_parallel=true requires parallel.tp > 1"),
    (["train.global_batch_size=6"], 2, r"train.global_batch_size=6 must be divisible by train.micro_batch_size\*dp = "
                                       r"2\*2 = 4 \(e.g. 4 or 8\)"),
    (["train.fp8=hybrid"], 1, r"train.fp8='hybrid' requires Transformer Engine"),
    (["train.min_lr=1.0"], 1, r"train.min_lr=1.0 must be in \[0, train.lr="),
    (["train.warmup_iters=1000"], 1, r"train.warmup_iters=1000 must be in \[0, train.train_iters=100\]"),
    (["loss.group_size=0"], 1, r"loss.group_size must be >= 1, got 0"),
    (["loss.gamma=0"], 1, r"loss.gamma must be > 0, got 0"),
    (["model.hidden_size=0"], 1, r"model.hidden_size must be > 0, got 0"),
    (["model.make_vocab_size_divisible_by=0"], 1, r"model.make_vocab_size_divisible_by must be >= 1, got 0"),
    (["model.make_vocab_size_divisible_by=-128"], 1, r"model.make_vocab_size_divisible_by must be >= 1, got -128"),
    (["model.num_query_groups=3"], 1, r"model.num_attention_heads=4 must be divisible by model.num_query_groups=3"),
    (["checkpoint.save_interval=10"], 1, r"checkpoint.save_interval=10 needs checkpoint.save"),
    (["checkpoint.finetune=true"], 1, r"checkpoint.finetune=true needs checkpoint.load"),
    (["parallel.pp=2", "parallel.vp=2", "train.micro_batch_size=1", "train.global_batch_size=3"], 2,
     r"micro-batches per step .* = 3 must be divisible by parallel.pp=2"),
    (["model.rope_scaling.low_freq_factor=4"], 1, r"high_freq_factor > low_freq_factor"),
    (["model.family=qwen2"], 1, r"model.qkv_bias=false with model.family=qwen2: Qwen2 attention always has q/k/v"),
    (["model.qkv_bias=true"], 1, r"model.qkv_bias=true with model.family=llama: HF Llama's attention_bias also"),
    (["parallel.tp=0"], 1, r"parallel.tp must be >= 1, got 0"),
    (["parallel.cp=-1"], 1, r"parallel.cp must be >= 1, got -1"),
    (["parallel.overlap_param_gather=true", "parallel.distributed_optimizer=false"], 1,
     r"overlap_param_gather=true requires parallel.distributed_optimizer"),
    (["checkpoint.save=/tmp/x", "checkpoint.keep_last=0"], 1, r"checkpoint.keep_last must be >= 1 or null, got 0"),
    (["train.micro_batch_size=true"], 1, r"train.micro_batch_size must be an integer, got True"),
    (["train.adam_beta1=1.5"], 1, r"train.adam_beta1 must be in \[0, 1\), got 1.5"),
    (["train.adam_beta2=-0.1"], 1, r"train.adam_beta2 must be in \[0, 1\), got -0.1"),
    (["train.adam_beta2=1"], 1, r"train.adam_beta2 must be in \[0, 1\), got 1.0"),
    (["train.adam_eps=0"], 1, r"train.adam_eps must be > 0, got 0.0"),
    (["train.weight_decay=-0.01"], 1, r"train.weight_decay must be >= 0, got -0.01"),
    (["train.clip_grad=-1"], 1, r"train.clip_grad must be >= 0, got -1.0"),
    (["train.decay_iters=0"], 1, r"train.decay_iters must be >= 1 or null \(= train.train_iters\), got 0"),
    (["train.decay_iters=1", "train.warmup_iters=2"], 1,
     r"train.decay_iters=1 must be >= train.warmup_iters=2: the decay to train.min_lr ends at decay_iters"),
])
def test_validation_errors_name_field_and_value(extra, world, message):
    with pytest.raises(ValueError, match=message):
        validate(cfg_with(*extra), world)


def test_fp8_needs_bf16_even_with_transformer_engine(monkeypatch):
    import sys

    # (bft_megatron.config re-exports the function validate under the module's name)
    monkeypatch.setattr(sys.modules["bft_megatron.config.validate"], "have_transformer_engine", lambda: True)
    with pytest.raises(ValueError, match=r"train.fp8='hybrid' requires train.bf16=true"):
        validate(cfg_with("train.fp8=hybrid", "train.bf16=false"), 1)
    with pytest.raises(ValueError, match=r"data.seq_length=100 must be a multiple of 8\*cp"):
        validate(cfg_with("train.fp8=hybrid", "train.bf16=true", "data.seq_length=100"), 1)
    assert validate(cfg_with("train.fp8=hybrid", "train.bf16=true", "data.seq_length=128"), 1).dp == 1


def test_demo_config_validates():
    cfg = load_config("configs/demo_cpu.yaml")
    assert validate(cfg, 1).dp == 1
    assert cfg.loss.method == "bft" and cfg.train.bf16 is False
    assert cfg.data.train and cfg.data.output_dir  # the bundled demo data, prepared on first use


def test_config_warnings_flag_settings_that_defeat_themselves():
    from bft_megatron.config import config_warnings

    assert config_warnings(load_config("configs/demo_cpu.yaml")) == []
    got = config_warnings(load_config("configs/demo_cpu.yaml", ["data.seq_length=4096", "loss.sft_warmup_iters=120"]))
    assert len(got) == 2
    assert "data.seq_length=4096 exceeds model.max_position_embeddings=" in got[0]
    assert "loss.sft_warmup_iters=120 >= train.train_iters=120: loss.method=bft never runs" in got[1]
    assert config_warnings(load_config("configs/demo_cpu.yaml", ["loss.method=sft", "loss.sft_warmup_iters=500"])) == []
    valid_only = config_warnings(load_config("configs/demo_cpu.yaml", ["data.train=null"]))  # silently unused before
    assert valid_only == ["data.valid lists 1 source(s) but data.train none: a training run neither prepares nor "
                          "compares them; it reads runs/demo_cpu/data as prepared (its valid/ split only if present). "
                          "List data.train too to prepare both (--eval-only prepares and checks data.valid alone)"]
    assert config_warnings(load_config("configs/demo_cpu.yaml", ["data.train=null"]), eval_only=True) == []
    # without data.output_dir a training run is refused (preflight), an evaluation too
    assert config_warnings(load_config("configs/demo_cpu.yaml", ["data.train=null", "data.output_dir="])) == []
    unsaved = ["checkpoint.save=null", "checkpoint.async_save=true", "checkpoint.keep_last=2"]
    assert config_warnings(load_config("configs/demo_cpu.yaml", unsaved)) == [
        "checkpoint.async_save=true and checkpoint.keep_last=2 without checkpoint.save: nothing is saved, so they do "
        "nothing"]
    assert config_warnings(load_config("configs/demo_cpu.yaml", unsaved[:1] + ["checkpoint.keep_last=null"])) == [
        "checkpoint.save is not set: the trained weights are not saved (no checkpoint at the end or on a signal, no "
        "HF export)"]  # a finished run said nothing: its weights were gone without a word
    synthetic_unsaved = unsaved[:1] + ["checkpoint.keep_last=null", "data.train=null", "data.valid=null",
                                       "data.output_dir="]
    assert config_warnings(load_config("configs/demo_cpu.yaml", synthetic_unsaved)) == []  # a smoke test
    assert config_warnings(load_config("configs/demo_cpu.yaml", unsaved[::2]))[0].startswith(
        "checkpoint.keep_last=2 without checkpoint.save")


def test_idle_notes_name_a_finished_run_and_a_missing_validation_split():
    from bft_megatron.training.fit import idle_notes

    cfg = load_config("configs/demo_cpu.yaml", ["train.eval_interval=10"])
    assert idle_notes(cfg, 0, has_valid=True) == []
    done, no_valid = idle_notes(cfg, cfg.train.train_iters, has_valid=False)
    assert "already train.train_iters=120: nothing to train" in done
    assert "train.eval_interval=10 but there is no validation split" in no_valid
    [alone] = idle_notes(load_config("configs/demo_cpu.yaml", ["train.eval_on_start=true", "train.eval_interval=0"]), 0,
                       has_valid=False)
    assert alone.startswith("train.eval_on_start=true but there is no validation split")
    [both] = idle_notes(load_config("configs/demo_cpu.yaml", ["train.eval_interval=10", "train.eval_on_start=true"]),
                        0, has_valid=False)
    assert both.startswith("train.eval_interval=10 and train.eval_on_start=true but there is no validation split")


@pytest.mark.parametrize("overrides, from_scratch, noted", [
    (["loss.sft_warmup_iters=0"], True, True), (["loss.sft_warmup_iters=0", "loss.method=dft"], True, True),
    (["loss.sft_warmup_iters=0"], False, False), ([], True, False),
    (["loss.sft_warmup_iters=0", "loss.method=sft"], True, False)])
def test_bft_from_a_random_initialisation_is_noted(overrides, from_scratch, noted):
    """DFT/BFT weights are the model's probabilities: from random weights without an SFT warm-up the lm loss
    does not fall, which the start-up notes say (the demo's own warm-up, a loaded model or SFT: no note)."""
    from bft_megatron.training.fit import idle_notes

    notes = idle_notes(load_config("configs/demo_cpu.yaml", overrides), 0, True, from_scratch=from_scratch)
    assert bool(notes) == noted
    if noted:
        assert "randomly initialised model" in notes[0] and "loss.sft_warmup_iters" in notes[0]


def test_data_sources_are_validated_by_the_data_layer():
    with pytest.raises(ValueError, match="data config: template='nope'"):
        validate(load_config("configs/demo_cpu.yaml", ["data.template=nope"]), 1)


def test_fp8_needs_a_multiple_of_8_tokens_per_rank(monkeypatch):
    validate_mod = importlib.import_module("bft_megatron.config.validate")
    monkeypatch.setattr(validate_mod, "have_transformer_engine", lambda: True)
    with pytest.raises(ValueError, match=r"data.seq_length=36 must be a multiple of 8\*cp\*\(tp with sequence "
                                         r"parallel\) = 16"):
        validate_mod.validate(cfg_with("train.fp8=hybrid", "parallel.cp=2", "data.seq_length=36"), 2)
    validate_mod.validate(cfg_with("train.fp8=hybrid", "parallel.cp=2", "data.seq_length=32"), 2)
    # Without sequence parallelism every TP rank holds all the tokens: 40 = 8*5 is enough at tp=2.
    validate_mod.validate(cfg_with("train.fp8=hybrid", "parallel.tp=2", "data.seq_length=40"), 2)


@pytest.mark.parametrize("extra, world, message", [
    (["model.hidden_size=72", "model.ffn_hidden_size=144"], 1, r"model.hidden_size = 72 must be a multiple of 16"),
    (["model.hidden_size=96", "model.num_query_groups=4", "parallel.tp=4"], 4,
     r"model.hidden_size/parallel.tp = 24 must be a multiple of 16"),
    (["model.ffn_hidden_size=136", "parallel.tp=2"], 2,
     r"model.ffn_hidden_size/parallel.tp = 68 must be a multiple of 16"),
    (["model.hidden_size=48", "model.num_attention_heads=16", "model.num_query_groups=1"], 1,
     r"\(model.hidden_size \+ 2\*num_query_groups\*head_dim\)/parallel.tp = 54 must be a multiple of 8"),
    (["model.hidden_size=32", "model.num_attention_heads=16", "model.ffn_hidden_size=64", "parallel.tp=2"], 2,
     r"\(model.hidden_size \+ 2\*num_query_groups\*head_dim\)/parallel.tp = 20 must be a multiple of 8"),  # 40 rows
])
def test_fp8_needs_the_gemm_widths_transformer_engine_asserts(extra, world, message, monkeypatch):
    """TE's assert_dim_for_fp8_exec fails at the first FP8 forward on the GPU; validation names the width first."""
    validate_mod = importlib.import_module("bft_megatron.config.validate")
    monkeypatch.setattr(validate_mod, "have_transformer_engine", lambda: True)
    with pytest.raises(ValueError, match=r"train.fp8='hybrid': " + message):
        validate_mod.validate(cfg_with("train.fp8=hybrid", *extra), world)
    validate_mod.validate(cfg_with(*extra), world)  # the same shapes are fine in BF16
