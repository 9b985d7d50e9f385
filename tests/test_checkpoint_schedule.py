"""Resuming with another LR schedule (single process, no checkpoint files): the comparison of the checkpoint's
scheduler state with the config's, its error and warning, megatron's override semantics, and the CLI's exit 2.
The end-to-end runs (two gloo ranks, real checkpoints) are in tests/test_train_faults.py."""

from types import SimpleNamespace

import pytest

from bft_megatron.checkpoint import schedule
from bft_megatron.checkpoint.schedule import (adam_changes, align_saved_group_bounds, check_schedule, describe_changes,
                                               group_bounds, restore_group_bounds, schedule_changes)
from bft_megatron.config import ConfigError, load_config, to_dict
from bft_megatron.training.setup import build_scheduler
from tests.launch import TINY


def _scheduler(*overrides):
    """The trainer's scheduler for TINY + overrides, on a stand-in optimizer with megatron's group bounds."""
    cfg = load_config(None, TINY + list(overrides))
    groups = [{"max_lr": cfg.train.lr, "min_lr": cfg.train.min_lr, "wd_mult": 1.0}]
    return build_scheduler(SimpleNamespace(param_groups=groups), cfg), cfg


def _common(*overrides, steps=2):
    """What a checkpoint saved after ``steps`` optimizer steps of that config holds (common part)."""
    scheduler, cfg = _scheduler(*overrides)
    scheduler.step(steps)
    return {"scheduler": scheduler.state_dict(), "config": to_dict(cfg), "train_state": {"iteration": steps}}


def test_same_config_has_no_changes_and_loads():
    common = _common()
    scheduler, cfg = _scheduler()
    assert schedule_changes(common["scheduler"], scheduler.state_dict()) == {}
    check_schedule(scheduler, common, cfg, "ckpt")
    scheduler.load_state_dict(common["scheduler"])  # megatron's own check (no override) agrees
    assert scheduler.num_steps == 2


def test_changes_map_to_the_config_fields_with_both_values():
    common = _common()
    scheduler, cfg = _scheduler("train.train_iters=6", "train.lr=1e-3", "train.decay=linear")
    changes = schedule_changes(common["scheduler"], scheduler.state_dict())
    assert changes == {"max_lr": (3e-3, 1e-3), "lr_decay_steps": (4, 6), "lr_decay_style": ("cosine", "linear"),
                       "wd_incr_steps": (4, 6)}
    lines = describe_changes(changes, common["config"], to_dict(cfg))
    assert sorted(lines) == [
        "train.decay: checkpoint cosine, config linear (scheduler lr_decay_style cosine -> linear)",
        "train.lr: checkpoint 0.003, config 0.001 (scheduler max_lr 0.003 -> 0.001)",
        "train.train_iters: checkpoint 4, config 6 (scheduler lr_decay_steps 4 -> 6, wd_incr_steps 4 -> 6)"]
    # without the checkpoint's config the scheduler values themselves are named, with their sources
    assert describe_changes({"lr_decay_steps": (4, 6)}, None, to_dict(cfg)) == [
        "scheduler lr_decay_steps (from train.decay_iters, or train.train_iters when null): checkpoint 4, config 6"]


def test_train_iters_does_not_matter_with_explicit_decay_iters():
    common = _common("train.decay_iters=4")
    scheduler, cfg = _scheduler("train.decay_iters=4", "train.train_iters=6")
    check_schedule(scheduler, common, cfg, "ckpt")


def test_mismatch_is_a_config_error_naming_fields_and_the_fix():
    common = _common()
    scheduler, cfg = _scheduler("train.train_iters=6", "train.min_lr=1e-4")
    with pytest.raises(ConfigError) as err:
        check_schedule(scheduler, common, cfg, "run/iter_0000002")
    message = str(err.value)
    assert message.startswith("resuming run/iter_0000002 (iteration 2): this config gives another learning-rate")
    assert "train.min_lr: checkpoint 0.0, config 0.0001" in message
    assert "train.train_iters: checkpoint 4, config 6" in message
    assert "checkpoint.override_scheduler=true" in message
    with pytest.raises(ConfigError, match="checkpoint.finetune=true"):  # weights only, e.g. an HF import
        check_schedule(scheduler, {"config": common["config"]}, cfg, "hf")


def test_adam_settings_live_in_the_param_groups_and_are_compared_too():
    """Loading the optimizer state brings the checkpoint's betas/eps: a changed train.adam_* must not be lost."""
    common = _common()
    scheduler, cfg = _scheduler("train.adam_beta2=0.999")
    assert schedule_changes(common["scheduler"], scheduler.state_dict()) == {}
    assert adam_changes(common["config"], to_dict(cfg)) == [
        "train.adam_beta2: checkpoint 0.95, config 0.999 (Adam's parameter groups)"]
    with pytest.raises(ConfigError, match=r"train.adam_beta2: checkpoint 0.95, config 0.999"):
        check_schedule(scheduler, common, cfg, "ckpt")
    scheduler, cfg = _scheduler("train.adam_beta2=0.999", "checkpoint.override_scheduler=true")
    check_schedule(scheduler, common, cfg, "ckpt")
    optimizer = SimpleNamespace(param_groups=[{"betas": (0.9, 0.999), "eps": 1e-8, "max_lr": 3e-3}])
    bounds = group_bounds(optimizer)
    optimizer.param_groups = [{"betas": (0.9, 0.95), "eps": 1e-8, "max_lr": 3e-3}]  # the checkpoint's groups
    restore_group_bounds(optimizer, bounds)
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.999)


