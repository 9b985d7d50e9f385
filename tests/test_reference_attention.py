"""ReferenceAttention (the local spec's core attention): padded, THD and context parallel against an oracle.

The oracle runs plain softmax attention sample by sample on the *global* sequence. Context-parallel
ranks (2 and 4 gloo processes, one spawn for the module) hold load-balanced shards of Q, K, V; their
outputs and the gradients of their Q, K, V shards must equal the oracle's at those positions
(fp32: atol 1e-5 / rtol 1e-5 — only summation order differs).
"""

from types import SimpleNamespace

import pytest
import torch

from bft_megatron.parallel.context_parallel import split_for_cp
from tests.dist_harness import run_distributed

HEADS, GROUPS, DIM = 4, 2, 8
TOL = dict(atol=1e-5, rtol=1e-5)


def _config():
    return SimpleNamespace(num_attention_heads=HEADS, num_query_groups=GROUPS, kv_channels=DIM, attention_dropout=0.0,
                           sequence_parallel=False)


def _module(tp_group, cp_group):
    from bft_megatron.model.reference_attention import ReferenceAttention

    return ReferenceAttention(_config(), 1, None, "self", pg_collection=SimpleNamespace(tp=tp_group, cp=cp_group))


def _reference_attention(q, k, v, cu=None):
    """``q [s, b, h, d]``, ``k/v [s, b, g, d]`` -> ``[s, b, h*d]``; causal within each ``cu`` segment."""
    s, b = q.shape[:2]
    bounds = cu.tolist() if cu is not None else [0, s]
    out = torch.zeros(s, b, HEADS * DIM, dtype=q.dtype)
    rep = HEADS // GROUPS
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        for row in range(b):
            qq = q[lo:hi, row]  # [n, h, d]
            kk = k[lo:hi, row].repeat_interleave(rep, dim=1)
            vv = v[lo:hi, row].repeat_interleave(rep, dim=1)
            scores = torch.einsum("qhd,khd->hqk", qq, kk) / DIM ** 0.5
            causal = torch.ones(hi - lo, hi - lo, dtype=torch.bool).tril()
            probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
            out[lo:hi, row] = torch.einsum("hqk,khd->qhd", probs, vv).reshape(hi - lo, -1)
    return out


def _inputs(seed, s, b):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, b, n, DIM, generator=g) for n in (HEADS, GROUPS, GROUPS)]


CU = torch.tensor([0, 8, 24, 32, 48])  # every sample a multiple of 2*CP for CP <= 4


def _packed_params(cu):
    from megatron.core.packed_seq_params import PackedSeqParams

    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu.int(), cu_seqlens_kv=cu.int(),
                           max_seqlen_q=int(cu.diff().max()), max_seqlen_kv=int(cu.diff().max()))


def _run(rank, world, packed):
    """This CP rank's output and Q/K/V-shard gradients for a fixed global input and output gradient."""
    import torch.distributed as dist

    from bft_megatron.parallel import cpu_compat

    cpu_compat.apply()  # as the trainer does on CPU (megatron's gather asks for the current CUDA device)
    tp = [dist.new_group([r]) for r in range(world)][rank]
    attn = _module(tp, dist.group.WORLD)
    s, b = (48, 1) if packed else (32, 2)
    q, k, v = _inputs(0, s, b)
    grad = torch.randn(s, b, HEADS * DIM, generator=torch.Generator().manual_seed(1))
    cu = CU if packed else None

    def shard(t):  # [s, b, ...] -> this rank's [s/CP, b, ...]
        return split_for_cp(t.transpose(0, 1), world, rank, cu).transpose(0, 1).contiguous()

    ql, kl, vl = (shard(t).requires_grad_() for t in (q, k, v))
    if packed:
        out = attn(ql.squeeze(1), kl.squeeze(1), vl.squeeze(1), None, packed_seq_params=_packed_params(cu)).unsqueeze(1)
    else:
        out = attn(ql, kl, vl, None)
    out.backward(shard(grad))
    return out.detach(), ql.grad, kl.grad, vl.grad


def _scenarios(rank, world):
    return {packed: _run(rank, world, packed) for packed in (False, True)}


@pytest.fixture(scope="module", params=[2, 4], ids=["cp2", "cp4"])
def cp_results(request):
    return request.param, run_distributed(_scenarios, request.param)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "thd"])
def test_context_parallel_matches_oracle_forward_and_backward(cp_results, packed):
    cp, results = cp_results
    s, b = (48, 1) if packed else (32, 2)
    cu = CU if packed else None
    q, k, v = (t.requires_grad_() for t in _inputs(0, s, b))
    grad = torch.randn(s, b, HEADS * DIM, generator=torch.Generator().manual_seed(1))
    want = _reference_attention(q, k, v, cu)
    want.backward(grad)
    for rank, per_rank in enumerate(results):
        out, gq, gk, gv = per_rank[packed]
        for got, full in ((out, want.detach()), (gq, q.grad), (gk, k.grad), (gv, v.grad)):
            expect = split_for_cp(full.transpose(0, 1), cp, rank, cu).transpose(0, 1)
            torch.testing.assert_close(got, expect, **TOL)


def test_cp1_matches_oracle_without_process_groups():
    one = SimpleNamespace(size=lambda: 1, rank=lambda: 0)
    attn = _module(one, one)
    q, k, v = _inputs(3, 48, 1)
    torch.testing.assert_close(attn(q, k, v, None), _reference_attention(q, k, v), **TOL)
    got = attn(q.squeeze(1), k.squeeze(1), v.squeeze(1), None, packed_seq_params=_packed_params(CU))
    torch.testing.assert_close(got, _reference_attention(q, k, v, CU).squeeze(1), **TOL)
    mask = ~torch.ones(48, 48, dtype=torch.bool).tril()
    mask[:, :5] = True  # an explicit mask is honoured on top of causality (True = masked)
    mask[:5, :5] = ~torch.ones(5, 5, dtype=torch.bool).tril()
    ref = _reference_attention(q, k, v)
    got = attn(q, k, v, mask[None, None])
    torch.testing.assert_close(got[:5], ref[:5], **TOL)
    assert not torch.allclose(got[5:], ref[5:])
