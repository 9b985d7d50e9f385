"""Single-process pieces of the trainer: batching, sampling order, RoPE scaling, checkpoint pointer,
Adam step untying, and loss_func against a direct computation."""

import os
import time

import numpy as np
import pytest
import torch

from bft_megatron.config.schema import LossConfig
from bft_megatron.loss import objective
from bft_megatron.model.builder import padded_vocab_size
from bft_megatron.model.layers import RMSNorm, llama3_inv_freq
from bft_megatron.data.collate import collate
from bft_megatron.parallel.context_parallel import split_for_cp
from bft_megatron.training.batch import StepData, to_micro_batch
from bft_megatron.training.step import loss_func
from bft_megatron.training.synthetic import SyntheticChatDataset


def test_synthetic_rows_are_deterministic_and_well_formed():
    ds = SyntheticChatDataset(16, 64, 50, packed=True, seed=3)
    a, b = ds[5], ds[5]
    assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.loss_mask, b.loss_mask)
    assert a.seqlens.sum() == a.tokens.size <= 64 and a.seqlens.size > 1
    start = 0
    for n in a.seqlens:  # prompt SEP response EOS: the last position (label beyond EOS) is never supervised
        toks, mask = a.tokens[start:start + n], a.loss_mask[start:start + n]
        assert toks[-1] == 1 and mask[-1] == 0 and mask.sum() == (n - 2) // 2 + 1
        start += n
    assert SyntheticChatDataset(4, 64, 50, packed=False)[0].seqlens.size == 1


def test_micro_batch_fixed_shape_and_thd_params():
    row = SyntheticChatDataset(4, 64, 50, packed=True, seed=1)[0]
    d = collate([row, row], packed=True, pad_id=0)
    mb = to_micro_batch(d, torch.device("cpu"), total=128, pad_id=0)
    assert mb.tokens.shape == (1, 128) and int(mb.cu_seqlens[-1]) == 128
    assert mb.cu_seqlens.tolist()[:-1] == d["cu_seqlens"].tolist()  # one trailing padding segment added
    assert float(mb.loss_mask[0, int(d["tokens"].shape[1]):].sum()) == 0  # trailing padding unsupervised
    assert mb.packed_seq_params().max_seqlen_q == mb.max_seqlen >= int(np.diff(mb.cu_seqlens.numpy()).max())


