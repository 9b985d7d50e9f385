"""Readers of a checkpoint (an export, a run loading another run's checkpoint) keep keep_last's pruning away from
it until they are done (checkpoint/read_lock.py); a checkpoint being deleted is said to be so."""

from __future__ import annotations

import errno
import logging
import os
from types import SimpleNamespace

import pytest

from bft_megatron.checkpoint import pointer, read_lock
from bft_megatron.checkpoint.read_lock import CheckpointRemoved, reading, remove_unless_read
from bft_megatron.utils import locks
from tests.data_fixtures import megatron_marker
from tests.lock_holder import Holder


def _run(tmp_path, *iterations):
    run = str(tmp_path / "run")
    for it in iterations:
        megatron_marker(os.path.join(run, pointer.iter_dirname(it)))
    return run


def test_commit_keeps_a_checkpoint_being_read_until_a_later_commit(tmp_path, log_records):
    """keep_last=1: iter 1 is being exported while iter 2 and 3 commit; it stays (with a warning naming the
    reader), the others are pruned as usual, and the first commit after the reader ends removes it."""
    run = _run(tmp_path, 1, 2)
    pointer.write_latest(run, 1)
    with reading(os.path.join(run, "iter_0000001")):
        assert pointer.commit(run, 2, keep_last=1) == []
        megatron_marker(os.path.join(run, "iter_0000003"))
        assert pointer.commit(run, 3, keep_last=1) == [2]
        assert pointer.list_iterations(run) == [1, 3]
    [first, second] = [r.getMessage() for r in log_records if r.levelno == logging.WARNING]
    assert first == second
    assert first.startswith(f"{run}/iter_0000001 is not pruned yet: another job is reading it (host ")
    assert f"pid {os.getpid()}" in first and first.endswith("a later save removes it")
    megatron_marker(os.path.join(run, "iter_0000004"))
    assert pointer.commit(run, 4, keep_last=1) == [1, 3]
    assert pointer.list_iterations(run) == [4]


def test_a_reader_in_another_process_keeps_the_checkpoint_and_its_death_frees_it(tmp_path):
    run = _run(tmp_path, 1, 2)
    holder = Holder(os.path.join(run, "iter_0000001", read_lock.READ_LOCK), tmp_path, shared=True)
    assert pointer.prune(run, 1, 2) == []
    holder.kill()  # the kernel drops a killed reader's lock
    assert pointer.prune(run, 1, 2) == [1]


def test_several_readers_share_the_lock(tmp_path):
    ckpt = os.path.join(_run(tmp_path, 1), "iter_0000001")
    with reading(ckpt), reading(ckpt):
        assert remove_unless_read(ckpt) is not None
    assert remove_unless_read(ckpt) is None and not os.path.exists(ckpt)


def test_a_checkpoint_being_deleted_or_gone_cannot_be_read(tmp_path):
    ckpt = os.path.join(_run(tmp_path, 1), "iter_0000001")
    pruner, _ = locks.try_lock(os.path.join(ckpt, read_lock.READ_LOCK))  # a pruner deleting it right now
    with pytest.raises(CheckpointRemoved, match="iter_0000001 was being deleted"):
        with reading(ckpt):
            pass
    pruner.release()
    os.remove(os.path.join(ckpt, "metadata.json"))  # the reader's lock file made in a half-deleted directory
    with pytest.raises(CheckpointRemoved, match="iter_0000001 was deleted"):
        with reading(ckpt):
            pass
    assert remove_unless_read(ckpt) is None  # that reader let go: the next prune deletes the rest
    with pytest.raises(CheckpointRemoved, match="iter_0000001 was deleted"):
        with reading(ckpt):
            pass


def test_a_lock_file_unlinked_between_open_and_lock_means_deleted(tmp_path, monkeypatch):
    ckpt = os.path.join(_run(tmp_path, 1), "iter_0000001")
    real = locks.try_lock

    def open_then_pruned(path, shared=False):
        held = real(path, shared)
        os.remove(path)  # the pruner's rmtree reached the lock file after our open
        return held

    monkeypatch.setattr(read_lock, "try_lock", open_then_pruned)
    with pytest.raises(CheckpointRemoved, match="was deleted"):
        with reading(ckpt):
            pass


@pytest.mark.parametrize("err", [errno.EROFS, errno.EACCES, errno.ENOLCK])
def test_where_no_lock_can_be_taken_reading_and_pruning_go_on_as_before(tmp_path, monkeypatch, err):
    """A read-only file system or directory, or one without flock: the reader reads unprotected, the pruner
    deletes."""
    ckpt = os.path.join(_run(tmp_path, 1), "iter_0000001")

    def cannot(path, shared=False):
        raise (locks.LockUnsupported if err == errno.ENOLCK else OSError)(err, os.strerror(err))

    monkeypatch.setattr(read_lock, "try_lock", cannot)
    with reading(ckpt):
        assert remove_unless_read(ckpt) is None
    assert not os.path.exists(ckpt)


