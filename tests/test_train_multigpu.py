"""Layout equivalence on several GPUs (NCCL, Transformer Engine): the multi-GPU counterpart of
tests/test_train_parallel.py, for machines with >= 2 GPUs (skipped otherwise, and on CPU).

A one-GPU bf16 run saves its initial weights; every layout fine-tunes from them for 5 steps and must
reproduce its losses within bf16 tolerance (rtol 3e-2: TP/CP/DP change reduction orders in bf16).
Layouts on 2 GPUs: DP2, TP2, TP2+SP, PP2, CP2 with packed (THD) rows — TE's context-parallel ring
attention — and CP2 with padded rows against a padded one-GPU reference. On 4 GPUs also CP2 x TP2+SP,
CP4 and TP2 x PP2.

Status: written for the multi-GPU issue; not yet run on GPUs (only one-GPU machines were available so far).
The same module with the GPU skip removed passes on CPU (gloo, 2 processes, ReferenceAttention).
"""

import os

import pytest
import torch

from tests.launch import launch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs >= 2 GPUs")]

RTOL = 3e-2
GPU_BASE = ["model.hidden_size=256", "model.num_layers=4", "model.num_attention_heads=8", "model.num_query_groups=4",
            "model.ffn_hidden_size=768", "model.vocab_size=512", "model.make_vocab_size_divisible_by=128",
            "model.max_position_embeddings=512", "data.seq_length=256", "data.packing=true", "train.bf16=true",
            "train.global_batch_size=16", "train.micro_batch_size=2", "train.lr=1e-3", "train.warmup_iters=1",
            "train.train_iters=5", "train.dropout=0.0", "loss.method=bft", "loss.group_size=16"]
PADDED = ["data.packing=false"]

TWO = {
    "dp2": [],
    "tp2": ["parallel.tp=2"],
    "tp2_sp": ["parallel.tp=2", "parallel.sequence_parallel=true"],
    "pp2": ["parallel.pp=2", "train.micro_batch_size=1"],
    "cp2": ["parallel.cp=2"],
}
FOUR = {
    "cp2_tp2_sp": ["parallel.cp=2", "parallel.tp=2", "parallel.sequence_parallel=true"],
    "cp4": ["parallel.cp=4"],
    "tp2_pp2": ["parallel.tp=2", "parallel.pp=2", "train.micro_batch_size=1"],
}


def _losses(result):
    return [h["loss"] for h in result["history"]]


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    packed_dir, padded_dir = (str(tmp_path_factory.mktemp(n)) for n in ("packed", "padded"))
    runs = [{"overrides": GPU_BASE + extra + [f"checkpoint.save={d}", "checkpoint.save_interval=100"],
             "save_init": True}
            for extra, d in (([], packed_dir), (PADDED, padded_dir))]
    packed, padded = launch(1, runs, timeout=600)
    return {"packed": (packed_dir, packed), "padded": (padded_dir, padded)}


def _from_init(ref, kind, extra):
    init = os.path.join(ref[kind][0], "iter_0000000")
    return {"overrides": GPU_BASE + (PADDED if kind == "padded" else []) + extra
            + [f"checkpoint.load={init}", "checkpoint.finetune=true"]}


@pytest.fixture(scope="module")
def two_gpus(ref):
    runs = [_from_init(ref, "packed", extra) for extra in TWO.values()]
    runs.append(_from_init(ref, "padded", ["parallel.cp=2"]))
    results = launch(2, runs, timeout=900)
    return dict(zip(list(TWO) + ["cp2_padded"], results))


@pytest.fixture(scope="module")
def four_gpus(ref):
    if torch.cuda.device_count() < 4:
        pytest.skip("needs >= 4 GPUs")
    return dict(zip(FOUR, launch(4, [_from_init(ref, "packed", extra) for extra in FOUR.values()], timeout=900)))


def test_reference_runs_finite(ref):
    for _, result in ref.values():
        losses = _losses(result)
        assert len(losses) == 5 and all(l == l for l in losses) and result["skipped"] == 0


@pytest.mark.parametrize("name", list(TWO) + ["cp2_padded"])
def test_two_gpu_layouts_match_one_gpu(ref, two_gpus, name):
    want = _losses(ref["padded" if name == "cp2_padded" else "packed"][1])
    assert _losses(two_gpus[name]) == pytest.approx(want, rel=RTOL), name


@pytest.mark.parametrize("name", list(FOUR))
def test_four_gpu_layouts_match_one_gpu(ref, four_gpus, name):
    assert _losses(four_gpus[name]) == pytest.approx(_losses(ref["packed"][1]), rel=RTOL), name
