"""``train.eval_iters: null``: validation reads every row of the validation split exactly once, whatever the global
batch size and DP layout (the last global batch is filled with padding rows that count for nothing).

Single-process: the step data of every DP rank over one pass supervises exactly the split's tokens and samples.
Trainer (gloo, DP2): the validation metrics of a pass at global batch 6 (64 synthetic rows: the 11th batch holds 4
rows and 2 padding rows; read as rows they would be 2 rows of the next epoch, counted twice) equal those at global
batch 8 (no padding) before any training.
"""

import pytest
import torch

from bft_megatron.config import ConfigError
from bft_megatron.config.schema import load_config
from bft_megatron.config.validate import validate
from bft_megatron.loss.units import unit_counts
from bft_megatron.training.batch import StepData
from bft_megatron.training.data import validation_plan_warning
from bft_megatron.training.synthetic import SyntheticChatDataset
from tests.launch import TINY, launch


def _reference_totals(ds) -> tuple[int, int, int]:
    """(supervised tokens, samples with one, tokens) of the whole dataset, sample by sample."""
    tokens = samples = length = 0
    for r in range(len(ds)):
        row = ds[r]
        start = 0
        for n in row.seqlens:
            supervised = int((row.loss_mask[start:start + n] != 0).sum())
            tokens, samples, start = tokens + supervised, samples + (supervised > 0), start + n
        length += len(row.tokens)
    return tokens, samples, length


@pytest.mark.parametrize("rows,gbs,mbs,dp,packed", [(13, 4, 1, 2, True), (13, 6, 3, 1, True), (10, 8, 2, 2, False),
                                                    (8, 8, 2, 2, True), (3, 8, 4, 2, True)])
def test_a_whole_pass_supervises_every_row_once(rows, gbs, mbs, dp, packed):
    ds = SyntheticChatDataset(rows, 32, 50, packed=packed, seed=5)
    steps = -(-rows // gbs)
    got = torch.zeros(2, dtype=torch.int64)
    real = 0
    for rank in range(dp):
        data = StepData(ds, packed=packed, global_batch_size=gbs, micro_batch_size=mbs, dp_rank=rank, dp_size=dp,
                        seed=3, seq_length=32, device=torch.device("cpu"), end_row=rows)
        for _ in range(steps):
            for mb in data.next_step():
                got += unit_counts(mb.loss_mask, mb.cu_seqlens)
            real += data.last_real_tokens
    tokens, samples, length = _reference_totals(ds)
    assert got.tolist() == [tokens, samples] and real == length
    if steps * gbs > rows:  # without the end the stream wraps into the next epoch: some rows twice
        again = StepData(ds, packed=packed, global_batch_size=gbs, micro_batch_size=mbs, dp_rank=0, dp_size=1,
                         seed=3, seq_length=32, device=torch.device("cpu"))
        wrapped = sum((unit_counts(mb.loss_mask, mb.cu_seqlens) for _ in range(steps) for mb in again.next_step()),
                      torch.zeros(2, dtype=torch.int64))
        assert wrapped[0] > tokens


def test_eval_iters_null_is_a_whole_pass_and_zero_an_error():
    cfg = load_config(None, TINY + ["train.eval_iters=null", "train.eval_interval=2"])
    validate(cfg, world_size=1, require_te=False)
    assert cfg.train.eval_iters is None
    assert validation_plan_warning(cfg, SyntheticChatDataset(5, 32, 50, packed=True)) is None  # nothing read twice
    with pytest.raises(ConfigError, match=r"train\.eval_iters must be >= 1 or null .* got 0"):
        validate(load_config(None, TINY + ["train.eval_iters=0"]), world_size=1, require_te=False)


@pytest.fixture(scope="module")
def evaluations():
    runs = [{"overrides": TINY + extra, "evaluate": True} for extra in (
        ["train.eval_iters=null", "train.global_batch_size=6", "train.micro_batch_size=3"],
        ["train.eval_iters=null", "train.global_batch_size=8", "train.micro_batch_size=2"],
        ["train.eval_iters=8", "train.global_batch_size=8", "train.micro_batch_size=2"],
    )]
    return [r["eval_before"] for r in launch(2, runs)]


def test_whole_pass_metrics_do_not_depend_on_the_batch_layout(evaluations):
    padded, exact, eight = evaluations
    for key in ("lm_loss", "loss", "p_conf", "sample_weight", "token_weight"):
        assert padded[key] == pytest.approx(exact[key], rel=1e-6), key
        assert exact[key] == pytest.approx(eight[key], rel=1e-6), key  # 8 x 8 = the 64 rows, in the same order