def test_export_holds_the_read_lock_and_says_when_its_checkpoint_was_deleted(tmp_path, monkeypatch):
    from bft_megatron.convert import exporter

    run = _run(tmp_path, 1, 2)
    pointer.write_latest(run, 1)
    kept = []
    monkeypatch.setattr(exporter, "_export", lambda path, *a: kept.append(pointer.prune(run, 1, 2)))
    exporter.export_checkpoint(run, str(tmp_path / "hf"))
    assert kept == [[]] and pointer.list_iterations(run) == [1, 2]
    pruner, _ = locks.try_lock(os.path.join(run, "iter_0000001", read_lock.READ_LOCK))
    with pytest.raises(FileNotFoundError, match=r"iter_0000001 was removed while it was being exported: a run still "
                                                r"training into .* prunes its older checkpoints"):
        exporter.export_checkpoint(run, str(tmp_path / "hf"))
    pruner.release()


def _checkpointer(tmp_path, monkeypatch, load):
    from bft_megatron.checkpoint import manager
    from bft_megatron.config import load_config

    cfg = load_config(None, [f"checkpoint.load={load}", f"checkpoint.save={tmp_path}/mine",
                             "checkpoint.finetune=true"])
    barriers = []
    monkeypatch.setattr(manager.dist, "barrier", lambda: barriers.append(1))
    return manager.Checkpointer(cfg, SimpleNamespace(rank=0, control=None)), barriers


def test_a_run_loading_another_runs_checkpoint_keeps_it_from_pruning_until_every_rank_read_it(tmp_path, monkeypatch):
    other = _run(tmp_path, 1, 2)
    pointer.write_latest(other, 1)
    ckpt, barriers = _checkpointer(tmp_path, monkeypatch, other)
    during = []
    monkeypatch.setattr(ckpt, "_load_path", lambda *a, **k: during.append((pointer.prune(other, 1, 2), barriers[:])))
    assert ckpt.load(trainer=None) is True
    assert during == [([], [])] and barriers == [1]  # kept while loading; released after every rank's barrier
    assert pointer.prune(other, 1, 2) == [1]


def test_a_checkpoint_pruned_before_it_could_be_loaded_is_a_config_error(tmp_path, monkeypatch):
    from bft_megatron.config import ConfigError

    other = _run(tmp_path, 1)
    pointer.write_latest(other, 1)
    ckpt, _ = _checkpointer(tmp_path, monkeypatch, other)
    pruner, _ = locks.try_lock(os.path.join(other, "iter_0000001", read_lock.READ_LOCK))
    with pytest.raises(ConfigError, match=rf"checkpoint.load={other}: {other}/iter_0000001 was being deleted before it "
                                          r"could be loaded \(a run still saving there prunes"):
        ckpt.load(trainer=None)
    pruner.release()


def test_a_reader_arriving_while_the_pruner_deletes_finds_it_removed(tmp_path, monkeypatch):
    """rmtree deletes in listing order: a reader coming after the lock file went but before metadata.json did made
    a new lock file, locked it and read a directory being deleted (left holding only that lock file). The pruner
    renames the directory aside first; a pruner killed mid-deletion leaves that aside, removed at the next commit."""
    run = _run(tmp_path, 1, 2)
    ckpt = os.path.join(run, "iter_0000001")
    seen, rmtree = [], read_lock.shutil.rmtree

    def reader_arrives_then_rmtree(path, ignore_errors=False):
        try:
            with reading(ckpt):
                seen.append("read")
        except CheckpointRemoved:
            seen.append("removed")
        if "killed" not in seen:
            rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(read_lock.shutil, "rmtree", reader_arrives_then_rmtree)
    assert remove_unless_read(ckpt) is None
    assert seen == ["removed"] and sorted(os.listdir(run)) == ["iter_0000002"]
    seen.append("killed")  # the next deletion stops before rmtree: a pruner killed there
    assert remove_unless_read(os.path.join(run, "iter_0000002")) is None
    assert sorted(os.listdir(run)) == [f".iter_0000002.pruning-{os.getpid()}"]
    monkeypatch.undo()
    megatron_marker(os.path.join(run, "iter_0000003"))
    pointer.commit(run, 3, keep_last=1)
    assert sorted(os.listdir(run)) == ["iter_0000003", "latest"]


def test_an_uncommitted_save_being_read_is_named_for_removal_by_hand_without_keep_last(tmp_path, log_records):
    """Without keep_last nothing is pruned by age: a leftover kept for its reader stays, and the warning says so."""
    run = _run(tmp_path, 1, 2, 3)
    pointer.write_latest(run, 1)
    with reading(os.path.join(run, "iter_0000002")):  # a save killed before its commit, being read
        assert pointer.commit(run, 3, keep_last=None) == []
    [warning] = [r.getMessage() for r in log_records if r.levelno == logging.WARNING]
    assert warning.endswith("an uncommitted save: remove it once it is no longer read")
    assert pointer.list_iterations(run) == [1, 2, 3]
