"""Layout equivalence, resume and crash-safety of the trainer on gloo processes (CPU).

One TP1 reference run saves its initial weights (iteration 0) and checkpoints at steps 2 and 4.
Every other layout fine-tunes from the same initial weights, so all runs start identical:

* DP4, DP4 with full activation recompute, TP2+SP (x DP2), TP2 (x DP2, non-distributed
  optimizer), PP2 (x DP2), PP2 x VP2 (x DP2), TP2 x PP2, CP2 (x DP2), CP4, CP2 x TP2+SP,
  CP2 x PP2, CP2 with full recompute must reproduce the reference losses for 4 steps (fp32; reductions reorder sums ->
  rtol 1e-5); so must CP2 with padded (unpacked) rows against a padded TP1 reference. Under CP
  packed samples are padded to multiples of 2*CP and sharded; attention is ReferenceAttention
  (all-gathered keys/values) on CPU, and BFT's per-sample statistics are gathered over CP;
* resuming the reference from step 2 at the same layout is bitwise identical;
* resuming the TP2+SP x DP2 run's step-2 checkpoint at TP1 x DP1 (TP and DP resharding of model
  and optimizer state) matches its uninterrupted steps 3-4 within rtol 1e-5, and likewise the
  PP2 x VP2 x DP2 run's checkpoint at PP1 and the CP2 x DP2 run's at CP1;
* a process killed after writing step 4's shards but before committing leaves ``latest`` at step
  2; restarting the same config (``checkpoint.save`` = that directory) resumes from it and continues
  bitwise like the reference.
* ``loss.compile=true`` (BFT's weight math through torch.compile/inductor) reproduces the reference losses;
* the word embedding's gradient accumulated straight into ``main_grad`` (default) trains like the unfused
  path through DDP's hook;
* a Qwen2-style variant (tied embeddings, QKV bias) with llama3 RoPE scaling matches its own TP1
  reference at TP2 x PP2 (tied embedding/output gradients are all-reduced across the first and last
  pipeline stages);
* a Qwen3-style variant (query/key head norms, head_dim 32 with hidden 64 and 4 heads: 128-wide queries) matches
  its own TP1 reference at TP2 and at TP2 + SP (x DP2): each TP rank's head-norm gradient covers other heads, and
  megatron all-reduces those weights' gradients over TP by name (``finalize_model_grads``; once under SP too).
"""

import os

import pytest

from tests.launch import TINY, launch, launch_raw

pytestmark = pytest.mark.slow

RTOL, ATOL = 1e-5, 1e-7


def _losses(result):
    return [h["loss"] for h in result["history"]]


def _grad_norms(result):
    return [h["grad_norm"] for h in result["history"]]


PADDED = ["data.packing=false"]
VARIANT = ["model.tie_embeddings=true", "model.qkv_bias=true", "model.family=qwen2", "model.rope_scaling.factor=4",
           "model.rope_scaling.original_max_position_embeddings=16"]
QWEN3 = ["model.family=qwen3", "model.qk_norm=true", "model.head_dim=32"]
QWEN3_LAYOUTS = {"qwen3_tp2": ["parallel.tp=2"], "qwen3_tp2_sp": ["parallel.tp=2", "parallel.sequence_parallel=true"]}


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("ref"))
    variant_dir = str(tmp_path_factory.mktemp("variant"))
    padded_dir = str(tmp_path_factory.mktemp("padded"))
    qwen3_dir = str(tmp_path_factory.mktemp("qwen3"))
    result, variant, padded, qwen3 = launch(1, [
        {"overrides": TINY + [f"checkpoint.save={run_dir}", "checkpoint.save_interval=2"], "save_init": True},
        {"overrides": TINY + VARIANT + [f"checkpoint.save={variant_dir}", "checkpoint.save_interval=100"],
         "save_init": True},
        {"overrides": TINY + PADDED + [f"checkpoint.save={padded_dir}", "checkpoint.save_interval=100"],
         "save_init": True},
        {"overrides": TINY + QWEN3 + [f"checkpoint.save={qwen3_dir}", "checkpoint.save_interval=100"],
         "save_init": True},
    ])
    return run_dir, result, variant_dir, variant, padded_dir, padded, qwen3_dir, qwen3


