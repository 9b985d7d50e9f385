"""The objective (and the NLL feeding it) against the spec's worked example and the per-sample oracle."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bft_megatron.loss import objective, reduce_metrics, vocab_parallel_nll
from bft_megatron.loss.objective import compile_failed
from tests.loss_reference import _reference_loss_from_logits, _reference_objective

FP32 = dict(atol=1e-6, rtol=1e-6)
CASES = [("sft", "v1"), ("dft", "v1"), ("bft", "v1"), ("bft", "v3")]
VARIANTS_ALL = ("v1", "v3")


def _worked_example():
    nll = torch.tensor([[9, 9, 0.1, 0.2, 2.0, 3.0, 0.1, 0.05], [9, 9, 1, 1, 1, 1, 1, 1.0]])
    mask = torch.zeros(2, 8)
    mask[:, 2:] = 1
    return nll, mask


@pytest.mark.parametrize("variant,expected_p,expected", [
    ("v1", [0.265803, 0.367879], 0.165972),
    ("v3", [0.477173, 0.367879], 0.373132),
])
def test_spec_worked_example(variant, expected_p, expected):
    nll, mask = _worked_example()
    loss_sum, units, metrics = objective(nll, mask, variant=variant, group_size=4)
    assert units.dtype == torch.int64 and units.dim() == 0 and int(units) == 2
    assert float(loss_sum / units) == pytest.approx(expected, abs=1e-6)
    ref, ref_p = _reference_objective(nll, mask, variant=variant, group_size=4)
    assert float(ref) == pytest.approx(expected, abs=1e-6)
    assert ref_p == pytest.approx(expected_p, abs=1e-6)
    stats = reduce_metrics(metrics)
    assert stats["p_conf_min"] == pytest.approx(min(expected_p), abs=1e-6)
    assert stats["p_conf_max"] == pytest.approx(max(expected_p), abs=1e-6)
    assert stats["p_conf"] == pytest.approx(sum(expected_p) / 2, abs=1e-6)
    assert stats["sample_weight"] == pytest.approx(1 - sum(expected_p) / 2, abs=1e-6)
    assert stats["short_frac"] == 0.0


def _multi_turn_mask(gen, batch, length, p_empty=0.15):
    """Random masks made of 0-3 assistant spans per row, some rows empty."""
    mask = torch.zeros(batch, length)
    for b in range(batch):
        if torch.rand(1, generator=gen).item() < p_empty:
            continue
        for _ in range(int(torch.randint(1, 4, (1,), generator=gen))):
            lo = int(torch.randint(0, length, (1,), generator=gen))
            hi = int(torch.randint(lo, length + 1, (1,), generator=gen))
            mask[b, lo:hi] = 1
    return mask


def _random_case(seed, batch=3, length=40, vocab=17, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, length, vocab, generator=gen) * scale
    labels = torch.randint(0, vocab, (batch, length), generator=gen)
    return logits, labels, _multi_turn_mask(gen, batch, length)


def _ours(logits, labels, mask, **kw):
    nll = vocab_parallel_nll(logits, labels)
    loss_sum, units, _ = objective(nll, mask, **kw)
    return loss_sum / units.clamp(min=1)


def _check_against_oracle(logits, labels, mask, tol, **kw):
    x1 = logits.clone().requires_grad_(True)
    x2 = logits.clone().double().requires_grad_(True)
    ours = _ours(x1, labels, mask, **kw)
    ref = _reference_loss_from_logits(x2, labels, mask, **kw)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(ours.double(), ref.detach(), **tol)
    torch.testing.assert_close(x1.grad.double(), x2.grad, **tol)


@pytest.mark.parametrize("method,variant", CASES)
@pytest.mark.parametrize("group_size", [1, 3, 8, 64])
@pytest.mark.parametrize("gamma", [1.0, 2.0])
def test_random_multiturn_against_oracle(method, variant, group_size, gamma):
    for seed in range(3):
        logits, labels, mask = _random_case(seed, scale=1.0)
        _check_against_oracle(logits, labels, mask, FP32, method=method, variant=variant, group_size=group_size,
                              gamma=gamma)


@pytest.mark.parametrize("method,variant", CASES)
def test_extreme_logits_and_gamma(method, variant):
    logits, labels, mask = _random_case(7, scale=60.0)
    _check_against_oracle(logits, labels, mask, FP32, method=method, variant=variant, group_size=5, gamma=2.5,
                          eps=1e-3)


def test_windows_use_compacted_supervised_tokens():
    # Two turns separated by unsupervised prompt tokens: the v1 window of size 4 must span both turns.
    nll = torch.tensor([[0.1, 0.1, 9.0, 9.0, 9.0, 2.0, 2.0]])
    mask = torch.tensor([[1, 1, 0, 0, 0, 1, 1.0]])
    loss_sum, units, metrics = objective(nll, mask, group_size=4)
    p = torch.exp(-torch.tensor([0.1, 0.1, 2.0, 2.0]).mean())
    assert reduce_metrics(metrics)["p_conf"] == pytest.approx(float(p), rel=1e-6)


def test_short_and_empty_samples():
    nll = torch.tensor([[0.5, 1.0, 1.5, 0.0], [3.0, 3.0, 3.0, 3.0], [1.0, 2.0, 3.0, 4.0]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1.0]])
    loss_sum, units, metrics = objective(nll, mask, group_size=4)
    assert int(units) == 2                                   # the empty row is not a sample
    stats = reduce_metrics(metrics)
    assert stats["short_frac"] == pytest.approx(0.5)
    p_short = float(torch.exp(-torch.tensor([0.5, 1.0, 1.5]).mean()))   # geometric mean
    p_full = float(torch.exp(-torch.tensor([1.0, 2.0, 3.0, 4.0]).mean()))
    assert stats["p_conf_max"] == pytest.approx(max(p_short, p_full), rel=1e-6)
    all_empty = objective(nll, torch.zeros_like(mask), group_size=4)
    assert int(all_empty[1]) == 0 and float(all_empty[0]) == 0.0


def test_single_microbatch_mean_equals_loss():
    # Spec: on one micro-batch whose samples all have supervised tokens, loss_sum / num_units is the loss.
    logits, labels, _ = _random_case(11)
    mask = torch.ones(labels.shape)
    mask[:, :5] = 0
    for method, variant in CASES:
        ours = _ours(logits, labels, mask, method=method, variant=variant, group_size=6)
        ref = _reference_loss_from_logits(logits.double(), labels, mask, method=method, variant=variant, group_size=6)
        torch.testing.assert_close(ours.double(), ref, **FP32)


@pytest.mark.parametrize("method,variant", CASES)
def test_packed_equals_padded(method, variant):
    gen = torch.Generator().manual_seed(3)
    lengths = [9, 14, 5, 12]
    nll = torch.rand(len(lengths), max(lengths), generator=gen) * 4
    mask = _multi_turn_mask(gen, len(lengths), max(lengths), p_empty=0.0)
    for b, n in enumerate(lengths):
        mask[b, n:] = 0
    packed_nll = torch.cat([nll[b, :n] for b, n in enumerate(lengths)]).unsqueeze(0)
    packed_mask = torch.cat([mask[b, :n] for b, n in enumerate(lengths)]).unsqueeze(0)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    kw = dict(method=method, variant=variant, group_size=4)
    a_sum, a_units, a_m = objective(nll, mask, **kw)
    b_sum, b_units, b_m = objective(packed_nll, packed_mask, cu_seqlens=cu, **kw)
    assert int(a_units) == int(b_units)
    torch.testing.assert_close(a_sum, b_sum, **FP32)
    assert reduce_metrics(a_m).keys() == reduce_metrics(b_m).keys()
    # A packed row is *not* one sample: treating it as one changes the BFT objective.
    if method == "bft":
        one_row = objective(packed_nll, packed_mask, **kw)
        assert int(one_row[1]) == 1


@pytest.mark.parametrize("method,variant", CASES)
def test_packed_trailing_padding_is_ignored(method, variant):
    """Supervised-looking tokens past cu_seqlens[-1] count for no method: not in the loss, the units, the
    gradient or the lm_loss metric."""
    nll = torch.tensor([[1.0, 2.0, 3.0, 0.5, 0.5, 7.0, 7.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1.0]])   # the two trailing tokens lie past cu_seqlens[-1]
    cu = torch.tensor([0, 3, 5])
    kw = dict(method=method, variant=variant, group_size=2)
    loss_sum, units, metrics = objective(nll, mask, cu_seqlens=cu, **kw)
    ref = _reference_objective(nll[:, :5].detach(), mask[:, :5], cu_seqlens=cu, **kw)[0]
    assert int(units) == (2 if method == "bft" else 5)
    torch.testing.assert_close(loss_sum / units, ref.float(), **FP32)
    loss_sum.backward()
    assert torch.all(nll.grad[0, 5:] == 0) and torch.all(nll.grad[0, :5] != 0)
    torch.testing.assert_close(reduce_metrics(metrics)["lm_loss"], 7.0 / 5, **FP32)


@pytest.mark.parametrize("variant", VARIANTS_ALL)
def test_confident_samples_keep_relative_precision(variant):
    """p_b near 1 (NLL ~1e-4): s_b = 1 - p_b is small, and an fp32 exp of the log-probabilities lost ~1e-4 of it
    in v3; loss and gradient must stay within 1e-6 relative of the float64 oracle on the same fp32 NLL."""
    gen = torch.Generator().manual_seed(11)
    nll = torch.rand(3, 64, generator=gen) * 2e-4
    mask = torch.ones(3, 64)
    ours = nll.clone().requires_grad_()
    loss_sum, units, _ = objective(ours, mask, method="bft", variant=variant, group_size=8)
    (loss_sum / units).backward()
    exact = nll.double().requires_grad_()
    ref = _reference_objective(exact, mask, method="bft", variant=variant, group_size=8)[0]
    ref.backward()
    torch.testing.assert_close((loss_sum / units).double(), ref.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(ours.grad.double(), exact.grad, rtol=1e-6, atol=0)


@pytest.mark.parametrize("method,variant", CASES)
def test_non_finite_nll_at_unsupervised_positions_is_ignored(method, variant):
    """inf/NaN where the mask is 0 (a label nobody supervises) leaves loss and gradient finite and equal
    to the same input with those positions finite."""
    mask = torch.tensor([[0, 1, 1, 0, 1, 1, 1, 0.0]])
    bad = torch.tensor([[float("inf"), 1.0, 0.5, float("nan"), 0.2, 2.0, 0.3, float("inf")]], requires_grad=True)
    good = torch.where(mask != 0, bad.detach(), 1.0).requires_grad_()
    kw = dict(method=method, variant=variant, group_size=2)
    out_bad, out_good = objective(bad, mask, **kw), objective(good, mask, **kw)
    assert torch.isfinite(out_bad[0]) and int(out_bad[1]) == int(out_good[1])
    torch.testing.assert_close(out_bad[0], out_good[0], **FP32)
    out_bad[0].backward()
    out_good[0].backward()
    torch.testing.assert_close(bad.grad, good.grad, **FP32)


def test_bf16_logits_within_tolerance():
    # bf16 logits (the model's output dtype): compared with the fp64 oracle on the *same* bf16 values,
    # the only extra error is the bf16 rounding of the returned gradient.
    logits, labels, mask = _random_case(5, batch=4, length=64, vocab=50)
    logits = logits.bfloat16()
    for method, variant in CASES:
        x1 = logits.clone().requires_grad_(True)
        x2 = logits.double().requires_grad_(True)
        ours = _ours(x1, labels, mask, method=method, variant=variant, group_size=16)
        ref = _reference_loss_from_logits(x2, labels, mask, method=method, variant=variant, group_size=16)
        ours.backward()
        ref.backward()
        assert x1.grad.dtype == torch.bfloat16
        torch.testing.assert_close(ours.double(), ref.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(x1.grad.double(), x2.grad, atol=1e-4, rtol=1e-2)


@pytest.mark.parametrize("kwargs,field", [
    (dict(method="ppo"), "method"), (dict(variant="v2"), "variant"), (dict(group_size=0), "group_size"),
    (dict(group_size=2.0), "group_size"), (dict(gamma=0.0), "gamma"), (dict(eps=-1.0), "eps"),
    (dict(eps=0.0), "eps"),
])
def test_bad_arguments_name_the_field(kwargs, field):
    nll, mask = _worked_example()
    with pytest.raises(ValueError, match=field):
        objective(nll, mask, **kwargs)


def test_bad_shapes_are_rejected():
    nll, mask = _worked_example()
    with pytest.raises(ValueError, match="loss_mask"):
        objective(nll, mask[:, :4])
    with pytest.raises(ValueError, match="cu_seqlens"):
        objective(nll, mask, cu_seqlens=torch.tensor([0, 8]))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000),
    batch=st.integers(1, 4),
    length=st.integers(1, 33),
    group_size=st.integers(1, 40),
    case=st.sampled_from(CASES),
    packed=st.booleans(),
)
def test_hypothesis_random_shapes(seed, batch, length, group_size, case, packed):
    gen = torch.Generator().manual_seed(seed)
    nll = torch.rand(batch, length, generator=gen).double() * 5
    mask = (torch.rand(batch, length, generator=gen) < 0.6).double()
    cu = None
    if packed:
        nll, mask = nll.reshape(1, -1), mask.reshape(1, -1)
        cuts = torch.randint(0, batch * length + 1, (3,), generator=gen).tolist()
        cu = torch.tensor(sorted([0, batch * length, *cuts]))  # repeats: zero-length samples, which count for nothing
    method, variant = case
    x = nll.clone().requires_grad_(True)
    loss_sum, units, _ = objective(x, mask, method=method, variant=variant, group_size=group_size, cu_seqlens=cu)
    ours = loss_sum / units.clamp(min=1)
    y = nll.clone().requires_grad_(True)
    ref, _ = _reference_objective(y, mask, method=method, variant=variant, group_size=group_size, cu_seqlens=cu)
    (ours + 0 * x.sum()).backward()
    (ref + 0 * y.sum()).backward()
    torch.testing.assert_close(ours.double(), ref.detach(), **FP32)
    torch.testing.assert_close(x.grad, y.grad, **FP32)


@pytest.mark.parametrize("method,variant", CASES)
def test_default_group_size_on_samples_longer_than_the_window(method, variant):
    """g=256 (the default) on samples of 255, 256, 259 and 700 supervised tokens: v1's minimum runs over real
    sliding windows, v3's centred windows are clipped at both ends."""
    gen = torch.Generator().manual_seed(11)
    lengths = [255, 256, 259, 700]
    nll = torch.rand(len(lengths), max(lengths), generator=gen).double() * 3
    mask = torch.zeros_like(nll)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    x, y = nll.clone().requires_grad_(True), nll.clone().requires_grad_(True)
    loss_sum, units, _ = objective(x, mask, method=method, variant=variant)
    ref, ps = _reference_objective(y, mask, method=method, variant=variant)
    (loss_sum / units).backward()
    ref.backward()
    torch.testing.assert_close((loss_sum / units).double(), ref.detach(), **FP32)
    torch.testing.assert_close(x.grad, y.grad, **FP32)


