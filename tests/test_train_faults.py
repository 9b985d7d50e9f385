"""Non-finite steps and signal-triggered save-and-exit, on two gloo processes (DP2, CPU).

* A NaN loss on data-parallel rank 1 only must skip the step on *every* rank (rank 0's own loss is
  finite; it learns about the NaN through the all-reduced flag): no optimizer step, no grad norm,
  the run goes on. ``max_consecutive_skips`` bad steps in a row abort the run on all ranks. Infinite gradients
  on rank 1 with finite losses everywhere skip the step on every rank too (megatron's global gradient norm).
* SIGUSR1 delivered to rank 0 after step 2 makes all ranks save step 2 and leave the loop;
  ``latest`` names that checkpoint and a RESUME marker records the early stop.
* A signal during validation ends it after the batch in progress, then the same save and exit.
* ``exit_duration_minutes`` elapsed: save after the current step and stop (RESUME marker).
* A skipped step steps neither optimizer nor LR scheduler. Resuming (with dropout) reproduces the losses
  bitwise (RNG states restored) and the skip counters, so a skip before and one after the save abort together.
* Validation at ``eval_interval`` reports the objective (``loss``) and the plain CE mean (``lm_loss``).
* ``async_save``: checkpoints are committed when finalised; ``keep_last=1`` prunes the older one; the
  run directory resumes at its last step (nothing left to train).
* ``overlap_param_gather`` (bf16): the parameter all-gather after an optimizer step waits for the next forward, so
  a save must gather first; otherwise each rank's checkpointed weights hold the other ranks' shards one step old and
  a resume from that step diverges. With the gather it trains like the plain run and resumes bitwise.
* ``checkpoint.fully_parallel_save`` (default): the two DP replicas share the writing of the model weights both
  hold (without it rank 0 writes them all); ``fully_parallel_load``: each reads a part; resumes are bitwise.
* Resuming a checkpoint with another ``data.seed`` (another row order after the data position) warns, naming both
  seeds; resuming with the same data settings does not.
* Resuming the signal run's step-2 checkpoint with a longer ``train.train_iters`` (another LR schedule) fails on
  both ranks before loading, naming the field and both values; with ``checkpoint.override_scheduler=true`` (and a
  new ``train.lr``) it continues from step 2 with the learning rates a fresh schedule of the new config gives.
"""

import math
import os
from types import SimpleNamespace

import pytest

from tests.launch import TINY, launch

pytestmark = pytest.mark.slow