LAYOUTS = {
    "dp4": [],
    "dp4_recompute": ["train.recompute=full"],
    "tp2_sp": ["parallel.tp=2", "parallel.sequence_parallel=true"],
    "tp2": ["parallel.tp=2", "parallel.distributed_optimizer=false"],
    "pp2": ["parallel.pp=2", "train.micro_batch_size=1"],
    "pp2_vp2": ["parallel.pp=2", "parallel.vp=2", "train.micro_batch_size=1"],
    "tp2_pp2": ["parallel.tp=2", "parallel.pp=2", "train.micro_batch_size=1"],
    "cp2": ["parallel.cp=2"],
    "cp4": ["parallel.cp=4"],
    "cp2_tp2_sp": ["parallel.cp=2", "parallel.tp=2", "parallel.sequence_parallel=true"],
    "cp2_pp2": ["parallel.cp=2", "parallel.pp=2", "train.micro_batch_size=1"],
    "cp2_recompute": ["parallel.cp=2", "train.recompute=full"],
    # the reference's weights (vocabulary padded to 128 rows) at TP2 padded to 256: the 128 new rows keep their
    # random initialisation and must stay out of the softmax (an import padded for TP1 fine-tuned at TP8)
    "tp2_vocab_padded_256": ["parallel.tp=2", "model.make_vocab_size_divisible_by=128"],
}


OBJECTIVES = {"bft_v3": ["loss.variant=v3"], "sft": ["loss.method=sft"]}
OBJECTIVE_LAYOUTS = {"bft_v3_pp2_vp2": ("bft_v3", "pp2_vp2"), "sft_tp2_pp2": ("sft", "tp2_pp2")}


@pytest.fixture(scope="module")
def layouts(ref, tmp_path_factory):
    run_dir, variant_dir = ref[0], ref[2]
    init = os.path.join(run_dir, "iter_0000000")
    tp2_dir = str(tmp_path_factory.mktemp("tp2_sp"))
    vp_dir = str(tmp_path_factory.mktemp("pp2_vp2"))
    cp_dir = str(tmp_path_factory.mktemp("cp2"))
    saves = {"tp2_sp": tp2_dir, "pp2_vp2": vp_dir, "cp2": cp_dir}
    runs = []
    for name, extra in LAYOUTS.items():
        save = [f"checkpoint.save={saves[name]}", "checkpoint.save_interval=2"] if name in saves else []
        runs.append({"overrides": TINY + [f"checkpoint.load={init}", "checkpoint.finetune=true"] + extra + save,
                     "count_state": True})
    # a full resume (optimizer included) of the reference's step 2 at TP2 with the vocabulary padded to 256
    runs.append({"overrides": TINY + [f"checkpoint.load={run_dir}/iter_0000002", "parallel.tp=2",
                                      "model.make_vocab_size_divisible_by=128"]})
    runs.append({"overrides": TINY + VARIANT + [f"checkpoint.load={variant_dir}/iter_0000000",
                                                "checkpoint.finetune=true", "parallel.tp=2", "parallel.pp=2",
                                                "train.micro_batch_size=1"],
                 "count_state": True})
    runs.append({"overrides": TINY + PADDED + [f"checkpoint.load={ref[4]}/iter_0000000", "checkpoint.finetune=true",
                                               "parallel.cp=2"]})
    for objective, layout in OBJECTIVE_LAYOUTS.values():  # the other objectives through pipeline parallelism
        runs.append({"overrides": TINY + [f"checkpoint.load={init}", "checkpoint.finetune=true"]
                     + OBJECTIVES[objective] + LAYOUTS[layout]})
    for extra in QWEN3_LAYOUTS.values():
        runs.append({"overrides": TINY + QWEN3 + extra + [f"checkpoint.load={ref[6]}/iter_0000000",
                                                          "checkpoint.finetune=true"], "count_state": True})
    results = launch(4, runs, timeout=500)
    n = len(LAYOUTS)
    return (dict(zip(LAYOUTS, results)), tp2_dir, results[n + 1], vp_dir, results[n + 2], cp_dir, results[n],
            dict(zip(OBJECTIVE_LAYOUTS, results[n + 3:n + 3 + len(OBJECTIVE_LAYOUTS)])),
            dict(zip(QWEN3_LAYOUTS, results[-len(QWEN3_LAYOUTS):])))


