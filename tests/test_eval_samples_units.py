"""Single-process pieces of ``--eval-samples``: the micro-batches' sample origins (padding rows and the packed filler
marked -1), and the rank-0 writer (index in the split, order, each sample once, nulls for a sample without a
supervised token). The end-to-end runs are in tests/test_train_eval_only_samples.py."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bft_megatron.training.batch import StepData
from bft_megatron.training.eval_samples import (COLUMNS, first_samples, host_statistics, local_sample_rows,
                                                write_sample_lines)
from bft_megatron.training.synthetic import SyntheticChatDataset


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("cp", [1, 2])
def test_origins_name_every_sample_of_the_stream_once_and_padding_minus_one(packed, cp):
    ds = SyntheticChatDataset(11, 64, 50, packed=packed, seed=2)
    data = StepData(ds, packed=packed, global_batch_size=4, micro_batch_size=2, dp_rank=0, dp_size=1, seed=1,
                    seq_length=64, device=torch.device("cpu"), cp_size=cp, cp_rank=cp - 1, end_row=len(ds),
                    origins=True)
    seen = []
    for _ in range(3):  # 12 stream positions: the last one a padding row
        for mb in data.next_step():
            segments = mb.cu_seqlens.numel() - 1 if packed else mb.tokens.shape[0]
            assert mb.origins.shape == (segments, 3) and mb.origins.dtype == torch.int64
            seen += [tuple(o) for o in mb.origins.tolist()]
    real = [o for o in seen if o[0] >= 0]
    assert all(o == (-1, -1, -1) for o in seen if o[0] < 0)
    assert len([o for o in seen if o[0] < 0]) >= 1  # the padding row (and packed: the filler segments)
    want = [(r, j, int(ds[r].sample_ids[j])) for r in range(len(ds)) for j in range(len(ds[r].seqlens))]
    assert sorted(real) == want


def _sink_entry(origins, tokens, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = len(tokens)
    tokens = torch.tensor(tokens)
    p = torch.rand(n, generator=gen, dtype=torch.float64)
    present = tokens > 0
    nan = torch.full((n,), float("nan"), dtype=torch.float64)
    stats = {"tokens": tokens, "nll_sum": tokens * 2.0, "lm_loss": torch.where(present, 2.0, nan),
             "p_conf": torch.where(present, p, nan), "sample_weight": torch.where(present, 1 - p, nan),
             "short": present & (tokens < 4)}
    return torch.tensor(origins), host_statistics(stats)


def test_writer_sorts_by_index_writes_each_sample_once_and_nulls_for_empty_samples(tmp_path):
    dataset = SimpleNamespace(row_offsets=np.array([0, 2, 3, 6]))  # rows of 2, 1, 3 samples
    last = SimpleNamespace(is_last_pp_stage=True, tp_rank=0, cp_rank=0)
    sink = [_sink_entry([[2, 1, 41], [-1, -1, -1], [0, 1, 11]], [5, 7, 0], seed=1),
            _sink_entry([[1, 0, 20], [2, 1, 41], [2, 0, 40]], [3, 5, 6], seed=2)]  # row 2 sample 1 read twice
    rows = local_sample_rows(sink, last)
    assert rows.shape == (5, len(COLUMNS))  # the padding entry left out
    for other in (dict(is_last_pp_stage=False), dict(tp_rank=1), dict(cp_rank=1)):  # the same samples: not twice
        assert local_sample_rows(sink, SimpleNamespace(**{**vars(last), **other})).shape == (0, len(COLUMNS))
    path = tmp_path / "s.jsonl"
    assert write_sample_lines(rows, dataset, str(path)) == 4
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [(x["index"], x["sample_id"], x["tokens"]) for x in lines] == [(1, 11, 0), (2, 20, 3), (3, 40, 6),
                                                                          (4, 41, 5)]
    assert lines[0] == {"index": 1, "sample_id": 11, "tokens": 0, "lm_loss": None, "p_conf": None,
                        "sample_weight": None, "short": None}
    assert lines[1]["short"] is True and lines[2]["short"] is False and lines[1]["lm_loss"] == 2.0
    assert lines[2]["p_conf"] == float(sink[1][1][COLUMNS.index("p_conf") - 3][2])
    assert lines[2]["sample_weight"] == pytest.approx(1 - lines[2]["p_conf"], abs=1e-15)


def test_first_samples_counts_rows_without_row_offsets():
    ds = SyntheticChatDataset(5, 64, 50, packed=True, seed=4)
    assert first_samples(ds).tolist() == np.concatenate([[0], np.cumsum([len(ds[r].seqlens) for r in range(5)])]
                                                        ).tolist()


def test_a_non_finite_statistic_is_written_as_null(tmp_path):
    """A supervised sample whose loss overflowed: bare NaN/Infinity is not JSON (jq refuses the file)."""
    origins, stats = _sink_entry([[0, 0, 7], [0, 1, 8]], [4, 4])
    stats[COLUMNS.index("lm_loss") - 3, 0] = float("inf")
    stats[COLUMNS.index("p_conf") - 3, 1] = float("nan")
    rows = local_sample_rows([(origins, stats)], SimpleNamespace(is_last_pp_stage=True, tp_rank=0, cp_rank=0))
    path = tmp_path / "s.jsonl"
    write_sample_lines(rows, SimpleNamespace(row_offsets=np.array([0, 2])), str(path))
    assert "NaN" not in path.read_text() and "Infinity" not in path.read_text()
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert (lines[0]["lm_loss"], lines[1]["p_conf"]) == (None, None) and lines[0]["tokens"] == 4
    assert lines[0]["p_conf"] is not None and lines[1]["lm_loss"] == 2.0