EXTENDED = ["train.train_iters=6", "train.lr=1e-3", "checkpoint.override_scheduler=true"]
# Dropout on, so that a resume must restore the RNG states; two skips in a row abort.
DROPOUT = TINY + ["train.dropout=0.2", "train.max_consecutive_skips=2"]
# bf16: the distributed optimizer's fp32 main parameters are not the model's, so stale model weights show in a resume
OVERLAP = TINY + ["train.bf16=true", "parallel.overlap_param_gather=true"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    sig_dir = str(tmp_path_factory.mktemp("signal"))
    runs = [
        {"overrides": TINY, "poison": [1], "poison_ranks": [1]},
        {"overrides": TINY + ["train.max_consecutive_skips=2"], "poison": [1, 2], "poison_ranks": [1]},
        {"overrides": TINY + [f"checkpoint.save={sig_dir}"], "signal_at": 2},
        {"overrides": TINY},
        {"overrides": TINY + [f"checkpoint.save={sig_dir}/async", "checkpoint.async_save=true",
                              "checkpoint.save_interval=2", "checkpoint.keep_last=1"]},
        # 60 us: up before the first step ends (0, which Megatron-LM reads as no limit, is a config error)
        {"overrides": TINY + [f"checkpoint.save={sig_dir}/timed", "train.exit_duration_minutes=1e-6"]},
        {"overrides": TINY + [f"checkpoint.load={sig_dir}/async"]},
        {"overrides": TINY + ["train.bf16=true"]},
        {"overrides": TINY + [f"checkpoint.load={sig_dir}", "train.train_iters=6"]},
        {"overrides": TINY + [f"checkpoint.load={sig_dir}"] + EXTENDED},
        {"overrides": DROPOUT + [f"checkpoint.save={sig_dir}/dropout", "checkpoint.save_interval=2"], "poison": [1]},
        {"overrides": DROPOUT + [f"checkpoint.load={sig_dir}/dropout/iter_0000002"]},
        {"overrides": DROPOUT + [f"checkpoint.load={sig_dir}/dropout/iter_0000002"], "poison": [2]},
        {"overrides": TINY + [f"checkpoint.load={sig_dir}/iter_0000002", "checkpoint.finetune=true"]},
        {"overrides": TINY + ["train.eval_interval=2", "train.eval_iters=2"], "evaluate": True},
        {"overrides": TINY + ["loss.method=sft", "train.eval_iters=2"], "evaluate": True},
        {"overrides": TINY + [f"checkpoint.save={sig_dir}/in_eval", "train.eval_interval=2", "train.eval_iters=3"],
         "signal_in_eval": True},
        {"overrides": TINY + [f"checkpoint.load={sig_dir}/iter_0000002", "data.seed=99"]},
        # no validation at the save step: its forward would gather the parameters before the save
        {"overrides": OVERLAP + [f"checkpoint.save={sig_dir}/overlap", "checkpoint.save_interval=2"]},
        {"overrides": OVERLAP + [f"checkpoint.load={sig_dir}/overlap/iter_0000002"]},
        {"overrides": OVERLAP + [f"checkpoint.save={sig_dir}/serial", "checkpoint.save_interval=2",
                                 "checkpoint.fully_parallel_save=false"]},
        {"overrides": OVERLAP + [f"checkpoint.load={sig_dir}/overlap/iter_0000002",
                                 "checkpoint.fully_parallel_load=true"]},
        {"overrides": TINY, "poison_grad": [1], "poison_ranks": [1]},
    ]
    return launch(2, runs), sig_dir


def test_nan_on_one_rank_skips_step_everywhere(results):
    poisoned, clean = results[0][0], results[0][3]
    hist = poisoned["history"]
    assert [h["skipped"] for h in hist] == [False, True, False, False]
    assert hist[1]["grad_norm"] is None and math.isnan(hist[1]["loss"])
    assert poisoned["skipped"] == 1 and poisoned["iteration"] == 4 and poisoned["error"] is None
    # Step 1 is untouched; afterwards the skipped update changes the trajectory but stays finite.
    assert hist[0]["loss"] == clean["history"][0]["loss"]
    assert all(math.isfinite(h["loss"]) for i, h in enumerate(hist) if i != 1)
    assert hist[2]["loss"] != clean["history"][2]["loss"]


def test_inf_gradients_on_one_rank_skip_the_step_everywhere(results):
    """Finite losses, +inf in rank 1's gradients after the backward of step 2: megatron's global gradient norm (the
    verdict, reused by the optimizer step) is inf on every rank, so rank 0 skips too, and the run goes on."""
    poisoned, clean = results[0][22], results[0][3]
    hist = poisoned["history"]
    assert [h["skipped"] for h in hist] == [False, True, False, False] and poisoned["error"] is None
    assert hist[1]["grad_norm"] is None and hist[1]["loss"] == clean["history"][1]["loss"]
    assert hist[0]["grad_norm"] == clean["history"][0]["grad_norm"] and math.isfinite(hist[2]["loss"])
    assert hist[2]["loss"] != clean["history"][2]["loss"]


def test_skipped_step_leaves_the_lr_schedule_where_it_was(results):
    """No optimizer step, no scheduler step: the step after a skip uses the skipped step's learning rate."""
    poisoned, clean = results[0][0]["history"], results[0][3]["history"]
    lrs = [h["lr"] for h in clean]
    assert len(set(lrs)) == 4 and [h["lr"] for h in poisoned] == [lrs[0], lrs[1], lrs[1], lrs[2]]


def test_resume_restores_rng_and_skip_counters(results):
    """With dropout, the resumed losses equal the uninterrupted run's bitwise only if the RNG states come back;
    the skip count and the run of consecutive skips (step 2 skipped just before the save) come back too."""
    full, resumed, poisoned = results[0][10:13]
    assert [h["skipped"] for h in full["history"]] == [False, True, False, False] and full["error"] is None
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in full["history"][2:]]
    assert resumed["skipped"] == 1 and resumed["error"] is None
    # One more skip right after the resume is the second in a row: the run aborts at step 3.
    assert poisoned["iteration"] == 3 and poisoned["skipped"] == 2
    assert poisoned["error"] is not None and "2 consecutive non-finite" in poisoned["error"]


