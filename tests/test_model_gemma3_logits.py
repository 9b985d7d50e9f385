"""Gemma 3 on CPU (gloo, spawned): megatron logits = transformers' ``Gemma3ForCausalLM`` on tiny random models
whose rows are longer than the sliding window, at TP1, TP2 and PP2; packed samples (THD rows through
:class:`ReferenceAttention`) = each sample alone in transformers; and the same logits *differ* beyond tolerance when
one Gemma-specific piece is broken (so the comparison sees each of them).

Cases (tests/convert_models.py): ``gemma3_tied``: 2 layers [sliding, global], window 4 over 11-token rows, head_dim
24 (queries 96 wide over hidden 64), softmax scale 20**-0.5, linear RoPE factor 8 on the global layer, theta 1e4 on
the sliding one; ``gemma3_narrow``: MedGemma-27B's proportions (queries 48 < hidden 64, scale (hidden/heads)**-0.5),
untied, window 3. The import/export round trip of these and of ``gemma3_1b_bf16`` is in test_convert_e2e.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from tests.convert_models import make_model, megatron_logits
from tests.dist_harness import run_distributed

pytestmark = pytest.mark.slow

ATOL = 1e-4
CASES = ("gemma3_tied", "gemma3_narrow")  # queries wider / narrower than the model (27B: narrower)
LAYOUTS = {"tp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2)}
# name -> how the megatron model is broken after loading (each must move the logits far beyond ATOL)
BROKEN = ("no_window", "window_off_by_one", "global_rope_unscaled", "no_embed_scale", "default_softmax_scale",
          "one_centred_norms")
PACKED = (7, 9, 5)  # sample lengths of the packed row (> window 4)


def _import(rank: int, world: int, root: str, cases: list[str]) -> None:
    from bft_megatron.convert.importer import import_hf

    for case in cases:
        import_hf(os.path.join(root, "hf", case), os.path.join(root, "ckpt", case))


def collect_logits(root: str, cases, worker, seed: int) -> tuple[dict, dict]:
    """``(refs, results)``: transformers' logits per case (two 11-token rows, and the samples of ``PACKED`` each run
    alone, concatenated), and what ``worker(rank, world, root, tokens, packed)`` returns from 2 gloo ranks, merged,
    after the cases were saved under ``root/hf`` and imported to ``root/ckpt``."""
    torch.manual_seed(seed)
    tokens = torch.randint(3, 250, (2, 11))
    packed = torch.randint(3, 250, (1, sum(PACKED)))
    refs = {}
    for case in cases:
        model = make_model(case, os.path.join(root, "hf", case))
        with torch.no_grad():
            pieces = torch.split(packed, list(PACKED), dim=1)
            refs[case] = model(tokens).logits, torch.cat([model(p).logits for p in pieces], dim=1)
    run_distributed(_import, 1, root, list(cases))
    per_rank = run_distributed(worker, 2, root, tokens, packed)
    return refs, {k: v for r in per_rank for k, v in r.items()}


def _build(root: str, case: str, tp: int, pp: int, groups, seq_length: int | None = None):
    from bft_megatron.config.schema import Config
    from bft_megatron.convert.importer import model_config_from_hf_dir
    from bft_megatron.convert.load import load_weights
    from bft_megatron.model import build_model_chunks

    m = model_config_from_hf_dir(os.path.join(root, "hf", case))
    cfg = Config(model=m)
    cfg.train = dataclasses.replace(cfg.train, bf16=False)
    cfg.parallel = dataclasses.replace(cfg.parallel, tp=tp, pp=pp)
    if seq_length is not None:
        cfg.data = dataclasses.replace(cfg.data, seq_length=seq_length)
    chunks, _ = build_model_chunks(cfg, groups)
    load_weights(chunks, os.path.join(root, "ckpt", case))
    return chunks, m


def _packed_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """One THD row of the samples of ``PACKED`` (positions restart per sample) -> logits ``[1, T, V]``."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = torch.tensor([0] + list(torch.tensor(PACKED).cumsum(0)), dtype=torch.int32)
    positions = torch.cat([torch.arange(n) for n in PACKED]).unsqueeze(0)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max(PACKED),
                             max_seqlen_kv=max(PACKED))
    with torch.no_grad():
        return model(tokens, positions, None, packed_seq_params=params)


