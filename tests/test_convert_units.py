"""Unit tests of the convert building blocks (no megatron process groups): layouts, name table, I/O, errors."""

from __future__ import annotations

import json
import os

import pytest
import torch

from bft_megatron.config.base import ConfigError
from bft_megatron.config.schema import ModelConfig
from bft_megatron.convert.cli import parse_size
from bft_megatron.convert.hf_io import HFReader, ShardWriter, finalize_shards
from bft_megatron.config.hf import merge_hf_config
from bft_megatron.convert.importer import model_config_from_hf_dir
from bft_megatron.convert.mapping import (EMBEDDING, LAYER_RULES, OUTPUT, detect_spec, global_rules, layer_rules,
                                          rule_by_megatron_name)
from bft_megatron.convert.qkv import merge_gate_up, merge_qkv, split_gate_up, split_qkv
from bft_megatron.convert.tensors import cast, to_hf, to_megatron
from tests.convert_models import read_safetensors_dir


def _rows(n: int, start: int = 0) -> torch.Tensor:
    """``[n, 2]`` with row r = (start + r, start + r): makes row provenance visible."""
    return (torch.arange(n) + start).float().unsqueeze(1).repeat(1, 2)


def test_qkv_interleaves_per_query_group():
    # 4 query heads, 2 groups, head_dim 1: group g holds q heads 2g, 2g+1, then k_g, then v_g.
    q, k, v = _rows(4, 0), _rows(2, 100), _rows(2, 200)
    fused = merge_qkv(q, k, v, num_heads=4, num_groups=2, head_dim=1)
    assert fused[:, 0].tolist() == [0, 1, 100, 200, 2, 3, 101, 201]
    back = split_qkv(fused, 4, 2, 1)
    assert all(torch.equal(a, b) for a, b in zip(back, (q, k, v)))


@pytest.mark.parametrize("heads,groups,head_dim", [(8, 8, 4), (8, 2, 4), (8, 1, 4), (4, 2, 16)])
def test_qkv_round_trip_weights_and_bias(heads, groups, head_dim):
    q, k, v = torch.randn(heads * head_dim, 6), torch.randn(groups * head_dim, 6), torch.randn(groups * head_dim, 6)
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(merge_qkv(q, k, v, heads, groups, head_dim), heads,
                                                           groups, head_dim), (q, k, v)))
    qb, kb, vb = q[:, 0].clone(), k[:, 0].clone(), v[:, 0].clone()
    fused = merge_qkv(qb, kb, vb, heads, groups, head_dim)
    assert fused.shape == ((heads + 2 * groups) * head_dim,)
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(fused, heads, groups, head_dim), (qb, kb, vb)))


def test_gate_up_is_per_tp_shard():
    gate, up = _rows(4, 0), _rows(4, 100)
    assert merge_gate_up(gate, up, tp=1)[:, 0].tolist() == [0, 1, 2, 3, 100, 101, 102, 103]
    fused = merge_gate_up(gate, up, tp=2)
    assert fused[:, 0].tolist() == [0, 1, 100, 101, 2, 3, 102, 103]
    g, u = split_gate_up(fused, tp=2)
    assert torch.equal(g, gate) and torch.equal(u, up)


def test_layout_errors_name_the_bad_value():
    with pytest.raises(ValueError, match="num_query_groups=3"):
        merge_qkv(torch.zeros(8, 2), torch.zeros(2, 2), torch.zeros(2, 2), 8, 3, 1)
    with pytest.raises(ValueError, match="k projection has 3 rows, expected 2"):
        merge_qkv(torch.zeros(8, 2), torch.zeros(3, 2), torch.zeros(2, 2), 8, 2, 1)
    with pytest.raises(ValueError, match="linear_qkv has 5 rows"):
        split_qkv(torch.zeros(5, 2), 8, 2, 1)
    with pytest.raises(ValueError, match="not divisible by tensor-parallel size 4"):
        merge_gate_up(torch.zeros(6, 2), torch.zeros(6, 2), tp=4)


