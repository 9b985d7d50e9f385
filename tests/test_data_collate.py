"""Collation: padded and packed layouts, CP/SP padding, within-sample label shift, layout equivalence."""

from __future__ import annotations

import numpy as np
import pytest

from bft_megatron.data.collate import collate
from bft_megatron.data.storage import PackedDataset, Row
from bft_megatron.data.tokenizer import load_tokenizer
from tests.data_fixtures import CHATS, DEMO_SP, prepare_dir, synthetic_chats

P = 0  # pad id


def _row(samples, seq_length=16):
    toks = np.concatenate([np.asarray(t, np.int32) for t, _ in samples])
    mask = np.concatenate([np.asarray(m, np.uint8) for _, m in samples])
    return Row(toks, mask, np.asarray([len(t) for t, _ in samples]), np.arange(len(samples)), seq_length)


def test_packed_layout_by_hand():
    row = _row([([10, 11, 12], [1, 1, 0]), ([20, 21, 22, 23, 24], [0, 1, 1, 1, 0])])
    b = collate([row], packed=True, pad_multiple=4, pad_id=P)
    assert b["tokens"].tolist() == [[10, 11, 12, P, 20, 21, 22, 23, 24, P, P, P]]
    assert b["labels"].tolist() == [[11, 12, P, P, 21, 22, 23, 24, P, P, P, P]]
    assert b["loss_mask"].tolist() == [[1, 1, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7]]
    assert b["cu_seqlens"].tolist() == [0, 4, 12] and b["cu_seqlens"].dtype.is_floating_point is False
    assert str(b["cu_seqlens"].dtype) == "torch.int32"
    assert b["cu_seqlens_unpadded"].tolist() == [0, 3, 8]
    assert b["max_seqlen"] == 8 and b["num_segments"] == 2
    assert b["tokens"].dtype == b["labels"].dtype == b["position_ids"].dtype
    assert str(b["loss_mask"].dtype) == "torch.float32" and str(b["tokens"].dtype) == "torch.int64"


def test_packed_micro_batch_concatenates_rows():
    rows = [_row([([1, 2], [1, 0])]), _row([([3, 4, 5], [1, 1, 0]), ([6], [0])])]
    b = collate(rows, packed=True, pad_multiple=2)
    assert b["cu_seqlens"].tolist() == [0, 2, 6, 8]
    assert b["tokens"].shape == (1, 8) and b["tokens"].shape[1] % 2 == 0
    assert b["labels"].tolist() == [[2, P, 4, 5, P, P, P, P]]


def test_padded_layout_by_hand():
    rows = [_row([([5, 6, 7], [1, 1, 0])], seq_length=6), _row([([8, 9], [1, 0])], seq_length=6)]
    b = collate(rows, packed=False, pad_multiple=4, pad_id=P)
    assert b["tokens"].tolist() == [[5, 6, 7, P, P, P, P, P], [8, 9, P, P, P, P, P, P]]
    assert b["labels"].tolist() == [[6, 7, P, P, P, P, P, P], [9, P, P, P, P, P, P, P]]
    assert b["loss_mask"].tolist() == [[1, 1, 0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0]]
    assert b["position_ids"][1].tolist() == list(range(8))
    assert "cu_seqlens" not in b


def test_collate_errors():
    two = _row([([1, 2], [1, 0]), ([3, 4], [1, 0])])
    with pytest.raises(ValueError, match="one sample per row"):
        collate([two], packed=False)
    with pytest.raises(ValueError, match="pad_multiple"):
        collate([two], packed=True, pad_multiple=0)
    with pytest.raises(ValueError, match="empty"):
        collate([], packed=True)


def _per_sample_supervision(ds: PackedDataset, packed: bool, pad_multiple: int) -> dict:
    out: dict[int, tuple] = {}
    for r in range(len(ds)):
        b = collate([ds[r]], packed=packed, pad_multiple=pad_multiple, pad_id=ds.pad_id)
        if packed:
            cu = b["cu_seqlens"].tolist()
            segs = [(0, cu[i], cu[i + 1]) for i in range(len(cu) - 1)]
        else:
            segs = [(i, 0, b["tokens"].shape[1]) for i in range(b["tokens"].shape[0])]
        for sid, (i, lo, hi) in zip(b["sample_ids"].tolist(), segs):
            m = b["loss_mask"][i, lo:hi].bool()
            out[sid] = (b["tokens"][i, lo:hi][m].tolist(), b["labels"][i, lo:hi][m].tolist())
    return out


