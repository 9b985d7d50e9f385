"""Phi3 longrope scaling and partial rotary on CPU (gloo, spawned): megatron logits = transformers'
``Phi3ForCausalLM`` at TP1, TP2 and PP2 on rows shorter than ``original_max_position_embeddings`` (where transformers
uses the short factors), packed samples (THD) = each sample alone, and the comparison sees each piece: the long
factors, or no attention factor, move the logits far beyond tolerance.

Cases (tests/convert_models.py): ``phi3_longrope`` (Phi-3.5-mini-like: whole heads, factor 4 so the attention
factor a = 1.155 is a softmax scale of a^2), ``phi3_partial`` (Phi-4-mini's 0.75 partial rotary, no scaling) and
``phi3_partial_longrope`` (Phi-4-mini-like: partial 0.75 with longrope, a on the rotated channels only,
model/rotary_scale.py). Import/export round trip and the export read by transformers: tests/test_convert_e2e.py.
"""

from __future__ import annotations

import pytest
import torch

from tests.convert_models import CASES as ALL_CASES
from tests.convert_models import megatron_logits
from tests.test_model_gemma3_logits import _build, _packed_logits, collect_logits, logits_diff

pytestmark = pytest.mark.slow

ATOL = 1e-4
CASES = ("phi3_longrope", "phi3_partial", "phi3_partial_longrope")
LONGROPE = ("phi3_longrope", "phi3_partial_longrope")
LAYOUTS = {"tp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2)}
BROKEN = ("long_factors", "no_attention_factor")


def _break(model, case: str, how: str) -> None:
    """Undo one longrope piece of a built TP1 model, in place."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from bft_megatron.model.layers import longrope_inv_freq

    rope = ALL_CASES[case][1]["rope_scaling"]
    if how == "long_factors":
        emb = model.rotary_pos_emb
        emb.inv_freq = longrope_inv_freq(2 * emb.inv_freq.numel(), 10000.0, rope["long_factor"])
        RotaryEmbedding.forward.cache_clear()
        return
    for layer in model.decoder.layers:  # no_attention_factor: plain 1/sqrt(d) scores, no hook on the rotary channels
        attention = layer.self_attention
        attention.linear_qkv._forward_hooks.clear()
        attention.core_attention.scale = 1 / 16 ** 0.5


def _worker(rank: int, world: int, root: str, tokens: torch.Tensor, packed: torch.Tensor) -> dict:
    from megatron.core import parallel_state as ps

    from bft_megatron.parallel.bootstrap import initialize

    results = {}
    for layout, (tp, pp) in LAYOUTS.items():
        groups = initialize(tp=tp, pp=pp)
        for case in CASES:
            chunks, m = _build(root, case, tp, pp, groups, seq_length=64)
            results[(case, layout)] = megatron_logits(chunks, tokens, groups, m.vocab_size)
            if layout == "tp1":
                results[(case, "packed")] = _packed_logits(chunks[0], packed)[..., :m.vocab_size]
            if layout == "tp1" and case in LONGROPE:
                for how in BROKEN:
                    chunks, m = _build(root, case, tp, pp, groups, seq_length=64)
                    _break(chunks[0], case, how)
                    results[(case, how)] = megatron_logits(chunks, tokens, groups, m.vocab_size)
        ps.destroy_model_parallel()
    return {k: v for k, v in results.items() if v is not None}


@pytest.fixture(scope="module")
def logits(tmp_path_factory):
    return collect_logits(str(tmp_path_factory.mktemp("longrope")), CASES, _worker, seed=3)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(logits, case, layout):
    diff = logits_diff(logits, case, layout)
    assert diff <= ATOL, f"{case} at {layout}: max |logits diff| {diff:.3g} > {ATOL}"


@pytest.mark.parametrize("case", CASES)
def test_packed_samples_match_each_sample_alone(logits, case):
    assert logits_diff(logits, case, "packed") <= ATOL, f"{case} packed"


@pytest.mark.parametrize("how", BROKEN)
@pytest.mark.parametrize("case", LONGROPE)
def test_the_comparison_sees_longrope(logits, case, how):
    diff = logits_diff(logits, case, how)
    assert diff > 100 * ATOL, f"{case} {how}: logits moved only {diff:.3g}"
