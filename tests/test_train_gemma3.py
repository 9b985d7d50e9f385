"""Gemma 3 through the trainer's layouts (gloo, CPU): a tiny Gemma 3 (4 layers [sliding, global] x 2, an 8-token
window over 32-token packed rows, linear RoPE scaling on the global layers) trained 4 steps at TP1 is reproduced
(fp32, rtol 1e-5) from the same initial weights at:

* TP2 + sequence parallel (x DP2): the post-attention / post-MLP norms sit after the row-parallel linears' reduce-
  scatter, so each TP rank normalises its own tokens and their weights' gradients are all-reduced over TP (the
  ``sequence_parallel`` flag); the head norms' by name;
* PP2 and PP2 x VP2 (x DP2): the sliding/global choice and the RoPE half follow the global layer number on every
  stage and virtual chunk (VP2: one layer per chunk, chunks 1 and 3 sliding);
* CP2 (x DP2): the window compares global token positions across the two CP shards of each sample;
* DP4 with full activation recompute: the [s, 2, 1, d] RoPE tensor goes through megatron's checkpoint function.
"""

from __future__ import annotations

import pytest

from tests.launch import TINY, launch

pytestmark = pytest.mark.slow

RTOL, ATOL = 1e-5, 1e-7
GEMMA = ["model.family=gemma3", "model.qk_norm=true", "model.head_dim=24", "model.sliding_window=8",
         "model.sliding_window_pattern=2", "model.rope_local_theta=10000", "model.rope_theta=1000000",
         "model.rope_linear_factor=8", "model.query_pre_attn_scalar=20", "model.tie_embeddings=true"]
LAYOUTS = {"tp2_sp": ["parallel.tp=2", "parallel.sequence_parallel=true"],
           "pp2": ["parallel.pp=2", "train.micro_batch_size=1"],
           "pp2_vp2": ["parallel.pp=2", "parallel.vp=2", "train.micro_batch_size=1"],
           "cp2": ["parallel.cp=2"],
           "dp4_recompute": ["train.recompute=full"]}


def _losses(result):
    return [h["loss"] for h in result["history"]]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("gemma3_ref"))
    [ref] = launch(1, [{"overrides": TINY + GEMMA + [f"checkpoint.save={run_dir}", "checkpoint.save_interval=100"],
                        "save_init": True}])
    init = [f"checkpoint.load={run_dir}/iter_0000000", "checkpoint.finetune=true"]
    results = launch(4, [{"overrides": TINY + GEMMA + init + extra} for extra in LAYOUTS.values()], timeout=500)
    return ref, dict(zip(LAYOUTS, results))


def test_the_reference_trains(runs):
    """Four finite losses that differ: the weights moved (BFT's loss need not fall monotonically from scratch)."""
    losses = _losses(runs[0])
    assert len(losses) == 4 and all(0 < x < 100 for x in losses) and len(set(losses)) == 4


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layouts_reproduce_the_tp1_losses(runs, name):
    ref, got = runs
    assert _losses(got[name]) == pytest.approx(_losses(ref), rel=RTOL, abs=ATOL)