def test_finetune_from_a_mid_run_checkpoint_starts_at_step_zero(results):
    """finetune=true takes the weights only: iteration, data position, skip counts and the LR schedule start
    afresh (the same learning rates as a run from scratch), and the losses differ from scratch (other weights)."""
    runs = results[0]
    tuned, scratch = runs[13], runs[3]
    assert [h["iteration"] for h in tuned["history"]] == [1, 2, 3, 4] and tuned["skipped"] == 0
    assert [h["lr"] for h in tuned["history"]] == [h["lr"] for h in scratch["history"]]
    assert tuned["history"][0]["loss"] != scratch["history"][0]["loss"]


def test_validation_reports_the_plain_ce_mean_and_the_objective(results):
    """Validation (every train.eval_interval steps, on the same rows each time) reports the objective as
    ``loss`` and the plain CE token mean as ``lm_loss``: at the same initial weights BFT's lm_loss equals SFT's
    (for SFT both are the CE mean), while BFT's objective is another number."""
    bft, sft = results[0][14], results[0][15]
    assert bft["evaluated_at"] == [2, 4] and sft["evaluated_at"] == []
    before_bft, before_sft = bft["eval_before"], sft["eval_before"]
    assert before_bft["lm_loss"] == pytest.approx(before_sft["lm_loss"], rel=1e-6)
    assert before_sft["loss"] == pytest.approx(before_sft["lm_loss"], rel=1e-6)
    assert abs(before_bft["loss"] - before_bft["lm_loss"]) > 0.1 * before_bft["lm_loss"]
    first, second = bft["eval_after"]
    assert first == second and first["lm_loss"] < before_bft["lm_loss"]  # same rows; the model has trained
    assert {"p_conf", "sample_weight"} <= set(first)  # the BFT statistics are reported too


def test_consecutive_nan_steps_abort(results):
    aborted = results[0][1]
    assert aborted["error"] is not None and "consecutive non-finite" in aborted["error"]
    assert aborted["iteration"] == 3 and aborted["skipped"] == 2


def test_signal_saves_and_exits(results):
    (runs, sig_dir) = results
    stopped = runs[2]
    assert stopped["iteration"] == 2
    with open(os.path.join(sig_dir, "latest")) as fh:
        assert fh.read().strip() == "iter_0000002"
    with open(os.path.join(sig_dir, "RESUME")) as fh:
        assert fh.read().strip() == "SIGUSR1"


def test_a_signal_during_validation_ends_it_and_saves(results):
    """SIGUSR1 on rank 0 in the first of 3 validation batches at step 2: every rank stops validating after that
    batch (no partial means reported), then saves step 2 and exits, as for a signal during a step."""
    runs, sig_dir = results
    stopped = runs[16]
    assert stopped["iteration"] == 2 and stopped["evaluated_at"] == [2]
    assert stopped["eval_batches"] == [2] and stopped["eval_last"] == {}
    with open(os.path.join(sig_dir, "in_eval", "latest")) as fh:
        assert fh.read().strip() == "iter_0000002"
    with open(os.path.join(sig_dir, "in_eval", "RESUME")) as fh:
        assert fh.read().strip() == "SIGUSR1"


def test_exit_duration_saves_and_stops(results):
    runs, sig_dir = results
    assert runs[5]["iteration"] == 1
    with open(os.path.join(sig_dir, "timed", "latest")) as fh:
        assert fh.read().strip() == "iter_0000001"
    with open(os.path.join(sig_dir, "timed", "RESUME")) as fh:
        assert fh.read().strip() == "exit_duration_minutes"


def test_async_save_commits_and_prunes(results):
    runs, sig_dir = results
    run_dir = os.path.join(sig_dir, "async")
    assert runs[4]["iteration"] == 4
    with open(os.path.join(run_dir, "latest")) as fh:
        assert fh.read().strip() == "iter_0000004"
    assert sorted(d for d in os.listdir(run_dir) if d.startswith("iter_")) == ["iter_0000004"]
    assert not os.path.exists(os.path.join(run_dir, "RESUME"))
    assert runs[6]["iteration"] == 4 and runs[6]["history"] == []  # resumed at the end: nothing to do


def test_bf16_dp2_tracks_fp32(results):
    """Float16Module + bf16 logits (fp32_output=False) + fp32 grad reduction + distributed optimizer."""
    runs, _ = results
    fp32, bf16 = runs[3]["history"], runs[7]["history"]
    assert [h["loss"] for h in bf16] == pytest.approx([h["loss"] for h in fp32], rel=2e-3)
    assert [h["lm_loss"] for h in bf16] == pytest.approx([h["lm_loss"] for h in fp32], rel=2e-3)


