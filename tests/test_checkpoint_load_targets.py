"""What ``latest`` or ``checkpoint.load`` names must be a megatron checkpoint the config can load: a config error
naming the field otherwise, from the pre-flight (``check_paths``, on every rank before any process group:
``--check`` and every run) and from the load itself (``Checkpointer.load``).

Before, a ``latest`` left pointing at a deleted or never-finished directory passed ``--check``, let the run prepare
its data, and then failed in megatron's load with a traceback and exit 1 (a crash to SLURM's requeue); another
model, a longer schedule or an import as ``checkpoint.save`` passed ``--check`` and failed after the data
preparation. The single-process checks' own tests are tests/test_checkpoint_schedule.py and _architecture.py.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from bft_megatron.checkpoint import pointer
from bft_megatron.config import ConfigError, check_paths, load_config
from tests.data_fixtures import checkpoint_common, megatron_marker

CASES = {  # name -> (what the directory holds, field, expected message)
    "save_latest_missing": ("latest5", "save", r"checkpoint.save={d}: its 'latest' names iter_0000005, which does "
                                               r"not exist; point 'latest' at a complete iter_ directory there "
                                               r"\(iter_0000002\), or remove it"),
    "save_latest_empty": ("latest5_empty", "save", r"checkpoint.save={d}: its 'latest' names iter_0000005, which "
                                                   r"holds no megatron checkpoint \(no readable metadata.json "
                                                   r"or no common state, common.pt or the torch_dist "
                                                   r"checkpoint.s common_state"),
    "load_latest_missing": ("latest5", "load", r"checkpoint.load={d}: its 'latest' names iter_0000005, which does "
                                               r"not exist"),
    "load_iter_empty": ("latest5_empty", "load_iter", r"checkpoint.load={d}/iter_0000005 holds no megatron "
                                                      r"checkpoint .*; point it at a run directory"),
}


def _run_dir(root, holds: str) -> str:
    d = str(root / "run")
    megatron_marker(os.path.join(d, pointer.iter_dirname(2)))  # an older complete checkpoint
    if holds == "latest5_empty":
        os.makedirs(os.path.join(d, pointer.iter_dirname(5)))
    pointer.write_latest(d, 5)
    return d


def _overrides(d: str, field: str, tmp_path) -> list[str]:
    if field == "save":
        return [f"checkpoint.save={d}"]
    load = f"{d}/iter_0000005" if field == "load_iter" else d
    return [f"checkpoint.load={load}", "checkpoint.finetune=true", f"checkpoint.save={tmp_path}/new"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_latest_or_load_that_names_no_checkpoint_is_a_config_error(tmp_path, case):
    from bft_megatron.checkpoint.manager import Checkpointer

    holds, field, message = CASES[case]
    d = _run_dir(tmp_path, holds)
    cfg = load_config(None, _overrides(d, field, tmp_path))
    pattern = message.format(d=d)
    with pytest.raises(ConfigError, match=pattern):
        check_paths(cfg, data=False)
    with pytest.raises(ConfigError, match=pattern):
        Checkpointer(cfg, SimpleNamespace(rank=0, control=None)).load(trainer=None)


def test_a_complete_target_passes(tmp_path):
    d = _run_dir(tmp_path, "latest5")
    megatron_marker(os.path.join(d, pointer.iter_dirname(5)))
    assert pointer.load_problem("checkpoint.save", d, os.path.join(d, "iter_0000005")) is None
    assert pointer.load_problem("checkpoint.load", d, os.path.join(d, "iter_0000002")) is None
    open(os.path.join(d, "iter_0000009"), "w").close()
    assert pointer.load_problem("checkpoint.load", f"{d}/iter_0000009", f"{d}/iter_0000009").endswith(
        "iter_0000009 is not a directory; point it at a run directory or a complete iter_ directory")


def _saved(tmp_path, *overrides, train_state=True) -> str:
    """A run directory whose ``latest`` names a checkpoint of ``TINY + overrides`` after 2 steps (its common part;
    ``train_state=False``: an import's)."""
    from tests.launch import TINY

    common = checkpoint_common(load_config(None, TINY + list(overrides)), steps=2, train_state=train_state)
    d = str(tmp_path / "run")
    megatron_marker(os.path.join(d, pointer.iter_dirname(2)), common)
    pointer.write_latest(d, 2)
    return d


@pytest.mark.parametrize("overrides, train_state, message", [
    (["train.train_iters=8"], True, r"resuming .*iter_0000002 \(iteration 2\): this config gives another "
                                    r"learning-rate schedule.*\n  train.train_iters"),
    (["model.num_layers=2"], True, r"this config's model differs from the checkpoint's:\n  model.num_layers"),
    ([], False, r"checkpoint.save=.*run: its 'latest' names .*iter_0000002, a weights-only checkpoint"),
])
def test_the_preflight_refuses_what_the_load_would(tmp_path, overrides, train_state, message):
    from tests.launch import TINY

    d = _saved(tmp_path, train_state=train_state)
    with pytest.raises(ConfigError, match=message):
        check_paths(load_config(None, TINY + overrides + [f"checkpoint.save={d}"]), data=False)


def test_the_preflight_passes_what_the_load_accepts(tmp_path):
    from tests.launch import TINY

    d = _saved(tmp_path)
    check_paths(load_config(None, TINY + [f"checkpoint.save={d}"]), data=False)  # the same config resumes
    longer = ["train.train_iters=8", "checkpoint.override_scheduler=true"]
    check_paths(load_config(None, TINY + longer + [f"checkpoint.save={d}"]), data=False)
    finetune = ["train.train_iters=8", f"checkpoint.load={d}", "checkpoint.finetune=true",
                f"checkpoint.save={tmp_path}/new"]  # weights only: any schedule, the same model
    check_paths(load_config(None, TINY + finetune), data=False)
    with pytest.raises(ConfigError, match=r"\(weights only\): this config's model differs"):
        check_paths(load_config(None, TINY + finetune + ["model.num_layers=2"]), data=False)


def test_only_global_rank_0_judges_the_checkpoint_a_real_run_would_load(tmp_path, monkeypatch):
    """A node with a stale view of ``latest`` (NFS metadata cache after a requeue) must not refuse what rank 0's
    load uses: on the other ranks the pre-flight leaves the contents to the load (``contents=False``)."""
    from bft_megatron.training.preflight import load_checked
    from bft_megatron.utils.logging import get_logger
    from tests.launch import TINY

    d = _run_dir(tmp_path, "latest5")  # latest names a missing iter_0000005
    cfg = load_config(None, TINY + [f"checkpoint.save={d}"])
    check_paths(cfg, data=False, contents=False)
    overrides = TINY + [f"checkpoint.save={d}"]
    for rank, refused in (("0", True), ("1", False), ("3", False)):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("WORLD_SIZE", "4")
        result = load_checked(None, overrides + ["train.global_batch_size=8"], get_logger(), check=False,
                              dry_run=False)
        assert (result is None) == refused, rank
    monkeypatch.setenv("RANK", "1")  # --check (one process, on the first node) judges everything
    assert load_checked(None, overrides, get_logger(), check=True, dry_run=False) is None


def test_vp_1_is_the_saved_layout_of_no_virtual_pipeline(tmp_path):
    """megatron keeps vp=1 as None (``bootstrap.initialize``), as a dp_reshardable checkpoint stores it: the
    pre-flight compares it so, as the load does."""
    from tests.launch import TINY

    d = _saved(tmp_path, "checkpoint.optimizer_format=dp_reshardable")
    check_paths(load_config(None, TINY + ["parallel.vp=1", f"checkpoint.save={d}"]), data=False)
    with pytest.raises(ConfigError, match=r"dp_reshardable format .* this run changes tp 1 -> 2"):
        check_paths(load_config(None, TINY + ["parallel.tp=2", f"checkpoint.save={d}"]), data=False)


@pytest.mark.parametrize("saved, resumed", [("true", "false"), ("false", "true")])
def test_a_full_resume_cannot_switch_the_distributed_optimizer(tmp_path, saved, resumed):
    """megatron's distributed and plain optimizers do not load each other's state: the load failed inside megatron
    (KeyError 'pre_wd_mult' one way, a missing optimizer.state key the other), after the model was built."""
    from tests.launch import TINY

    d = _saved(tmp_path, f"parallel.distributed_optimizer={saved}")
    switched = TINY + [f"parallel.distributed_optimizer={resumed}"]
    message = (rf"parallel.distributed_optimizer={resumed}: .*iter_0000002 was saved with "
               rf"parallel.distributed_optimizer={saved}, .*Set it back, or start a new run")
    with pytest.raises(ConfigError, match=message):
        check_paths(load_config(None, switched + [f"checkpoint.save={d}"]), data=False)
    check_paths(load_config(None, TINY + [f"parallel.distributed_optimizer={saved}", f"checkpoint.save={d}"]),
                data=False)
    finetune = [f"checkpoint.load={d}", "checkpoint.finetune=true", f"checkpoint.save={tmp_path}/new"]
    check_paths(load_config(None, switched + finetune), data=False)  # weights only: a fresh optimizer


def test_complete_checkpoints_without_latest_in_checkpoint_save_are_not_trained_over(tmp_path):
    """``iter_`` directories copied without ``latest`` (or a first save killed between its shards and its commit):
    the run started from scratch, saying there was no complete checkpoint, and its saves then overwrote or pruned
    them. Now a config error, unless ``checkpoint.load`` names one of them; an unfinished one is no reason."""
    from bft_megatron.checkpoint.manager import Checkpointer
    from tests.launch import TINY

    d = str(tmp_path / "run")
    os.makedirs(os.path.join(d, pointer.iter_dirname(6)))  # a save that never finished: not a checkpoint
    save = [f"checkpoint.save={d}", "checkpoint.keep_last=1"]
    check_paths(load_config(None, TINY + save), data=False)
    assert Checkpointer(load_config(None, TINY + save), SimpleNamespace(rank=0, control=None)).load(None) is False
    for i in (2, 4):
        megatron_marker(os.path.join(d, pointer.iter_dirname(i)), checkpoint_common(load_config(None, TINY), i))
    message = (rf"checkpoint.save={d} holds 2 complete checkpoints \(iter_0000002, iter_0000004\) but no 'latest' "
               rf"pointer .* Resume with checkpoint.load={d}/iter_0000004, or move them away")
    for load in ([], [f"checkpoint.load={d}"]):  # Megatron-LM's --load X --save X: the same
        cfg = load_config(None, TINY + save + load)
        with pytest.raises(ConfigError, match=message):
            check_paths(cfg, data=False)
        with pytest.raises(ConfigError, match=message):
            Checkpointer(cfg, SimpleNamespace(rank=0, control=None)).load(trainer=None)
    check_paths(load_config(None, TINY + save + [f"checkpoint.load={d}/iter_0000002"]), data=False)
    elsewhere = [f"checkpoint.load={d}/iter_0000004", f"checkpoint.save={tmp_path}/new"]
    check_paths(load_config(None, TINY + elsewhere), data=False)  # a new run from it leaves them alone
    finetune_into = save + [f"checkpoint.load={tmp_path}/other", "checkpoint.finetune=true"]
    with pytest.raises(ConfigError, match=message):  # a fine-tune saving there would prune them too
        check_paths(load_config(None, TINY + finetune_into), data=False)
    assert sorted(os.listdir(d)) == ["iter_0000002", "iter_0000004", "iter_0000006"]


def test_a_load_the_runs_own_latest_overrides_is_said(tmp_path, log_records):
    """``checkpoint.save``'s ``latest`` wins over ``checkpoint.load`` (requeues go on): said at info level, and as a
    warning, with how to go back, where the load names another checkpoint of the same directory."""
    import logging

    from bft_megatron.checkpoint.manager import Checkpointer
    from tests.launch import TINY

    d = _run_dir(tmp_path, "latest5")
    megatron_marker(os.path.join(d, pointer.iter_dirname(5)))
    pretrained = _run_dir(tmp_path / "pretrained", "latest5")
    megatron_marker(os.path.join(pretrained, pointer.iter_dirname(5)))

    def source(load: str):
        cfg = load_config(None, TINY + [f"checkpoint.save={d}", f"checkpoint.load={load}"])
        return Checkpointer(cfg, SimpleNamespace(rank=0, control=None))._source()

    for load in (d, f"{d}/iter_0000005", f"{d}/"):  # --load X --save X, or its latest by name: nothing to say
        assert source(load) == ("own", os.path.join(d, "iter_0000005"))
    assert not [r for r in log_records if "is not read" in r.getMessage()]
    assert source(f"{d}/iter_0000002")[1] == os.path.join(d, "iter_0000005")
    assert source(pretrained)[1] == os.path.join(d, "iter_0000005")
    said = [(r.levelno, r.getMessage()) for r in log_records if "is not read" in r.getMessage()]
    assert said[0][0] == logging.WARNING and said[0][1].startswith(f"checkpoint.load={d}/iter_0000002 is not read: "
                                                                   "checkpoint.save's 'latest' names iter_0000005")
    assert f"To go back to iter_0000002, write its name into {d}/latest" in said[0][1]
    assert said[1][0] == logging.INFO and f"checkpoint.load={pretrained} is not read: resuming this run's" in said[1][1]
    assert len(said) == 2


def test_a_checkpoint_with_its_common_state_inside_the_torch_dist_files_is_complete(tmp_path):
    """megatron-core 0.19 writes no common.pt: the common state is the ShardedObject "common_state" of the torch_dist
    checkpoint, listed in its .metadata. Such checkpoints were refused as incomplete (every resume and --eval-only
    on 0.19.2 failed with "holds no megatron checkpoint")."""
    import torch
    import torch.distributed.checkpoint as dcp
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config

    from bft_megatron.checkpoint.pointer import load_problem

    def checkpoint(name: str, keys: list[str]) -> str:
        path = str(tmp_path / name)
        os.makedirs(path)
        save_config(CheckpointingConfig("torch_dist"), path)  # metadata.json
        dcp.save({k: torch.zeros(2) for k in keys}, storage_writer=dcp.FileSystemWriter(path), no_dist=True)
        return path

    new = checkpoint("iter_0000003", ["common_state/shard_0_1", "decoder.weight"])
    assert load_problem("checkpoint.load", new, new) is None
    weights = checkpoint("iter_0000004", ["decoder.weight"])  # a torch_dist save with no common state at all
    assert "holds no megatron checkpoint" in load_problem("checkpoint.load", weights, weights)
    cut = checkpoint("iter_0000005", ["common_state/shard_0_1"])
    (tmp_path / "iter_0000005" / ".metadata").write_bytes(b"\x80\x04cut")  # a save killed while writing .metadata
    assert "holds no megatron checkpoint" in load_problem("checkpoint.load", cut, cut)
