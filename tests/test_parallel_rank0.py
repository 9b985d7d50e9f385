"""Rank-0 file work and the group the other ranks wait on (gloo, spawned ranks).

First-use data preparation runs on global rank 0 while the others wait in one broadcast; that wait must
be governed by ``ParallelGroups.control`` (hours), not by the default group's ``parallel.timeout_minutes``,
or a long preparation kills the job.
"""

from __future__ import annotations

import time
from datetime import timedelta

import torch
import torch.distributed as dist

from bft_megatron.config.schema import load_config
from tests.data_fixtures import megatron_marker
from tests.dist_harness import run_distributed


def _timeout(group) -> timedelta:
    return group._get_backend(torch.device("cpu")).options._timeout


def _slow_rank0(rank: int, world: int) -> list[str]:
    """Rank 0 works 4 s twice; the others wait on a 60 s group, then on a 2 s one."""
    from bft_megatron.parallel.rank0 import on_rank0

    long_wait = dist.new_group(backend="gloo", timeout=timedelta(seconds=60))
    short_wait = dist.new_group(backend="gloo", timeout=timedelta(seconds=2))
    outcomes = []
    for group in (long_wait, short_wait):
        try:
            on_rank0(lambda: time.sleep(4), "slow work", group)
            outcomes.append("ok")
        except RuntimeError as err:
            outcomes.append("timed out" if "imed out" in str(err) or "imeout" in str(err) else str(err))
    return outcomes


def test_the_wait_follows_the_given_groups_timeout():
    rank0, rank1 = run_distributed(_slow_rank0, 2, timeout=120)
    assert rank0[0] == "ok"  # (its second broadcast may find rank 1 gone)
    # The 4 s of work outlasts only the short group's timeout: the group argument is what bounds the wait.
    assert rank1 == ["ok", "timed out"], rank1


def _bootstrap_groups(rank: int, world: int) -> tuple[timedelta, int, bool]:
    from bft_megatron.parallel import bootstrap

    first = bootstrap.initialize(seed=1, timeout_minutes=30)
    bootstrap.destroy(keep_process_group=True)
    again = bootstrap.initialize(seed=1, timeout_minutes=30)  # re-initialised (another layout): no second group
    try:
        return _timeout(again.control), dist.get_world_size(again.control), again.control is first.control
    finally:
        bootstrap.destroy(keep_process_group=True)


def test_control_group_is_the_world_with_the_long_timeout_made_once():
    from bft_megatron.parallel.bootstrap import RANK0_WAIT_HOURS

    for control, size, reused in run_distributed(_bootstrap_groups, 2, timeout=120):
        assert control == timedelta(hours=RANK0_WAIT_HOURS) and size == 2 and reused


def test_open_datasets_waits_on_the_group_it_is_given(tmp_path, monkeypatch):
    import bft_megatron.training.data as training_data

    seen = []
    monkeypatch.setattr(training_data, "on_rank0", lambda fn, what, group=None: seen.append(group))
    import bft_megatron.data.storage as storage

    monkeypatch.setattr(storage, "PackedDataset", lambda path: path)  # nothing prepared there: open nothing
    marker = object()
    cfg = load_config(None, [f"data.output_dir={tmp_path}"])
    training_data.open_datasets(cfg, marker)
    assert seen == [marker]


def _checkpoint_choices(rank: int, world: int, save_dir: str) -> list:
    """What each rank loads when rank 1's node sees no ``latest`` (stale metadata), and what rank0_value gives
    each rank for a rank-specific value and for a rank-0 ConfigError."""
    from types import SimpleNamespace

    from bft_megatron.checkpoint import manager
    from bft_megatron.config.base import ConfigError
    from bft_megatron.parallel.rank0 import rank0_value

    if rank == 1:
        manager.pointer.read_latest = lambda run_dir: None
    ckpt = manager.Checkpointer(load_config(None, [f"checkpoint.save={save_dir}"]), SimpleNamespace(rank=rank,
                                                                                                      control=None))
    chosen = []
    ckpt._load_path = lambda trainer, path, finetune, own=False: chosen.append((path, finetune, own)) or True
    loaded = ckpt.load(trainer=None)
    try:
        rank0_value(lambda: (_ for _ in ()).throw(ConfigError("bad on rank 0")), "a check")
        error = None
    except ConfigError as exc:
        error = str(exc)
    return [loaded, chosen, rank0_value(lambda: f"rank {rank}", "a value"), error]


def test_every_rank_loads_the_checkpoint_rank_0_found(tmp_path):
    megatron_marker(str(tmp_path / "iter_0000004"))
    (tmp_path / "latest").write_text("iter_0000004\n")
    results = run_distributed(_checkpoint_choices, 2, str(tmp_path))
    want = [True, [(str(tmp_path / "iter_0000004"), False, True)], "rank 0", "bad on rank 0"]
    assert results == [want, want]


def _save_rank0_finds_complete(rank: int, world: int, save_dir: str) -> str:
    """Checkpointer.save when rank 0 sees the iteration's checkpoint complete and rank 1's node does not yet."""
    import os
    from types import SimpleNamespace

    from bft_megatron.checkpoint import manager

    done = os.path.join(save_dir, "iter_0000004")
    manager.pointer.read_latest = (lambda run_dir: done) if rank == 0 else (lambda run_dir: None)
    ckpt = manager.Checkpointer(load_config(None, [f"checkpoint.save={save_dir}"]), SimpleNamespace(rank=rank,
                                                                                                      control=None))
    return ckpt.save(SimpleNamespace(state=SimpleNamespace(iteration=4)))


def test_every_rank_skips_the_save_rank_0_finds_complete(tmp_path):
    """Per-rank reads sent rank 1 into the save's collectives alone (a hang); now both skip it."""
    results = run_distributed(_save_rank0_finds_complete, 2, str(tmp_path), timeout=90)
    assert results == [str(tmp_path / "iter_0000004")] * 2