def test_override_keeps_the_step_count_and_uses_the_config_schedule():
    """The checkpointer's sequence with override (build_scheduler sets megatron's flag): the optimizer load brings
    the checkpoint's group bounds, the config's are put back, the scheduler loads -> a fresh schedule at step 2."""
    common = _common()
    new = ("train.train_iters=6", "train.lr=1e-3", "checkpoint.override_scheduler=true")
    scheduler, cfg = _scheduler(*new)
    assert scheduler.override_opt_param_scheduler and not scheduler.use_checkpoint_opt_param_scheduler
    check_schedule(scheduler, common, cfg, "ckpt")  # a warning, no error
    optimizer = scheduler.optimizer
    bounds = group_bounds(optimizer)
    optimizer.param_groups = [{"max_lr": 3e-3, "min_lr": 0.0, "wd_mult": 1.0, "lr": 0.0}]  # the checkpoint's groups
    restore_group_bounds(optimizer, bounds)
    assert optimizer.param_groups[0]["max_lr"] == 1e-3
    scheduler.load_state_dict(common["scheduler"])
    fresh, _ = _scheduler(*new)
    fresh.step(2)
    assert scheduler.state_dict() == fresh.state_dict()
    assert scheduler.optimizer.param_groups[0]["lr"] == fresh.optimizer.param_groups[0]["lr"] > 0


MCORE_019_KEYS = ("end_wd", "max_lr", "min_lr", "optimizer", "start_wd", "wd_mult", "lr_mult", "is_expert_parallel",
                  "is_decoupled_lr")
MCORE_016_KEYS = ("wd_mult", "lr_mult", "is_expert_parallel", "is_decoupled_lr")


@pytest.mark.parametrize("keys", [MCORE_016_KEYS, MCORE_019_KEYS], ids=["mcore<0.19", "mcore0.19"])
def test_saved_groups_take_the_current_bounds_where_megatron_matches_groups_by_them(monkeypatch, keys):
    """megatron-core 0.19 pairs saved and current groups by max_lr/min_lr/start_wd/end_wd too: a resume with a new
    train.lr would find no group. Each saved group takes the bounds of the current group with its wd_mult (the
    pairing of megatron < 0.19, where the bounds are no identifier and nothing changes)."""
    monkeypatch.setattr(schedule, "_identifier_keys", lambda: keys)
    current = [{"max_lr": 1e-3, "min_lr": 0.0, "wd_mult": 1.0, "lr_mult": 1.0, "params": [0, 1]},
               {"max_lr": 1e-3, "min_lr": 0.0, "wd_mult": 0.0, "lr_mult": 1.0, "params": [2]}]
    saved = {"optimizer": {"param_groups": [
        {"max_lr": 3e-3, "min_lr": 1e-5, "wd_mult": 0.0, "lr_mult": 1.0, "betas": (0.9, 0.95), "params": [0]},
        {"max_lr": 3e-3, "min_lr": 1e-5, "wd_mult": 1.0, "lr_mult": 1.0, "betas": (0.9, 0.95), "params": [1, 2]}]}}
    changed = align_saved_group_bounds(SimpleNamespace(param_groups=current), saved)
    groups = saved["optimizer"]["param_groups"]
    if keys == MCORE_016_KEYS:
        assert changed == 0 and all(g["max_lr"] == 3e-3 and g["min_lr"] == 1e-5 for g in groups)
        return
    assert changed == 2 and all(g["max_lr"] == 1e-3 and g["min_lr"] == 0.0 for g in groups)
    assert [g["wd_mult"] for g in groups] == [0.0, 1.0] and [g["params"] for g in groups] == [[0], [1, 2]]
    assert all(g["betas"] == (0.9, 0.95) for g in groups)  # only the identifying bounds change
    assert align_saved_group_bounds(SimpleNamespace(param_groups=current), saved) == 0  # aligned: a no-op


def test_installed_megatron_pairs_the_aligned_groups():
    """Against the installed megatron-core's own identifier: after alignment every saved group has a current one."""
    from megatron.core.optimizer.optimizer import MegatronOptimizer

    current = [{"max_lr": 1e-3, "min_lr": 0.0, "wd_mult": 1.0, "lr_mult": 1.0, "is_expert_parallel": False,
                "is_decoupled_lr": False, "params": [0]}]
    saved = {"param_groups": [dict(current[0], max_lr=3e-3, min_lr=1e-5, params=[0])]}
    align_saved_group_bounds(SimpleNamespace(param_groups=current), saved)
    paired = MegatronOptimizer._filter_and_reorder_param_groups(current, saved["param_groups"])
    assert paired == saved["param_groups"]


def test_cli_reports_a_load_config_error_and_exits_2(monkeypatch):
    import bft_megatron.checkpoint as checkpoint
    import bft_megatron.training.build as build
    from bft_megatron import train
    from bft_megatron.parallel import bootstrap

    class Refusing:
        def __init__(self, cfg, groups, weights_only=False):
            pass

        def load(self, trainer):
            raise ConfigError("another learning-rate schedule")

    destroyed = []
    monkeypatch.setattr(bootstrap, "initialize", lambda *a, **k: SimpleNamespace())
    monkeypatch.setattr(bootstrap, "destroy", lambda *a, **k: destroyed.append(True))
    monkeypatch.setattr(build, "build_trainer", lambda *a: SimpleNamespace())
    monkeypatch.setattr(checkpoint, "Checkpointer", Refusing)
    assert train.main(TINY) == 2 and destroyed == [True]