def test_packed_and_padded_layouts_supervise_identical_tokens(tmp_path):
    chats = synthetic_chats(60, seed=1) + CHATS
    packed = PackedDataset(prepare_dir(tmp_path / "packed", chats, packing=True))
    padded = PackedDataset(prepare_dir(tmp_path / "padded", chats, packing=False))
    assert packed.packed and not padded.packed and len(packed) < len(padded) == len(chats)
    a = _per_sample_supervision(packed, True, 4)
    b = _per_sample_supervision(padded, False, 1)
    assert a.keys() == b.keys() == set(range(len(chats)))
    assert a == b
    assert sum(len(v[1]) for v in a.values()) == packed.index["supervised_tokens"]


def test_decode_packed_row_boundaries_and_masks(tmp_path):
    chats = synthetic_chats(30, seed=2)
    ds = PackedDataset(prepare_dir(tmp_path / "p", chats, packing=True))
    tok = load_tokenizer(DEMO_SP)
    r = max(range(len(ds)), key=lambda i: len(ds[i].seqlens))
    row = ds[r]
    assert len(row.seqlens) >= 2
    b = collate([row], packed=True, pad_multiple=8, pad_id=ds.pad_id)
    cu, cu_real = b["cu_seqlens"].tolist(), b["cu_seqlens_unpadded"].tolist()
    tokens, labels, mask, pos = (b[k][0] for k in ("tokens", "labels", "loss_mask", "position_ids"))
    assert all(x % 8 == 0 for x in cu)
    for i, sid in enumerate(b["sample_ids"].tolist()):
        lo, hi, n = cu[i], cu[i + 1], cu_real[i + 1] - cu_real[i]
        text = tok.decode(tokens[lo: lo + n].tolist())
        msgs = chats[sid]["messages"]
        assert text == f"<|im_start|>user\n{msgs[0]['content']}<|im_end|>\n<|im_start|>assistant\n" \
                       f"{msgs[1]['content']}<|im_end|>\n"
        assert pos[lo:hi].tolist() == list(range(hi - lo))  # reset per sample, continuing into padding
        assert mask[lo + n - 1:hi].sum() == 0  # last real position and padding never supervised
        assert (tokens[lo + n: hi] == ds.pad_id).all()
        sup = labels[lo:hi][mask[lo:hi].bool()].tolist()
        assert tok.decode(sup) == msgs[1]["content"] + "<|im_end|>"
        # labels are the next token of the same sample
        assert labels[lo: lo + n - 1].tolist() == tokens[lo + 1: lo + n].tolist()


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_sample = st.integers(1, 12).flatmap(lambda n: st.tuples(
    st.lists(st.integers(1, 99), min_size=n, max_size=n), st.lists(st.integers(0, 1), min_size=n, max_size=n)))


@settings(max_examples=80, deadline=None)
@given(st.lists(st.lists(_sample, min_size=1, max_size=4), min_size=1, max_size=3), st.sampled_from([1, 2, 4, 6, 8]))
def test_packed_segments_equal_padded_rows(rows_spec, pad_multiple):
    """Whatever the rows and CP/SP padding, each packed segment carries exactly its padded-layout sample."""
    rows = []
    for samples in rows_spec:
        samples = [(t, m[:-1] + [0]) for t, m in samples]  # stored masks end with 0
        rows.append(_row(samples, seq_length=12))
    packed = collate(rows, packed=True, pad_multiple=pad_multiple)
    singles = [_row([s], seq_length=12) for spec in rows_spec for s in [(t, m[:-1] + [0]) for t, m in spec]]
    padded = collate(singles, packed=False, pad_multiple=pad_multiple)
    cu, real = packed["cu_seqlens"].tolist(), packed["cu_seqlens_unpadded"].tolist()
    assert packed["tokens"].shape[1] == cu[-1] and cu[-1] % pad_multiple == 0
    for i in range(len(singles)):
        lo, n = cu[i], real[i + 1] - real[i]
        assert (cu[i + 1] - lo) % pad_multiple == 0 and cu[i + 1] - lo - n < pad_multiple
        for key in ("tokens", "labels", "loss_mask", "position_ids"):
            assert packed[key][0, lo:lo + n].tolist() == padded[key][i, :n].tolist(), key
        assert packed["loss_mask"][0, lo + n - 1:cu[i + 1]].sum() == 0


def test_max_padded_row_length_matches_collate_in_chunks(tmp_path):
    """The trainer's fixed CP micro-batch length: the longest row after per-sample padding, scanned in chunks."""
    ds = PackedDataset(prepare_dir(tmp_path / "p", synthetic_chats(60, seed=4), packing=True))
    for multiple in (1, 4, 8):
        want = max(int(collate([ds[r]], packed=True, pad_multiple=multiple)["tokens"].shape[1])
                   for r in range(len(ds)))
        assert ds.max_padded_row_length(multiple, rows_per_chunk=3) == want
        assert ds.max_padded_row_length(multiple) == want  # cached per multiple