def test_resume_with_another_schedule_fails_naming_the_field(results):
    runs, sig_dir = results
    failed = runs[8]
    assert failed["history"] == [] and len(failed["load_errors"]) == 2  # raised on both ranks, nothing trained
    message = failed["load_errors"][0]
    assert failed["load_errors"][1] == message
    assert f"resuming {sig_dir}/iter_0000002 (iteration 2)" in message
    assert "train.train_iters: checkpoint 4, config 6 (scheduler lr_decay_steps 4 -> 6" in message
    assert "checkpoint.override_scheduler=true" in message


def test_override_scheduler_continues_with_the_new_schedule(results):
    """Steps 3-6 use the learning rates of the new config's schedule at optimizer steps 2-5 (step count kept)."""
    from bft_megatron.config import load_config
    from bft_megatron.training.setup import build_scheduler

    extended = results[0][9]
    assert extended["iteration"] == 6 and [h["iteration"] for h in extended["history"]] == [3, 4, 5, 6]
    fresh = build_scheduler(SimpleNamespace(param_groups=[{}]), load_config(None, TINY + EXTENDED))
    fresh.step(2)
    want = []
    for _ in range(4):
        want.append(fresh.optimizer.param_groups[0]["lr"])
        fresh.step(1)
    assert [h["lr"] for h in extended["history"]] == want
    old = [h["lr"] for h in results[0][3]["history"]]  # the uninterrupted 4-step run with the old schedule
    assert want[:2] != old[2:] and want[0] > 0


def test_resume_with_another_data_seed_warns_that_the_rows_differ(results):
    runs, sig_dir = results
    other_seed, same = runs[17], runs[10]
    assert other_seed["iteration"] == 4
    [warning] = [w for w in other_seed["load_warnings"] if "other training rows" in w]
    assert f"resuming {sig_dir}/iter_0000002 on other training rows (data.seed: checkpoint 1234, config 99)" in warning
    assert "consumed_rows=" in warning
    assert not [w for w in same["load_warnings"] if "other training rows" in w]


def test_resume_with_overlapped_param_gather_is_bitwise(results):
    """With ``overlap_param_gather`` the step's parameter all-gather is deferred to the next forward; the save
    must gather first, or the checkpoint holds the other DP rank's shards one step old (bf16: the optimizer's fp32
    main parameters do not overwrite them on load) and the resumed steps differ."""
    runs = results[0]
    full, resumed, plain = runs[18], runs[19], runs[7]
    assert [h["loss"] for h in full["history"]] == [h["loss"] for h in plain["history"]]
    assert [h["iteration"] for h in resumed["history"]] == [3, 4]
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in full["history"]][2:]


def _bytes_per_rank(iter_dir) -> dict[int, int]:
    """torch_dist's shard files are ``__<global rank>_<writer thread>.distcp``."""
    sizes: dict[int, int] = {}
    for name in os.listdir(iter_dir):
        if name.endswith(".distcp"):
            rank = int(name.split("_")[2])
            sizes[rank] = sizes.get(rank, 0) + os.path.getsize(os.path.join(iter_dir, name))
    return sizes


def test_fully_parallel_save_shares_the_replicated_weights_and_loads_back_bitwise(results):
    runs, sig_dir = results
    spread = _bytes_per_rank(os.path.join(sig_dir, "overlap", "iter_0000002"))
    serial = _bytes_per_rank(os.path.join(sig_dir, "serial", "iter_0000002"))
    # fully_reshardable gathers the optimizer state to every DP rank: without the wrapper rank 0 writes everything.
    assert serial[0] > 1.5 * serial[1], serial
    assert max(spread.values()) < 1.2 * min(spread.values()), spread
    assert abs(sum(spread.values()) - sum(serial.values())) < 0.02 * sum(serial.values())
    assert [h["loss"] for h in runs[20]["history"]] == [h["loss"] for h in runs[18]["history"]]
    read_in_parts, resumed = runs[21], runs[19]
    assert read_in_parts["error"] is None and [h["iteration"] for h in read_in_parts["history"]] == [3, 4]
    assert [h["loss"] for h in read_in_parts["history"]] == [h["loss"] for h in resumed["history"]]