@pytest.mark.parametrize("name", list(OBJECTIVE_LAYOUTS))
def test_other_objectives_through_pipeline_parallelism_match_tp1(ref, layouts, resumed, name):
    """bft v3 at PP2 x VP2 (x DP2) and sft at TP2 x PP2 against their TP1 runs from the same weights: the
    objective's units (samples for bft, tokens for sft) reach megatron's contract from the last stage alike."""
    objective = OBJECTIVE_LAYOUTS[name][0]
    want = resumed[len(resumed) - len(OBJECTIVES) + list(OBJECTIVES).index(objective)]  # the last runs
    got = layouts[7][name]
    assert _losses(want) != _losses(ref[1])  # another objective than the reference's bft v1
    assert _losses(got) == pytest.approx(_losses(want), rel=RTOL, abs=ATOL)
    assert _grad_norms(got) == pytest.approx(_grad_norms(want), rel=RTOL, abs=ATOL)


def test_reference_trains(ref):
    result = ref[1]
    losses = _losses(result)
    assert len(losses) == 4 and all(l == l for l in losses)
    assert result["skipped"] == 0


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_tp1(ref, layouts, name):
    ref_losses = _losses(ref[1])
    got = _losses(layouts[0][name])
    assert got == pytest.approx(ref_losses, rel=RTOL, abs=ATOL), f"{name}: {got} vs {ref_losses}"
    # the gradient norm (before clipping) sees a gradient off by a constant factor, which Adam's losses hardly do
    norms = [h["grad_norm"] for h in layouts[0][name]["history"]]
    assert norms == pytest.approx(_grad_norms(ref[1]), rel=RTOL, abs=ATOL), name


def test_context_parallel_padded_rows_match_tp1(ref, layouts):
    want = _losses(ref[5])
    assert want != _losses(ref[1])  # padded rows: a different batch layout than the packed reference
    assert _losses(layouts[4]) == pytest.approx(want, rel=RTOL, abs=ATOL)


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """Same config as the reference; dies (exit 17) after writing step 4's shards, before commit."""
    run_dir = str(tmp_path_factory.mktemp("killed"))
    proc = launch_raw(1, [{"overrides": TINY + [f"checkpoint.save={run_dir}", "checkpoint.save_interval=2"],
                           "die_in_commit": 4}])
    with open(os.path.join(run_dir, "latest")) as fh:  # now: the `resumed` fixture restarts this run
        latest = fh.read().strip()
    return run_dir, proc, latest, os.path.isdir(os.path.join(run_dir, "iter_0000004"))


def test_kill_during_save_keeps_previous_latest(killed):
    _, proc, latest, step4_written = killed
    assert proc.returncode != 0
    assert latest == "iter_0000002"
    assert step4_written  # written but never committed