def test_name_table_covers_both_specs():
    te = {r.megatron("te") for r in LAYER_RULES}
    local = {r.megatron("local") for r in LAYER_RULES}
    assert "self_attention.linear_qkv.layer_norm_weight" in te and "input_layernorm.weight" in local
    assert "mlp.linear_fc1.layer_norm_weight" in te and "pre_mlp_layernorm.weight" in local
    post_norm = ("model.layers.{i}.post_attention_layernorm.weight",)
    assert rule_by_megatron_name("pre_mlp_layernorm.weight", "local").hf == post_norm
    assert detect_spec(["decoder.layers.0.input_layernorm.weight"]) == "local"
    assert detect_spec(["decoder.layers.self_attention.linear_qkv.layer_norm_weight"]) == "te"
    assert not any(r.bias for r in layer_rules(qkv_bias=False))
    assert OUTPUT not in global_rules(tied=True) and OUTPUT in global_rules(tied=False)
    with pytest.raises(KeyError, match="linear_qkv.bias"):
        rule_by_megatron_name("self_attention.linear_qkv.bias", "local", qkv_bias=False)
    with pytest.raises(ValueError, match="unknown layer spec 'fast'"):
        EMBEDDING.megatron("fast")


def test_vocab_padding_round_trip_and_mismatch():
    m = ModelConfig(hidden_size=2, num_attention_heads=1, num_layers=1, ffn_hidden_size=2, vocab_size=5)
    emb = torch.randn(5, 2)
    padded = to_megatron(EMBEDDING, {"model.embed_tokens.weight": emb}.__getitem__, m, None, padded_vocab=8)
    assert padded.shape == (8, 2) and torch.equal(padded[5:], torch.zeros(3, 2))
    ((name, back),) = to_hf(EMBEDDING, padded, m, None)
    assert name == "model.embed_tokens.weight" and torch.equal(back, emb)
    with pytest.raises(ValueError, match="has 6 rows but vocab_size is 5"):
        to_megatron(EMBEDDING, lambda n: torch.zeros(6, 2), m, None, padded_vocab=8)


def test_shard_writer_bounds_files_and_reader_streams(tmp_path):
    out = str(tmp_path)
    tensors = {f"t{i}": torch.full((100,), float(i)) for i in range(5)}  # 400 bytes each
    writer = ShardWriter(out, max_shard_bytes=900)
    for name, t in tensors.items():
        writer.add(name, t)
    writer.flush()
    finalize_shards(out, [writer.manifest], writer.total_bytes)
    files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    assert files == ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                     "model-00003-of-00003.safetensors"]
    assert all(os.path.getsize(os.path.join(out, f)) < 900 + 400 for f in files)
    umask = os.umask(0)
    os.umask(umask)
    # readable like the other exported files (safetensors itself creates 0600 files)
    assert {os.stat(os.path.join(out, f)).st_mode & 0o777 for f in files} == {0o666 & ~umask}
    reader = HFReader(out)
    assert torch.equal(reader.get("t3"), tensors["t3"]) and reader.consumed == {"t3"}
    with pytest.raises(KeyError, match="tensor 'nope' not found"):
        reader.get("nope")
    with open(os.path.join(out, "model.safetensors.index.json")) as fh:
        assert json.load(fh)["metadata"]["total_size"] == 2000
    assert set(read_safetensors_dir(out)) == set(tensors)
    with pytest.raises(FileExistsError, match="already holds HF weights"):
        ShardWriter(out)


def test_a_damaged_shard_is_named_with_the_tensor(tmp_path):
    """A file cut short (an interrupted copy) or an index naming the wrong file gave safetensors' or json's own
    message (a SafetensorError traceback, "Unterminated string", a bare KeyError), naming neither file nor tensor."""
    out = str(tmp_path)
    writer = ShardWriter(out, max_shard_bytes=900)
    for i in range(3):
        writer.add(f"t{i}", torch.full((100,), float(i)))
    writer.flush()
    finalize_shards(out, [writer.manifest], writer.total_bytes)
    first, second = (os.path.join(out, f"model-0000{i}-of-00002.safetensors") for i in (1, 2))
    with open(os.path.join(out, "model.safetensors.index.json")) as fh:
        index = json.load(fh)
    index["weight_map"]["t0"] = os.path.basename(second)  # t0 lives in the first file
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as fh:
        json.dump(index, fh)
    with pytest.raises(ValueError, match=r"the index maps tensor 't0' to model-00002-of-00002.safetensors, which"):
        HFReader(out).nbytes("t0")
    with pytest.raises(ValueError, match=r"model-00002-of-00002.safetensors: cannot read tensor 't0'"):
        HFReader(out).get("t0")
    size = os.path.getsize(first)
    with open(first, "r+b") as fh:
        fh.truncate(size - 100)  # the data cut short
    with pytest.raises(ValueError, match=r"model-00001-of-00002.safetensors: cannot read tensor 't1' .* damaged or "
                                         r"cut short"):
        HFReader(out).get("t1")
    with open(first, "r+b") as fh:
        fh.truncate(40)  # the header cut short
    with pytest.raises(ValueError, match=r"model-00001-of-00002.safetensors: unreadable safetensors header"):
        HFReader(out).nbytes("t1")