def _break(model, how: str) -> None:
    """Undo one Gemma 3 piece in a built TP1 model, in place."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    attn = [layer.self_attention for layer in model.decoder.layers]
    if how in ("no_window", "window_off_by_one"):
        for a in attn:
            if a.core_attention.window_left is not None:
                a.core_attention.window_left = None if how == "no_window" else a.core_attention.window_left + 1
    elif how == "global_rope_unscaled":
        emb = model.rotary_pos_emb
        emb.inv_freq = emb.inv_freq * 8.0
        RotaryEmbedding.forward.cache_clear()
    elif how == "no_embed_scale":
        model.embedding.word_embeddings._forward_hooks.clear()
    elif how == "default_softmax_scale":
        for a in attn:
            a.core_attention.scale = a.core_attention.scale * (20 ** 0.5) / (24 ** 0.5)
    elif how == "one_centred_norms":  # Llama's x/rms * w with Gemma's stored w
        for module in model.modules():
            if hasattr(module, "zero_centered"):
                module.zero_centered = False


def _worker(rank: int, world: int, root: str, tokens: torch.Tensor, packed: torch.Tensor) -> dict:
    from megatron.core import parallel_state as ps

    from bft_megatron.parallel.bootstrap import initialize

    results = {}
    for layout, (tp, pp) in LAYOUTS.items():
        groups = initialize(tp=tp, pp=pp)
        for case in CASES:
            chunks, m = _build(root, case, tp, pp, groups)
            results[(case, layout)] = megatron_logits(chunks, tokens, groups, m.vocab_size)
            if layout == "tp1":
                results[(case, "packed")] = _packed_logits(chunks[0], packed)[..., :m.vocab_size]
                # rows as long as the window: built without it (it cuts nothing), sliding layers on local RoPE
                w = m.sliding_window
                chunks, m = _build(root, case, tp, pp, groups, seq_length=w)
                assert chunks[0].config.window_size is None
                results[(case, "short")] = megatron_logits(chunks, tokens[:, :w], groups, m.vocab_size)
        if layout == "tp1":
            for how in BROKEN:
                chunks, m = _build(root, CASES[0], tp, pp, groups)
                _break(chunks[0], how)
                results[(CASES[0], how)] = megatron_logits(chunks, tokens, groups, m.vocab_size)
        ps.destroy_model_parallel()
    return {k: v for k, v in results.items() if v is not None}


def logits_diff(logits, case: str, key: str) -> float:
    """max |megatron - transformers| of :func:`collect_logits`'s result ``key`` of ``case``: a layout or a broken
    variant against the rows' logits, ``"packed"`` against each sample run alone."""
    refs, got = logits
    ref = refs[case][1 if key == "packed" else 0]
    if key == "short":  # causal: the first W positions of the full rows
        ref = ref[:, :got[(case, key)].shape[1]]
    assert got[(case, key)].shape == ref.shape and ref.abs().max() > 1.0
    return (got[(case, key)] - ref).abs().max().item()


@pytest.fixture(scope="module")
def logits(tmp_path_factory):
    return collect_logits(str(tmp_path_factory.mktemp("gemma3")), CASES, _worker, seed=1)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers_past_the_window(logits, case, layout):
    assert logits_diff(logits, case, layout) <= ATOL, f"{case} at {layout}"


@pytest.mark.parametrize("case", CASES)
def test_rows_no_longer_than_the_window_match_transformers(logits, case):
    """data.seq_length = the window: the model is built without it, and its sliding layers keep local RoPE."""
    assert logits_diff(logits, case, "short") <= ATOL, f"{case} short rows"


@pytest.mark.parametrize("case", CASES)
def test_packed_samples_match_each_sample_alone(logits, case):
    """Within a packed row the window and RoPE restart per sample (THD: cu_seqlens, positions per sample)."""
    assert logits_diff(logits, case, "packed") <= ATOL, f"{case} packed"


@pytest.mark.parametrize("how", BROKEN)
def test_each_gemma3_piece_is_seen_by_the_comparison(logits, how):
    diff = logits_diff(logits, CASES[0], how)
    assert diff > 100 * ATOL, f"{how}: logits moved only {diff:.3g}"