@pytest.fixture(scope="module")
def resumed(ref, layouts, killed):
    ref_dir = ref[0]
    tp2_dir = layouts[1]
    runs = [
        {"overrides": TINY + [f"checkpoint.load={ref_dir}/iter_0000002"]},
        {"overrides": TINY + [f"checkpoint.load={tp2_dir}/iter_0000002"]},
        # restart of the crashed job with its own config: resumes from checkpoint.save's `latest`
        {"overrides": TINY + [f"checkpoint.save={killed[0]}", "checkpoint.save_interval=2"]},
        {"overrides": TINY + [f"checkpoint.load={layouts[3]}/iter_0000002"]},
        {"overrides": TINY + [f"checkpoint.load={layouts[5]}/iter_0000002"]},
        # the reference from scratch, logging every 3rd step: metrics are only reduced on logged steps
        {"overrides": TINY + ["logging.log_interval=3"]},
        # loss.compile=true: BFT's weight math through torch.compile (inductor) inside the trainer's loop
        {"overrides": TINY + ["loss.compile=true"]},
        # the word embedding's gradient through DDP's hook instead of straight into main_grad
        {"overrides": TINY + ["train.gradient_accumulation_fusion=false"]},
    ]
    init = os.path.join(ref_dir, "iter_0000000")
    runs += [{"overrides": TINY + [f"checkpoint.load={init}", "checkpoint.finetune=true"] + extra}
             for extra in OBJECTIVES.values()]  # TP1 runs of the other objectives, last
    return launch(1, runs)


def test_resume_same_layout_is_bitwise(ref, resumed):
    assert _losses(resumed[0]) == _losses(ref[1])[2:]
    assert resumed[0]["iteration"] == 4


def test_resume_resharded_tp2_dp2_to_tp1(layouts, resumed):
    uninterrupted = _losses(layouts[0]["tp2_sp"])[2:]
    assert _losses(resumed[1]) == pytest.approx(uninterrupted, rel=RTOL, abs=ATOL)


def test_resume_at_another_vocabulary_padding_continues_the_run(ref, layouts):
    """TP1 checkpoint (vocabulary padded to 128) resumed at TP2 with 256 rows: the real rows and their Adam
    state carry over, the new rows are left out of the loss, so the run continues as if uninterrupted."""
    assert _losses(layouts[6]) == pytest.approx(_losses(ref[1])[2:], rel=RTOL, abs=ATOL)


def test_resume_resharded_pp2_vp2_dp2_to_pp1(layouts, resumed):
    uninterrupted = _losses(layouts[0]["pp2_vp2"])[2:]
    assert _losses(resumed[3]) == pytest.approx(uninterrupted, rel=RTOL, abs=ATOL)


def test_resume_resharded_cp2_dp2_to_cp1(layouts, resumed):
    """The distributed optimizer shards over DP x CP: a CP2 x DP2 checkpoint resumes at one process."""
    uninterrupted = _losses(layouts[0]["cp2"])[2:]
    assert _losses(resumed[4]) == pytest.approx(uninterrupted, rel=RTOL, abs=ATOL)


def test_sparse_logging_reports_the_same_losses(ref, resumed):
    sparse = resumed[5]
    assert [h["iteration"] for h in sparse["history"]] == [3, 4]  # every 3rd step and the last
    assert _losses(sparse) == _losses(ref[1])[2:]  # bitwise: skipping the reduction changes nothing else


def test_compiled_loss_math_trains_like_eager(ref, resumed):
    """``loss.compile=true`` reaches the objective through the loop (inductor was used) and trains like eager."""
    compiled = resumed[6]
    assert compiled["compiled"] == ["inductor"] and ref[1]["compiled"] == []
    assert _losses(compiled) == pytest.approx(_losses(ref[1]), rel=RTOL, abs=ATOL)


def test_fused_embedding_wgrad_trains_like_the_unfused_one(ref, layouts, resumed):
    """The reference (and every layout, e.g. TP2 with masked vocabulary rows, SP, tied PP) adds the word
    embedding's gradient straight into main_grad (``gradient_accumulation_fusion``, on by default, also on CPU);
    through DDP's hook instead it trains the same."""
    unfused = resumed[7]
    assert ref[1]["embedding_wgrad_fused"] is True and unfused["embedding_wgrad_fused"] is False
    assert all(layouts[0][name]["embedding_wgrad_fused"] for name in ("tp2_sp", "pp2_vp2", "cp2_tp2_sp"))
    # tied embeddings: fused on the first of two stages; not where the output layer shares the weight (PP1)
    assert layouts[2]["embedding_wgrad_fused"] is True and ref[3]["embedding_wgrad_fused"] is False
    assert _losses(unfused) == pytest.approx(_losses(ref[1]), rel=RTOL, abs=ATOL)


