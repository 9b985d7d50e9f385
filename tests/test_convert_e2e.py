"""End to end on CPU: HF -> megatron import, logits at TP1/TP2/PP2 (gloo, spawned), HF export round trip.

One spawned single-process job imports (plainly and with ``low_memory``) and exports every tiny model;
one spawned 2-process job loads the imports at TP1 (x DP2), TP2 and PP2 and returns the logits. The HF
references are computed here. Tolerance: fp32 logits of O(1) scale, max |diff| <= 1e-4 (observed ~1e-6; a wrong QKV
interleave, RoPE or gate/up order changes them by O(1)).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from bft_megatron.convert.importer import SPILL_SUBDIR
from tests.convert_models import CASES, make_model, megatron_logits, read_safetensors_dir
from tests.dist_harness import run_distributed

pytestmark = pytest.mark.slow

ATOL = 1e-4
LOGIT_CASES = [n for n, (_, _, dtype) in CASES.items() if dtype == torch.float32]
LAYOUTS = {"tp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2)}


def _export_while_pruned(ckpt: str, out: str) -> str:
    """The error of an export whose checkpoint is removed after it was opened (checkpoint.keep_last of a run
    still training into the directory), as ``convert export`` reports it."""
    import shutil

    from bft_megatron.convert import exporter

    copy = os.path.join(os.path.dirname(out), "pruned_ckpt")
    shutil.copytree(ckpt, copy)
    layers = exporter._Export.layers

    def pruned_then_layers(self):
        shutil.rmtree(os.path.join(copy, "iter_0000000"))
        return layers(self)

    exporter._Export.layers = pruned_then_layers
    try:
        exporter.export_checkpoint(copy, out)
    except FileNotFoundError as exc:
        return str(exc) + ("" if not os.path.exists(out) else " (and the output exists)")
    finally:
        exporter._Export.layers = layers
    return "no error"


def _convert_worker(rank: int, world: int, root: str, names: list[str]) -> tuple[str, str]:
    """Imports and exports every case; returns the errors of exporting a tied checkpoint as an untied model and
    of an export whose checkpoint is pruned meanwhile."""
    import dataclasses

    from bft_megatron.convert.exporter import _Export, export_checkpoint
    from bft_megatron.convert.importer import import_hf, model_config_from_hf_dir

    for name in names:
        for suffix, low_memory in (("", False), ("_low", True)):  # import --low-memory: spilled, memory-mapped
            ckpt = os.path.join(root, "ckpt" + suffix, name)
            import_hf(os.path.join(root, "hf", name), ckpt, low_memory=low_memory)
            # a small shard limit so that the export is split over several files
            export_checkpoint(ckpt, os.path.join(root, "out" + suffix, name), max_shard_bytes=40_000)
    untied = dataclasses.replace(model_config_from_hf_dir(os.path.join(root, "hf", "qwen2_tied")), tie_embeddings=False)
    pruned = _export_while_pruned(os.path.join(root, "ckpt", names[0]), os.path.join(root, "out_pruned"))
    try:
        _Export(os.path.join(root, "ckpt", "qwen2_tied", "iter_0000000"), untied, None)
    except KeyError as exc:
        return str(exc), pruned
    return "no error", pruned


def _scramble_qkv(model, m) -> None:
    """Rewrite every linear_qkv as plain [Q; K; V] (the classic wrong layout) in place."""
    from bft_megatron.convert.qkv import split_qkv

    head_dim = m.hidden_size // m.num_attention_heads
    with torch.no_grad():
        for layer in model.decoder.layers:
            w = layer.self_attention.linear_qkv.weight
            w.copy_(torch.cat(split_qkv(w, m.num_attention_heads, m.kv_groups, head_dim)))


def _logits_worker(rank: int, world: int, root: str, names: list[str], tokens: torch.Tensor) -> dict:
    import dataclasses

    from megatron.core import parallel_state as ps

    from bft_megatron.config.schema import Config
    from bft_megatron.convert.importer import model_config_from_hf_dir
    from bft_megatron.convert.load import load_weights
    from bft_megatron.model import build_model_chunks
    from bft_megatron.parallel.bootstrap import initialize

    results = {}
    for layout, (tp, pp) in LAYOUTS.items():
        groups = initialize(tp=tp, pp=pp)
        for name in names:
            m = model_config_from_hf_dir(os.path.join(root, "hf", name))
            cfg = Config(model=m)
            cfg.train = dataclasses.replace(cfg.train, bf16=False)
            cfg.parallel = dataclasses.replace(cfg.parallel, tp=tp, pp=pp)
            chunks, _ = build_model_chunks(cfg, groups)
            load_weights(chunks, os.path.join(root, "ckpt", name))
            results[(layout, name)] = megatron_logits(chunks, tokens, groups, m.vocab_size)
            if layout == "tp1" and name == "llama31_untied":
                _scramble_qkv(chunks[0], m)
                results[("tp1_scrambled_qkv", name)] = megatron_logits(chunks, tokens, groups, m.vocab_size)
        ps.destroy_model_parallel()
    return {k: v for k, v in results.items() if v is not None}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("convert"))
    torch.manual_seed(1)
    tokens = torch.randint(3, 250, (2, 11))
    refs = {}
    for name in CASES:
        model = make_model(name, os.path.join(root, "hf", name))
        if name in LOGIT_CASES:
            with torch.no_grad():
                refs[name] = model(tokens).logits
    [(untied_error, pruned_error)] = run_distributed(_convert_worker, 1, root, list(CASES))
    per_rank = run_distributed(_logits_worker, 2, root, LOGIT_CASES, tokens)
    logits = {k: v for r in per_rank for k, v in r.items()}
    return root, refs, logits, untied_error, pruned_error


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", LOGIT_CASES)
def test_megatron_logits_match_hf(converted, name, layout):
    _, refs, logits = converted[:3]
    got, ref = logits[(layout, name)], refs[name]
    assert got.shape == ref.shape
    assert ref.abs().max() > 1.0  # the comparison is not between near-zero logits
    diff = (got - ref).abs().max().item()
    assert diff <= ATOL, f"{name} at {layout}: max |logits diff| {diff:.3g} > {ATOL}"


def test_wrong_qkv_layout_breaks_logits(converted):
    """The logits comparison is sensitive to the QKV interleave (GQA: 8 heads, 2 groups)."""
    _, refs, logits = converted[:3]
    diff = (logits[("tp1_scrambled_qkv", "llama31_untied")] - refs["llama31_untied"]).abs().max().item()
    assert diff > 1000 * ATOL


def test_an_untied_export_of_a_tied_checkpoint_fails_before_writing(converted):
    """The missing output layer is found with the other missing tensors, before any shard is written."""
    assert "untied model but 'output_layer.weight' is missing" in converted[3]


def test_an_export_whose_checkpoint_is_pruned_meanwhile_says_so(converted):
    """keep_last of a run still training into the directory removed the iter_ directory being read: the error
    says that, not only the file megatron or torch missed (or a traceback), and nothing is published."""
    assert "pruned_ckpt/iter_0000000 was removed while it was being exported: a run still training into " \
           in converted[4], converted[4]
    assert converted[4].endswith("(raise keep_last, or export after the run has ended)"), converted[4]


@pytest.mark.parametrize("suffix", ["", "_low"], ids=["import", "import_low_memory"])
@pytest.mark.parametrize("name", list(CASES))
def test_export_of_import_is_bit_identical(converted, name, suffix):
    root = converted[0]
    src = read_safetensors_dir(os.path.join(root, "hf", name))
    out_dir = os.path.join(root, "out" + suffix, name)
    assert not os.path.exists(os.path.join(root, "ckpt" + suffix, name, SPILL_SUBDIR))  # spill files removed
    out = read_safetensors_dir(out_dir)
    assert sorted(out) == sorted(src)
    for key, tensor in src.items():
        assert out[key].dtype == tensor.dtype, key
        assert torch.equal(out[key], tensor), f"{name}: {key} differs"
    if CASES[name][1]["tie_word_embeddings"]:
        assert "lm_head.weight" not in src  # tied small models carry no lm_head
    with open(os.path.join(out_dir, "model.safetensors.index.json"), encoding="utf-8") as fh:
        index = json.load(fh)
    assert set(index["weight_map"]) == set(src) and len(set(index["weight_map"].values())) > 1
    for fname in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert os.path.isfile(os.path.join(out_dir, fname)), fname


@pytest.mark.parametrize("name", ["llama31_untied", "qwen2_tied", "qwen3_untied", "qwen3_tied", "qwen3_tied_wide",
                                  "mistral_untied", "phi3_untied", "phi3_tied", "phi3_longrope", "phi3_partial",
                                  "phi3_partial_longrope", "gemma3_tied", "gemma3_narrow"])
def test_export_loads_with_transformers(converted, name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, refs = converted[:2]
    out_dir = os.path.join(root, "out", name)
    model = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    torch.manual_seed(1)
    tokens = torch.randint(3, 250, (2, 11))
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, refs[name])
    gen = model.generate(tokens[:1, :4], max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, 8)
    AutoTokenizer.from_pretrained(out_dir)
    for fname in ("tokenizer.json", "tokenizer_config.json"):
        with open(os.path.join(out_dir, fname), "rb") as a, open(os.path.join(root, "hf", name, fname), "rb") as b:
            assert a.read() == b.read(), fname


def test_a_bf16_gemma3_export_computes_what_its_source_computes(converted):
    """gemma-3-1b-like in bf16 (one kv head, no RoPE scaling): the export loads, its logits are the source model's
    bit for bit (same weights, same config), and it generates."""
    from transformers import AutoModelForCausalLM

    root = converted[0]
    tokens = torch.randint(3, 250, (2, 11), generator=torch.Generator().manual_seed(1))
    src, out = (AutoModelForCausalLM.from_pretrained(os.path.join(root, d, "gemma3_1b_bf16")).eval()
                for d in ("hf", "out"))
    assert type(out).__name__ == "Gemma3ForCausalLM" and out.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(out(tokens).logits, src(tokens).logits)
    assert out.generate(tokens[:1, :4], max_new_tokens=4, do_sample=False).shape == (1, 8)