def test_reader_needs_safetensors(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither model.safetensors.index.json nor model.safetensors"):
        HFReader(str(tmp_path))


def _write_config(path, **kw) -> str:
    base = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96, "vocab_size": 100}
    base.update(kw)
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(base, fh)
    return str(path)


def test_transformers5_rope_parameters_are_read(tmp_path):
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
    m = model_config_from_hf_dir(_write_config(tmp_path, rope_parameters=rope))
    assert m.rope_theta == 500000.0 and m.rope_scaling is not None and m.rope_scaling.factor == 8.0
    # The trainer's `model.from_hf` reads the same fields.
    trained = merge_hf_config(ModelConfig(from_hf=str(tmp_path)), explicit=set())
    assert trained.rope_theta == 500000.0 and trained.rope_scaling == m.rope_scaling
    plain = model_config_from_hf_dir(_write_config(tmp_path, rope_parameters={"rope_type": "default",
                                                                              "rope_theta": 1e6}))
    assert plain.rope_theta == 1e6 and plain.rope_scaling is None


def test_unsupported_configs_are_rejected(tmp_path):
    with pytest.raises(ConfigError, match="GemmaForCausalLM"):  # (1 + weight) norms, GeGLU: another model
        model_config_from_hf_dir(_write_config(tmp_path, architectures=["GemmaForCausalLM"]))
    with pytest.raises(ValueError, match="head_dim=31 is not a positive even number"):
        model_config_from_hf_dir(_write_config(tmp_path, head_dim=31))
    # a head_dim other than hidden/heads is read (megatron's kv_channels; transformers' Llama takes it too)
    assert model_config_from_hf_dir(_write_config(tmp_path, head_dim=32)).kv_channels == 32
    # Llama's attention_bias biases o_proj too: said before any tensor is read ("no megatron mapping" before)
    with pytest.raises(ConfigError, match=r"attention_bias=true \(Llama with biases on its q/k/v/o projections\)"):
        model_config_from_hf_dir(_write_config(tmp_path, attention_bias=True))
    with pytest.raises(ConfigError, match=r"mlp_bias=true \(Llama with biases on its MLP\) is not supported"):
        model_config_from_hf_dir(_write_config(tmp_path, mlp_bias=True))
    assert model_config_from_hf_dir(_write_config(tmp_path, attention_bias=False, mlp_bias=False)).family == "llama"
    # another MLP activation is another model (it imported silently, and trained as SwiGLU)
    with pytest.raises(ConfigError, match=r"hidden_act='gelu' is not supported \(the trainer's MLP is SwiGLU"):
        model_config_from_hf_dir(_write_config(tmp_path, hidden_act="gelu"))
    assert model_config_from_hf_dir(_write_config(tmp_path, hidden_act="silu")).family == "llama"
    # without max_window_layers transformers' default 28 applies: a 2-layer model has no sliding layer, 40 layers do
    assert model_config_from_hf_dir(_write_config(tmp_path, architectures=["Qwen2ForCausalLM"],
                                                  use_sliding_window=True)).family == "qwen2"
    with pytest.raises(ValueError, match="use_sliding_window=true with max_window_layers=28 < num_hidden_layers=40"):
        model_config_from_hf_dir(_write_config(tmp_path, architectures=["Qwen2ForCausalLM"], use_sliding_window=True,
                                               num_hidden_layers=40))
    with pytest.raises(ValueError, match="max_window_layers=1 < num_hidden_layers=2"):
        model_config_from_hf_dir(_write_config(tmp_path, architectures=["Qwen2ForCausalLM"], use_sliding_window=True,
                                               max_window_layers=1))
    # Qwen2 slides only in layers >= max_window_layers (none here), or not at all without a window: global attention
    for extra in ({"max_window_layers": 2}, {"sliding_window": None}, {"sliding_window": None, "num_hidden_layers": 40},
                  {"sliding_window": None, "max_window_layers": 1}):
        m = model_config_from_hf_dir(_write_config(tmp_path, architectures=["Qwen2ForCausalLM"],
                                                   use_sliding_window=True, **extra))
        assert m.family == "qwen2"


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("100MiB") == 100 * 2**20 and parse_size("123") == 123
    # the in-job export (checkpoint.export_hf) shards like the CLI's default and transformers' "5GB"
    from bft_megatron.convert.hf_io import DEFAULT_SHARD_BYTES
    from bft_megatron.convert.cli import _parser

    assert DEFAULT_SHARD_BYTES == _parser().parse_args(["export", "--ckpt", "c", "--out", "o"]).max_shard_size
    with pytest.raises(Exception, match="bad size '5 parsecs'"):
        parse_size("5 parsecs")
    for zero in ("0", "0GB", "0.1B"):  # refused here, naming the option's value, not later as max_shard_bytes
        with pytest.raises(Exception, match=f"bad size '{zero}': a shard must hold at least 1 byte"):
            parse_size(zero)