@pytest.mark.parametrize("packed", [True, False])
def test_context_parallel_shards_cover_the_micro_batch(packed):
    """CP2/CP4 shards: samples padded to 2*CP, shards are the load-balanced chunks, together the whole batch."""
    ds = SyntheticChatDataset(8, 64, 50, packed=packed, seed=2)
    for cp in (2, 4):
        datas = [StepData(ds, packed=packed, global_batch_size=2, micro_batch_size=2, dp_rank=0, dp_size=1, seed=1,
                          seq_length=64, device=torch.device("cpu"), cp_size=cp, cp_rank=r) for r in range(cp)]
        full = StepData(ds, packed=packed, global_batch_size=2, micro_batch_size=2, dp_rank=0, dp_size=1, seed=1,
                        seq_length=64, device=torch.device("cpu"), cp_size=cp, cp_rank=0)
        full.cp_size = 1  # same padding and length, no split: the global micro-batch
        whole = full.next_step()[0]
        shards = [d.next_step()[0] for d in datas]
        total = whole.tokens.numel()
        assert all(s.tokens.numel() == total // cp for s in shards)
        assert total % (2 * cp) == 0 and (not packed or (total // cp) % 8 == 0)  # whole 8-token FP8 tiles
        if packed:
            lens = np.diff(whole.cu_seqlens.numpy())
            assert (lens % (2 * cp) == 0).all() and total >= 2 * 64
            assert all(torch.equal(s.cu_seqlens, whole.cu_seqlens) for s in shards)  # global boundaries
        for key in ("tokens", "labels", "loss_mask"):
            want = getattr(whole, key)
            got = [split_for_cp(want, cp, r, whole.cu_seqlens) for r in range(cp)]
            assert all(torch.equal(g, getattr(s, key)) for g, s in zip(got, shards))
        assert sum(float(s.loss_mask.sum()) for s in shards) == float(whole.loss_mask.sum())


def test_padded_rows_are_widened_to_the_configured_seq_length():
    """Data prepared at a shorter seq_length: every padded micro-batch still has data.seq_length columns."""
    ds = SyntheticChatDataset(8, 32, 50, packed=False, seed=5)
    data = StepData(ds, packed=False, global_batch_size=4, micro_batch_size=2, dp_rank=0, dp_size=1, seed=1,
                    seq_length=64, device=torch.device("cpu"))
    for mb in data.next_step():
        assert mb.tokens.shape == (2, 64) and data.schedule_shape == (64, 2)
        assert float(mb.loss_mask[:, 32:].sum()) == 0 and mb.position_ids[0].tolist() == list(range(64))


def test_prefetched_step_equals_built_step_and_is_dropped_after_a_rewind():
    ds = SyntheticChatDataset(32, 64, 50, packed=True, seed=6)

    def data():
        return StepData(ds, packed=True, global_batch_size=4, micro_batch_size=2, dp_rank=0, dp_size=1, seed=1,
                        seq_length=64, device=torch.device("cpu"))

    plain, ahead = data(), data()
    plain.next_step()
    ahead.next_step()
    ahead.prefetch()
    assert ahead.consumed_rows == plain.consumed_rows  # prefetch does not advance
    for want, got in zip(plain.next_step(), ahead.next_step()):
        assert torch.equal(want.tokens, got.tokens) and torch.equal(want.cu_seqlens, got.cu_seqlens)
    assert ahead.last_real_tokens == plain.last_real_tokens and ahead.consumed_rows == plain.consumed_rows
    ahead.prefetch()  # built for the step at 8 rows ...
    ahead.consumed_rows = 0  # ... but the position is rewound (a benchmark or a reload): rebuilt from 0
    first = data().next_step()
    assert all(torch.equal(a.tokens, b.tokens) for a, b in zip(first, ahead.next_step()))


@pytest.mark.parametrize("packed", [True, False])
def test_real_tokens_count_the_rows_not_the_padding(packed):
    """Effective throughput counts this rank's rows' own tokens, never the padding up to the fixed length."""
    ds = SyntheticChatDataset(32, 64, 50, packed=packed, seed=6)
    data = StepData(ds, packed=packed, global_batch_size=8, micro_batch_size=2, dp_rank=1, dp_size=2, seed=1,
                    seq_length=64, device=torch.device("cpu"))
    data.next_step()
    rows = [int(r) for mb in data.sampler.rank_microbatches(data.sampler.global_batch(0)) for r in mb]
    assert len(rows) == 4
    want = sum(len(ds[r].tokens) for r in rows)
    assert data.last_real_tokens == want < 4 * 64


def test_max_padded_row_length_bounds_every_row():
    ds = SyntheticChatDataset(64, 64, 50, packed=True, seed=4)
    bound = ds.max_padded_row_length(8)
    assert all(int((-(-ds[i].seqlens // 8) * 8).sum()) <= bound for i in range(len(ds)))


def test_step_data_global_batch_is_independent_of_dp_split():
    ds = SyntheticChatDataset(40, 32, 32, packed=False)

    def steps(dp, mbs, n=3):
        datas = [StepData(ds, packed=False, global_batch_size=8, micro_batch_size=mbs, dp_rank=r, dp_size=dp,
                          seed=1, seq_length=32, device=torch.device("cpu")) for r in range(dp)]
        out = []
        for _ in range(n):
            rows = [mb.tokens[i].numpy().tobytes() for d in datas for mb in d.next_step() for i in range(mbs)]
            out.append(sorted(rows))
        return out

    assert steps(1, 8) == steps(2, 2) == steps(4, 1)


def _megatron_scaled(head_dim, theta, factor):
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    return RotaryEmbedding(head_dim, 1.0, rotary_base=theta, rope_scaling=True, rope_scaling_factor=factor,
                           use_cpu_initialization=True).inv_freq


def test_llama3_rope_matches_megatron_defaults_and_hf_formula():
    ours = llama3_inv_freq(128, 500000.0, 8.0, 1.0, 4.0, 8192)
    assert torch.allclose(ours, _megatron_scaled(128, 500000, 8.0), rtol=1e-6, atol=0)
    # Non-default parameters (which megatron 0.16 cannot express): HF's llama3 rule per frequency.
    ours = llama3_inv_freq(64, 10000.0, 32.0, 2.0, 8.0, 4096)
    base = 1.0 / (10000.0 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
    for f, got in zip(base.tolist(), ours.tolist()):
        wavelen = 2 * np.pi / f
        if wavelen < 4096 / 8.0:
            want = f
        elif wavelen > 4096 / 2.0:
            want = f / 32.0
        else:
            smooth = (4096 / wavelen - 2.0) / (8.0 - 2.0)
            want = (1 - smooth) * f / 32.0 + smooth * f
        assert got == pytest.approx(want, rel=1e-5)


def test_rmsnorm_marks_sequence_parallel_and_normalises():
    class C:
        params_dtype, sequence_parallel = torch.float32, True

    norm = RMSNorm(C(), 8, eps=1e-6)
    assert norm.weight.sequence_parallel is True
    x = torch.randn(3, 8)
    ref = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    assert torch.allclose(norm(x), ref, atol=1e-6)


def test_padded_vocab():
    assert padded_vocab_size(128256, 128, 8) == 129024
    assert padded_vocab_size(128, 32, 2) == 128


@pytest.mark.parametrize("method", ["sft", "dft", "bft"])
def test_loss_func_matches_objective_on_full_vocab(method):
    torch.manual_seed(0)
    rows = [SyntheticChatDataset(4, 48, 40, packed=True, seed=1)[i] for i in range(2)]
    mb = to_micro_batch(collate(rows, packed=True), torch.device("cpu"), total=96, pad_id=0)
    logits = torch.randn(1, 96, 40)
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, 40), mb.labels.reshape(-1), reduction="none")
    ref_grad_logits = logits.clone().requires_grad_()
    logits = logits.clone().requires_grad_()
    cfg = LossConfig(method=method, group_size=4)
    loss_sum, units, metrics = loss_func(mb, cfg, None, logits)  # may reuse the logits' storage (inplace)
    ref_sum, ref_units, _ = objective(nll.reshape(1, -1), mb.loss_mask.reshape(1, -1), method=method, group_size=4,
                                      cu_seqlens=mb.cu_seqlens)
    assert units.dtype in (torch.int64, torch.int32) and int(units) == int(ref_units)
    assert float(loss_sum) == pytest.approx(float(ref_sum), rel=1e-6)
    assert metrics.sums["loss"][0].item() == pytest.approx(float(loss_sum), rel=1e-12)
    loss_sum.backward()
    ref_nll = torch.nn.functional.cross_entropy(ref_grad_logits.reshape(-1, 40), mb.labels.reshape(-1),
                                                reduction="none")
    ref_loss, _, _ = objective(ref_nll.reshape(1, -1), mb.loss_mask.reshape(1, -1), method=method, group_size=4,
                               cu_seqlens=mb.cu_seqlens)
    ref_loss.backward()
    torch.testing.assert_close(logits.grad, ref_grad_logits.grad, rtol=1e-5, atol=1e-7)


def test_sft_warmup_switches_method_at_the_configured_step():
    from bft_megatron.config import load_config
    from bft_megatron.training.loop import Trainer, TrainState

    trainer = object.__new__(Trainer)  # only the loss selection is under test
    trainer.cfg = load_config(None, ["loss.method=bft", "loss.sft_warmup_iters=3"])
    trainer.state = TrainState(iteration=2)
    assert trainer._loss_cfg().method == "sft"
    trainer.state.iteration = 3
    assert trainer._loss_cfg().method == "bft" and trainer._loss_cfg() is trainer.cfg.loss


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from bft_megatron.data.storage import Row  # noqa: E402
from bft_megatron.parallel.context_parallel import local_to_global_positions  # noqa: E402
from bft_megatron.training.batch import micro_batch_length  # noqa: E402


class _Rows:
    """A minimal dataset of given packed rows (what StepData needs for the micro-batch length)."""

    pad_id = 0

    def __init__(self, rows):
        self.rows = rows

    def max_padded_row_length(self, multiple):
        return max(int((-(-r.seqlens // multiple) * multiple).sum()) for r in self.rows)


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.lists(st.integers(1, 40), min_size=1, max_size=5), min_size=1, max_size=3),
       cp=st.sampled_from([2, 4]), tp_sp=st.sampled_from([1, 2]))
def test_cp_shards_partition_every_packed_micro_batch(lengths, cp, tp_sp):
    """Random packed rows: every sample padded to 2*CP, T a multiple of 16*CP*tp_sp, and the CP shards are a
    partition of the global micro-batch (each token on exactly one rank, at its load-balanced position)."""
    rows = []
    for i, lens in enumerate(lengths):
        lens = np.asarray(lens, dtype=np.int64)
        tokens = np.arange(1, int(lens.sum()) + 1, dtype=np.int64) + 1000 * i  # distinct, nonzero ids
        rows.append(Row(tokens, np.ones(len(tokens), np.float32), lens, np.arange(len(lens)), 64))
    seq = max(64, max(int(r.seqlens.sum()) for r in rows))
    total = micro_batch_length(_Rows(rows), packed=True, micro_batch_size=len(rows), seq_length=seq, cp_size=cp,
                               tp_sp=tp_sp)
    assert total % (16 * cp * tp_sp) == 0
    d = collate(rows, packed=True, pad_multiple=2 * cp)
    whole = to_micro_batch(d, torch.device("cpu"), total=total, pad_id=0)
    assert whole.tokens.shape == (1, total) and (np.diff(whole.cu_seqlens.numpy()) % (2 * cp) == 0).all()
    seen = torch.zeros(total, dtype=torch.long)
    for rank in range(cp):
        shard = to_micro_batch(d, torch.device("cpu"), total=total, pad_id=0, cp_size=cp, cp_rank=rank)
        pos = local_to_global_positions((1, total // cp), cp, rank, whole.cu_seqlens)
        assert torch.equal(shard.tokens.reshape(-1), whole.tokens.reshape(-1)[pos])
        assert torch.equal(shard.loss_mask.reshape(-1), whole.loss_mask.reshape(-1)[pos])
        seen[pos] += 1
    assert bool((seen == 1).all())
    real = whole.tokens[whole.tokens > 0]
    assert sorted(real.tolist()) == sorted(np.concatenate([r.tokens for r in rows]).tolist())  # nothing lost


@pytest.mark.parametrize("setting,expected", [(False, None), (True, "inductor")])
def test_loss_compile_resolves_to_a_backend(setting, expected):
    """``loss.compile``: opt-in inductor compilation of BFT's weight math; off by default."""
    from bft_megatron.training.step import loss_compile_backend

    assert LossConfig().compile is False
    assert loss_compile_backend(LossConfig(compile=setting)) == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), None])
def test_all_finite_flags_exactly_the_non_finite_elements(dtype, bad):
    """The loop's one-pass check (max-abs norm) agrees with ``isfinite().all()``: NaN and +-inf anywhere
    in any tensor are caught; huge finite values (a sum would overflow) and empty tensors are not."""
    from bft_megatron.training.loop import all_finite

    big = torch.finfo(dtype).max
    tensors = [torch.full((1000,), big, dtype=dtype), torch.zeros(0, dtype=dtype),
               torch.randn(37, 3, dtype=torch.float64)]
    assert bool(all_finite(tensors))
    for which, pos in [(0, 0), (0, 999), (2, (36, 2))]:
        poisoned = [t.clone() for t in tensors]
        if bad is not None:
            poisoned[which][pos] = bad
        assert bool(all_finite(poisoned)) == (bad is None)
        assert bool(all_finite(poisoned)) == all(bool(torch.isfinite(t).all()) for t in poisoned)
    assert bool(all_finite([]))


def test_single_process_without_torchrun_gets_a_free_port(monkeypatch):
    """Two single-process runs on one host must not both bind 29500; torchrun's own settings are kept."""
    from bft_megatron.parallel import bootstrap

    seen = []
    monkeypatch.setattr(bootstrap.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(bootstrap.dist, "init_process_group", lambda **kw: seen.append(dict(os.environ)))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    monkeypatch.setattr(os, "environ", env)  # a plain dict, restored after the test
    bootstrap._init_process_group("gloo", 1)
    assert seen[-1]["WORLD_SIZE"] == "1" and seen[-1]["MASTER_PORT"] != "29500"
    env["MASTER_PORT"] = "29611"
    bootstrap._init_process_group("gloo", 1)
    assert seen[-1]["MASTER_PORT"] == "29611"


def test_cli_listens_for_exit_signals_before_building_and_loading(monkeypatch):
    """A SIGUSR1/SIGTERM during data preparation or checkpoint loading asks for a clean exit (instead of killing
    the rank with no checkpoint and no RESUME marker), and train.exit_duration_minutes counts from there; fit
    learns whether the checkpointer loaded anything."""
    import signal
    from types import SimpleNamespace

    import bft_megatron.checkpoint as checkpoint
    import bft_megatron.training.build as build
    import bft_megatron.training.fit as fit_mod
    from bft_megatron import train
    from bft_megatron.parallel import bootstrap
    from tests.launch import TINY

    seen = {}

    def build_trainer(*args):
        seen["handler"] = signal.getsignal(signal.SIGUSR1)
        return SimpleNamespace()

    def fit(trainer, checkpointer, exit_request, from_scratch):
        seen["exit_request"], seen["from_scratch"] = exit_request, from_scratch
        return SimpleNamespace(iteration=0, skipped_steps=0, consumed_rows=0)

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    monkeypatch.setattr(bootstrap, "initialize", lambda *a, **k: SimpleNamespace())
    monkeypatch.setattr(bootstrap, "destroy", lambda *a, **k: None)
    monkeypatch.setattr(build, "build_trainer", build_trainer)
    monkeypatch.setattr(checkpoint, "Checkpointer",
                        lambda cfg, groups, weights_only=False: SimpleNamespace(load=lambda trainer: None))
    monkeypatch.setattr(fit_mod, "fit", fit)
    try:
        assert train.main(TINY) == 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    request = seen["exit_request"]
    assert seen["handler"] == request._handler  # installed before the trainer was built
    assert request.started <= time.time()
    assert seen["from_scratch"] is True  # the checkpointer loaded nothing: fit's start-up notes are told so


@pytest.mark.parametrize("sequence_parallel,total", [(True, 192), (False, 160)])
def test_trainer_rounds_packed_cp_micro_batches_for_sequence_parallel(sequence_parallel, total):
    """The trainer hands TP to the batch builder only with sequence parallelism: a CP2 packed micro-batch whose
    longest row pads to 140 tokens is rounded to 16*CP*TP = 64 (192) with SP on TP2, else to 16*CP = 32 (160)."""
    from types import SimpleNamespace

    from bft_megatron.config import load_config
    from bft_megatron.training.loop import Trainer

    ds = SyntheticChatDataset(16, 64, 50, packed=True, seed=2)
    ds.max_padded_row_length = lambda multiple: 140
    cfg = load_config(None, ["data.seq_length=64", "train.global_batch_size=4", "train.micro_batch_size=1",
                             f"parallel.sequence_parallel={str(sequence_parallel).lower()}", "parallel.tp=2",
                             "parallel.cp=2"])
    groups = SimpleNamespace(tp_size=2, tp_rank=0, cp_size=2, cp_rank=0, dp_rank=0, dp_size=1,
                             device=torch.device("cpu"))
    stub = SimpleNamespace(cfg=cfg, groups=groups)
    assert Trainer._step_data(stub, ds, seed=1).total == total


def test_the_data_plan_line_states_rows_and_epochs():
    from bft_megatron.config import load_config
    from bft_megatron.training.data import data_plan_line

    class Split(list):
        index = {"num_samples": 1509}

    cfg = load_config(None, ["data.seq_length=512", "train.train_iters=120", "train.global_batch_size=8"])
    line = data_plan_line(cfg, Split(range(400)))
    assert line == ("training data: 400 rows of 512 tokens (1509 samples); train.train_iters=120 x "
                    "train.global_batch_size=8 = 960 rows = 2.40 epochs")
    assert "samples" not in data_plan_line(cfg, list(range(960))) and "= 1.00 epochs" in data_plan_line(cfg, [0] * 960)
