"""Mistral's and Phi3's sliding window on CPU (gloo, spawned): when ``data.seq_length`` exceeds
``model.sliding_window`` the trainer applies the window in every layer (megatron's ``window_size=(W-1, 0)``,
:class:`ReferenceAttention` on CPU, TE on GPUs), so megatron logits equal transformers' ``MistralForCausalLM`` /
``Phi3ForCausalLM`` on rows longer than the window, at TP1 and TP2; packed samples (THD) equal each sample alone;
without the window, or one token wider, the logits differ beyond tolerance.

Cases (tests/convert_models.py): ``mistral_window`` (window 4, GQA, head_dim 24 over hidden 64, untied) and
``phi3_window`` (window 3, MHA, tied, fused qkv/gate_up at the HF boundary), 11-token rows.
"""

from __future__ import annotations

import pytest
import torch

from tests.convert_models import megatron_logits
from tests.test_model_gemma3_logits import _build, _packed_logits, collect_logits, logits_diff

pytestmark = pytest.mark.slow

ATOL = 1e-4
CASES = ("mistral_window", "phi3_window")
LAYOUTS = {"tp1": (1, 1), "tp2": (2, 1)}


def _widen(model, by: int | None) -> None:
    """Break the window of a built TP1 model: None removes it, an int widens it by that many keys."""
    for layer in model.decoder.layers:
        attention = layer.self_attention.core_attention
        assert attention.window_left is not None  # the window is applied in every layer
        attention.window_left = None if by is None else attention.window_left + by


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
                for how, by in (("no_window", None), ("one_wider", 1)):
                    chunks, m = _build(root, case, tp, pp, groups)
                    _widen(chunks[0], by)
                    results[(case, how)] = megatron_logits(chunks, tokens, groups, m.vocab_size)
        ps.destroy_model_parallel()
    return {k: v for k, v in results.items() if v is not None}


@pytest.fixture(scope="module")
def logits(tmp_path_factory):
    return collect_logits(str(tmp_path_factory.mktemp("window")), CASES, _worker, seed=2)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers_past_the_window(logits, case, layout):
    assert logits_diff(logits, case, layout) <= ATOL, f"{case} at {layout}"


@pytest.mark.parametrize("case", CASES)
def test_packed_samples_match_each_sample_alone(logits, case):
    assert logits_diff(logits, case, "packed") <= ATOL, f"{case} packed"


@pytest.mark.parametrize("how", ["no_window", "one_wider"])
@pytest.mark.parametrize("case", CASES)
def test_the_comparison_sees_the_window(logits, case, how):
    diff = logits_diff(logits, case, how)
    assert diff > 100 * ATOL, f"{case} {how}: logits moved only {diff:.3g}"