def test_an_out_that_is_a_file_is_refused_before_any_work(tmp_path):
    """Both ended in a NotADirectoryError traceback (the export only after writing everything to its staging)."""
    from bft_megatron.convert.hf_io import begin_staging
    from bft_megatron.convert.importer import _refuse_existing

    (tmp_path / "out").write_text("x")
    for check in (_refuse_existing, begin_staging):
        with pytest.raises(FileExistsError, match="out exists and is not a directory"):
            check(str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no staging directory left behind
    from bft_megatron.convert.exporter import export_checkpoint

    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "metadata.json").write_text("{}")  # refused before this (unreadable) checkpoint is opened
    with pytest.raises(FileExistsError, match="out exists and is not a directory"):
        export_checkpoint(str(tmp_path / "ckpt"), str(tmp_path / "out"))


def test_convert_without_a_direction_names_the_choices(capsys):
    """``bft-megatron convert`` alone said "the following arguments are required: direction"."""
    from bft_megatron.convert.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    assert "the following arguments are required: {import,export}" in capsys.readouterr().err


def test_a_missing_checkpoint_is_named_as_missing(tmp_path):
    """``convert export --ckpt`` with a typo said "not a dist checkpoint (no metadata.json) nor a run directory",
    as if the directory existed."""
    from bft_megatron.convert.exporter import resolve_checkpoint_dir

    with pytest.raises(FileNotFoundError, match=r"no/such/run: no such checkpoint directory \(relative paths"):
        resolve_checkpoint_dir("no/such/run")
    with pytest.raises(FileNotFoundError, match="not a dist checkpoint") as err:  # exists, but holds none
        resolve_checkpoint_dir(str(tmp_path))
    assert "HF model already" not in str(err.value)
    (tmp_path / "config.json").write_text("{}")  # an HF model folder given to export: says so, and what to run
    with pytest.raises(FileNotFoundError, match=r"it is an HF model already \(bft-megatron convert import --hf "):
        resolve_checkpoint_dir(str(tmp_path))


def test_low_memory_import_spills_only_transformed_tensors():
    """``--low-memory`` spills what conversion creates (QKV interleave, fc1 [gate; up]); tensors passed
    through unchanged stay the reader's own (file-backed) tensors."""
    from bft_megatron.convert.importer import _convert
    from bft_megatron.convert.mapping import layer_rules

    m = ModelConfig(hidden_size=8, num_attention_heads=2, num_query_groups=1, num_layers=1, ffn_hidden_size=6,
                    vocab_size=16)
    shapes = {"self_attn.q_proj.weight": (8, 8), "self_attn.k_proj.weight": (4, 8), "self_attn.v_proj.weight": (4, 8),
              "self_attn.o_proj.weight": (8, 8), "mlp.gate_proj.weight": (6, 8), "mlp.up_proj.weight": (6, 8),
              "mlp.down_proj.weight": (8, 6), "input_layernorm.weight": (8,), "post_attention_layernorm.weight": (8,)}
    tensors = {f"model.layers.0.{k}": torch.randn(*v) for k, v in shapes.items()}

    class Reader:
        def get(self, name):
            return tensors[name]

    new = {r.local: _convert(r, Reader(), m, 0, 16)[1] for r in layer_rules(False)}
    assert {k for k, v in new.items() if v} == {r.local for r in layer_rules(False) if r.kind in ("qkv", "gate_up")}
    assert any(not v for v in new.values())


def test_shards_are_kept_where_chmod_is_refused(tmp_path, monkeypatch):
    """Some mounts refuse chmod: the export keeps its shards (written by then) and only warns."""
    def refuse(*args, **kwargs):
        raise PermissionError("operation not permitted")

    writer = ShardWriter(str(tmp_path))
    writer.add("t", torch.ones(3))
    writer.flush()
    monkeypatch.setattr(os, "chmod", refuse)
    finalize_shards(str(tmp_path), [writer.manifest], writer.total_bytes)
    assert torch.equal(HFReader(str(tmp_path)).get("t"), torch.ones(3))