@pytest.mark.parametrize("variant", VARIANTS_ALL)
def test_negative_nll_clamps_p_to_one(variant):
    """fp32 rounding can leave a near-certain token's NLL slightly below 0: p is clamped to 1, so s = 0 and the
    sample contributes nothing (not a negative weight)."""
    nll = torch.full((1, 6), -1e-3, requires_grad=True)
    loss_sum, units, metrics = objective(nll, torch.ones(1, 6), method="bft", variant=variant, group_size=4)
    loss_sum.backward()
    assert int(units) == 1 and float(loss_sum) == 0.0 and torch.all(nll.grad == 0)
    stats = reduce_metrics(metrics)
    assert stats["p_conf_max"] == 1.0 and stats["sample_weight"] == 0.0


def _packed_case(gen, length, num_samples):
    nll = torch.rand(1, length, generator=gen) * 4
    mask = (torch.rand(1, length, generator=gen) < 0.7).float()
    cuts = torch.randint(1, length, (num_samples - 1,), generator=gen).tolist()
    cu = torch.tensor(sorted({0, length, *cuts}), dtype=torch.int32)
    return nll, mask, cu


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_bft_math_matches_eager(backend):
    """``loss.compile``: BFT's weight math under torch.compile (fullgraph, dynamic shapes) gives the eager loss,
    gradient and metrics for packed and padded rows and both variants, while the token and sample counts
    change between calls without a recompilation per micro-batch."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    gen = torch.Generator().manual_seed(7)
    shapes = [(512, 9), (512, 3), (700, 20), (640, 1), (384, 6)]
    for variant in VARIANTS_ALL:
        for length, samples in shapes:
            for packed in (True, False):
                nll, mask, cu = _packed_case(gen, length, samples)
                if not packed:
                    nll, mask, cu = nll.reshape(4, -1)[:, :length // 4], mask.reshape(4, -1)[:, :length // 4], None
                outs = []
                for compile_backend in (None, backend):
                    x = nll.clone().requires_grad_(True)
                    loss_sum, units, metrics = objective(x, mask, variant=variant, group_size=16, cu_seqlens=cu,
                                                         compile_backend=compile_backend)
                    loss_sum.backward()
                    outs.append((loss_sum.detach(), units, x.grad, reduce_metrics(metrics)))
                (l0, u0, g0, m0), (l1, u1, g1, m1) = outs
                assert int(u0) == int(u1)
                torch.testing.assert_close(l1, l0, **FP32)
                torch.testing.assert_close(g1, g0, **FP32)
                assert m1.keys() == m0.keys()
                for k in m0:
                    assert m1[k] == pytest.approx(m0[k], rel=1e-6, abs=1e-9), k
    # compiled for real (not the eager fallback): one graph per (variant, packed) plus at most one
    # re-specialisation each (e.g. a single sample)
    assert not compile_failed(backend)
    assert 1 <= torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2 * 2 * len(VARIANTS_ALL)


def test_compile_failure_falls_back_to_eager(monkeypatch):
    """A compiler that fails (inductor 2.11 once could not lower a sliced write) costs a warning, not the run."""
    import torch._dynamo
    from torch._dynamo import register_backend

    @register_backend(name="bft_test_broken")
    def _broken(gm, example_inputs):
        raise NotImplementedError("SliceView")

    gen = torch.Generator().manual_seed(3)
    nll, mask, cu = _packed_case(gen, 256, 5)
    want = objective(nll, mask, group_size=16, cu_seqlens=cu)
    import sys

    module = sys.modules["bft_megatron.loss.objective"]  # the package re-exports the function under this name

    warnings = []
    monkeypatch.setattr(module._log, "warning", lambda msg, *args: warnings.append(msg % args))
    got = [objective(nll, mask, group_size=16, cu_seqlens=cu, compile_backend="bft_test_broken") for _ in range(2)]
    assert all(torch.equal(g[0], want[0]) and int(g[1]) == int(want[1]) for g in got)
    assert len(warnings) == 1 and "bft_test_broken" in warnings[0] and "SliceView" in warnings[0]
    assert compile_failed("bft_test_broken")
    torch._dynamo.reset()
