"""Logits for supervised positions only (``train.supervised_logits_only``, bft_megatron/training/logit_rows.py).

* Host side: the kept rows are exactly the supervised positions in megatron's s-major order; under sequence
  parallelism every TP rank keeps its own slice's rows, padded to one count, and the rank-major gathered order maps
  back to the positions (padding to the dropped slot); each rank keeps a multiple of 8 rows, at least 8.
* The output layer's pre-hook and the scatter back give, at kept rows, the values and gradients of the full
  computation (``_reference_full_rows``), and zeros elsewhere; outside ``selecting_rows`` every row is computed.
  Full logits arriving with row positions (no hook installed) are refused.
* Training (2 gloo processes, fp32): on and off give the same losses and gradient norms (rtol 1e-5) at DP2 with
  packed rows, DP2 with padded rows (micro-batch 2, so ``b > 1``), TP2 + SP, TP2 without SP, PP2 (the output
  layer on the last stage only), CP2 (rows listed per CP shard) and PP2 x VP2 with tied embeddings.
"""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bft_megatron.training.logit_rows import install_row_selection, scatter_rows, selecting_rows, supervised_rows


@settings(max_examples=60, deadline=None)
@given(b=st.integers(1, 3), s_per=st.integers(1, 6), tp_sp=st.sampled_from([1, 2, 4]), density=st.floats(0, 1),
       seed=st.integers(0, 1000))
def test_rows_are_the_supervised_positions_in_s_major_order(b, s_per, tp_sp, density, seed):
    s = s_per * tp_sp
    mask = torch.from_numpy((np.random.default_rng(seed).random((b, s)) < density).astype(np.float32))
    flat = mask.t().reshape(-1).numpy() > 0
    chunk = s * b // tp_sp
    gathered = []
    for rank in range(tp_sp):
        rows, positions = supervised_rows(mask, tp_sp, rank)
        n = rows.numel()
        most = max(int(flat[k * chunk:(k + 1) * chunk].sum()) for k in range(tp_sp))
        assert n % 8 == 0 and most <= n < max(most, 1) + 8  # padded to GEMM-friendly multiples of 8
        assert positions.numel() == tp_sp * n and rows.max() < chunk
        if rank == 0:
            first = positions
        assert torch.equal(positions, first)  # every TP rank agrees on the gathered order
        gathered.append(rows + rank * chunk)
    keep = first < s * b
    assert torch.equal(first[keep], torch.from_numpy(np.flatnonzero(flat)))
    assert torch.equal(torch.cat(gathered)[keep], first[keep])  # a kept row's position is where its rank read it


class _Model(torch.nn.Module):
    """A GPTModel's tail: hidden [s, b, h] -> output_layer(hidden, weight=...) -> logits transposed to [b, s, V]."""

    def __init__(self):
        super().__init__()
        self.post_process = True
        self.output_layer = torch.nn.Linear(4, 5, bias=False)

    def forward(self, hidden):
        return self.output_layer(hidden).transpose(0, 1)


def _reference_full_rows(model, hidden):
    return model(hidden)  # [b, s, V]: every row


def test_selected_rows_give_the_full_rows_values_and_gradients():
    torch.manual_seed(0)
    model = _Model()
    install_row_selection([model])
    mask = torch.tensor([[1, 0, 1, 1, 0, 0], [0, 0, 1, 0, 1, 1]], dtype=torch.float32)  # [b=2, s=6]
    hidden = torch.randn(6, 2, 4, requires_grad=True)
    rows, positions = supervised_rows(mask)
    with selecting_rows(model, rows):
        picked = model(hidden)  # [1, n, V]
    assert picked.shape == (1, 8, 5) and int(mask.sum()) == 6  # 6 supervised rows + 2 padding rows
    values = scatter_rows(picked.pow(2).sum(-1).reshape(-1), positions, tuple(mask.shape))
    full = _reference_full_rows(model, hidden).pow(2).sum(-1)  # [b, s]
    torch.testing.assert_close(values, full * mask, rtol=0, atol=0)
    grad_sel, = torch.autograd.grad(values.sum(), hidden)
    grad_full, = torch.autograd.grad((full * mask).sum(), hidden)
    torch.testing.assert_close(grad_sel, grad_full, rtol=1e-6, atol=0)
    assert model(hidden).shape == (2, 6, 5)  # outside the context: every row again


def test_padding_rows_land_in_the_dropped_slot():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0], requires_grad=True)
    out = scatter_rows(values, torch.tensor([0, 3, 4, 4]), (1, 4))
    assert out.tolist() == [[1.0, 0.0, 0.0, 2.0]]
    out.sum().backward()
    assert values.grad.tolist() == [1.0, 1.0, 0.0, 0.0]


def test_full_logits_with_row_positions_are_refused():
    """A micro-batch listing rows but a model without the row selection (full ``[b, s, V]`` logits) is an error,
    not a silent pairing of labels with the wrong rows (all positions supervised: the sizes would match)."""
    from types import SimpleNamespace

    from bft_megatron.training.step import _token_nll

    mask = torch.ones(2, 3)
    _, positions = supervised_rows(mask)
    batch = SimpleNamespace(labels=torch.zeros(2, 3, dtype=torch.long), logit_positions=positions)
    with pytest.raises(RuntimeError, match="has no row selection"):
        _token_nll(batch, torch.zeros(2, 3, 5), None, None)
    assert _token_nll(batch, torch.zeros(1, positions.numel(), 5), None, None).shape == (2, 3)


LAYOUTS = {"dp2": [], "dp2_padded": ["data.packing=false"], "tp2": ["parallel.tp=2"],
           "tp2_sp": ["parallel.tp=2", "parallel.sequence_parallel=true"], "pp2": ["parallel.pp=2"],
           "cp2": ["parallel.cp=2"], "pp2_vp2_tied": ["parallel.pp=2", "parallel.vp=2", "model.tie_embeddings=true"]}


@pytest.fixture(scope="module")
def runs():
    from tests.launch import TINY, launch

    specs = [{"overrides": TINY + extra + [f"train.supervised_logits_only={flag}"]}
             for extra in LAYOUTS.values() for flag in (True, False)]
    results = launch(2, specs)
    return {name: results[2 * i:2 * i + 2] for i, name in enumerate(LAYOUTS)}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_training_with_supervised_rows_only_matches_every_row(runs, layout):
    selected, full = runs[layout]
    for key in ("loss", "lm_loss", "grad_norm"):
        got, want = [h[key] for h in selected["history"]], [h[key] for h in full["history"]]
        assert len(got) == 4
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7, err_msg=f"{layout}: {key}")