def test_import_names_a_mistyped_or_file_hf_path(tmp_path):
    """`--hf` mistyped, or given the config.json itself: the message names the path as given and what to pass
    (it used to say "<hf>/config.json does not exist" and "config.json/config.json does not exist")."""
    from bft_megatron.convert.importer import import_hf

    out = str(tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError, match=r"--hf .*hf_lama: no such directory.*give the HF model's directory"):
        import_hf(str(tmp_path / "hf_lama"), out)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=rf"config.json is a file; .*e.g. --hf {hf}\)"):
        import_hf(str(hf / "config.json"), out)
    assert not os.path.exists(out)


@pytest.mark.parametrize("vocab_size, kept", [(None, True), (4000, False)])
def test_a_rejected_template_config_keeps_its_generation_config_for_the_same_vocabulary(tmp_path, vocab_size, kept):
    """A fine-tune with another rope_theta (longer context) gets a synthesised config.json; its generation config
    (stop ids such as Llama-3.1's <|eom_id|>, sampling defaults) was rebuilt from scratch too, losing them. Kept
    where the template has the model's vocabulary; not from a template of another vocabulary."""
    from bft_megatron.convert.hf_config import write_hf_metadata
    from bft_megatron.convert.sources import find_sources
    from tests.test_convert_tokenizer import DEMO_TOKENIZER, TINY_MODEL

    demo = {"data": {"tokenizer": DEMO_TOKENIZER, "template": "chatml"}, "model": {}}
    hf = tmp_path / "hf"
    write_hf_metadata(str(hf), TINY_MODEL, torch.float32, find_sources(demo))
    with open(hf / "generation_config.json") as fh:
        gen = json.load(fh)
    gen.update(do_sample=True, temperature=0.6, eos_token_id=gen["eos_token_id"] + [7])
    with open(hf / "generation_config.json", "w") as fh:
        json.dump(gen, fh)
    changes = {"rope_theta": 1e6, **({"vocab_size": vocab_size} if vocab_size else {})}
    other = ModelConfig(**{**TINY_MODEL.__dict__, **changes})
    sources = find_sources({**demo, "model": {"from_hf": str(hf)}})
    write_hf_metadata(str(tmp_path / "out"), other, torch.float32, sources)
    with open(tmp_path / "out" / "config.json") as fh:
        assert json.load(fh)["rope_theta"] == 1e6  # synthesised
    with open(tmp_path / "out" / "generation_config.json") as fh:
        out = json.load(fh)
    assert (out.get("temperature") == 0.6 and 7 in out["eos_token_id"]) == kept, out


def test_cast_refuses_values_the_export_dtype_cannot_hold():
    """fp16 tops out at 65504: a larger trained weight would be written as inf (NaN logits downstream)."""
    fits = torch.tensor([1.0, -65280.0], dtype=torch.bfloat16)  # bf16 just below 65504
    assert cast("w", fits, torch.float16).dtype == torch.float16
    assert cast("w", fits, None) is fits and cast("w", fits, torch.bfloat16) is fits
    big = torch.tensor([1.0, -7.0e4], dtype=torch.bfloat16)
    assert cast("w", big, torch.float32).dtype == torch.float32  # a wider type: fine
    with pytest.raises(ValueError, match=r"model.norm.weight: a value of magnitude 70144 does not fit float16 "
                                         r"\(largest 65504\); export in bf16 or fp32"):
        cast("model.norm.weight", big, torch.float16)
    already = torch.tensor([float("inf"), 1.0])  # not made by the cast: passed on as it is
    assert torch.isinf(cast("w", already, torch.float16)).any()
    with pytest.raises(ValueError, match="does not fit float16"):  # a NaN elsewhere does not hide the overflow
        cast("w", torch.tensor([float("nan"), 7.0e4]), torch.float16)


def test_cli_reports_megatrons_checkpointing_exception_as_an_unreadable_checkpoint(monkeypatch):
    """megatron's CheckpointingException (an Exception, not torch's BaseException) used to end as a traceback."""
    from megatron.core.dist_checkpointing.core import CheckpointingException

    from bft_megatron.convert import cli, exporter
    from tests.data_fixtures import logged

    def unreadable(*args, **kwargs):
        raise CheckpointingException("Checkpoint directory /runs/r1/iter_0000030 does not exist")

    monkeypatch.setattr(exporter, "export_checkpoint", unreadable)
    with logged() as records:
        assert cli.main(["export", "--ckpt", "/runs/r1", "--out", "/tmp/never"]) == 2
    assert records[-1].getMessage() == (
        "convert export failed: /runs/r1 cannot be read (CheckpointingException: Checkpoint directory "
        "/runs/r1/iter_0000030 does not exist): a file of the checkpoint is missing or damaged (an interrupted copy, "
        "or a save that was not complete?)")