def test_restart_after_kill_resumes_from_previous_checkpoint(ref, killed, resumed):
    assert _losses(resumed[2]) == _losses(ref[1])[2:]
    with open(os.path.join(killed[0], "latest")) as fh:
        assert fh.read().strip() == "iter_0000004"  # the stale partial save was replaced and committed


def test_tied_qkv_bias_rope_scaled_variant_tp2_pp2(ref, layouts):
    want = _losses(ref[3])
    assert want != _losses(ref[1])  # the variant is a different model
    assert _losses(layouts[2]) == pytest.approx(want, rel=RTOL, abs=ATOL)


@pytest.mark.parametrize("name", list(QWEN3_LAYOUTS))
def test_qk_norm_head_dim_variant_matches_its_tp1_run(ref, layouts, name):
    want, got = ref[7], layouts[8][name]
    assert _losses(want) != _losses(ref[1])  # the variant is a different model
    assert _losses(got) == pytest.approx(_losses(want), rel=RTOL, abs=ATOL)
    assert _grad_norms(got) == pytest.approx(_grad_norms(want), rel=RTOL, abs=ATOL)


@pytest.mark.parametrize("name", ["dp4", "tp2", "tp2_sp", "pp2", "pp2_vp2", "tp2_pp2", "cp2_pp2", "variant_tp2_pp2",
                                  *QWEN3_LAYOUTS])
def test_planner_state_terms_match_megatrons_model(layouts, name):
    """The planner's weight, gradient and optimizer terms per GPU against megatron's real model on every rank:
    parameters per pipeline stage (TP-split linears, replicated norms, the tied table's copy on the last stage,
    VP chunks), DDP gradient buffers (parameters plus megatron's padding) and Adam state, which the distributed
    optimizer shards over the DP x CP ranks of a (TP, PP) position (each holds at most its 1/(dp*cp) of the
    buffer; the shards add up to the parameters), and which is whole on every rank without it."""
    from bft_megatron.config import load_config
    from bft_megatron.config.plan import _stage_params

    if name == "variant_tp2_pp2":
        overrides, result = TINY + VARIANT + ["parallel.tp=2", "parallel.pp=2", "train.micro_batch_size=1"], layouts[2]
    elif name in QWEN3_LAYOUTS:
        overrides, result = TINY + QWEN3 + QWEN3_LAYOUTS[name], layouts[8][name]
    else:
        overrides, result = TINY + LAYOUTS[name], layouts[0][name]
    cfg = load_config(None, overrides)
    p = cfg.parallel
    counts = result["state_counts"]
    shards: dict[tuple[int, int], list[dict]] = {}
    for c in counts:
        stage = "only" if p.pp == 1 else ("first" if c["pp_rank"] == 0 else "last")
        assert c["params"] == pytest.approx(_stage_params(cfg.model, p, stage), rel=0, abs=1e-6), (stage, c)
        # Padding: each parameter starts at a multiple of 64; with the distributed optimizer each bucket ends at
        # a multiple of lcm(dp, 128) (megatron's _ParamAndGradBuffer).
        assert c["params"] <= c["grad_buffer"] <= c["params"] + (64 + 128 * len(counts)) * c["tensors"], c
        shards.setdefault((c["pp_rank"], c["tp_rank"]), []).append(c)
    dp_cp = len(counts) // (p.tp * p.pp)
    for position in shards.values():
        assert len(position) == dp_cp
        if p.distributed_optimizer:
            assert sum(c["adam"] for c in position) == position[0]["params"]
            assert all(c["adam"] <= -(-c["grad_buffer"] // dp_cp) for c in position)
        else:
            assert all(c["adam"] == c["params"] for c in position)
