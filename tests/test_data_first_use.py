"""The trainer's first-use preparation (``bft_megatron.training.data.open_datasets``) and split publication.

* Every configured split whose ``index.json`` is missing is prepared, also when ``train/`` already is
  (valid sources added later, or a run killed between the splits); prepared splits are not redone.
* A split is published (``index.json``) only once complete: a failed or interrupted rewrite leaves none.
* On two gloo ranks every rank takes part in exactly one broadcast (rank 0's verdict) and gets the same
  valid split, whatever it finds on disk when it looks (rank 1 starts only once rank 0 has published
  ``train/``), or the same error for a stale split, or fails too when rank 0's preparation fails.
* The trainer logs the preparation summary (and warns when many samples are truncated), and warns when
  it trains on synthetic data.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pytest

from bft_megatron.config.data import DataConfig, SourceConfig
from bft_megatron.config.schema import load_config
from bft_megatron.data.errors import DataError
from bft_megatron.data.prepare import run
from bft_megatron.data.storage import is_prepared, publish_index, read_index
from bft_megatron.training.data import open_datasets
from tests.data_fixtures import CHATS, DEMO_SP, logged, synthetic_chats, write_jsonl
from tests.dist_harness import run_distributed


def _sources(tmp: Path) -> tuple[Path, Path]:
    return (write_jsonl(tmp / "train.jsonl", synthetic_chats(24, seed=3)),
            write_jsonl(tmp / "valid.jsonl", CHATS))


def _overrides(train: Path, valid: Path | None, out: Path) -> list[str]:
    over = [f"data.train={train}", f"data.tokenizer={DEMO_SP}", f"data.output_dir={out}", "data.seq_length=256",
            "data.template=chatml", "model.vocab_size=4096"]
    return over + ([f"data.valid={valid}"] if valid else [])


def _prepare_train_only(train: Path, out: Path) -> None:
    run(DataConfig(train=[SourceConfig(path=str(train))], tokenizer=DEMO_SP, seq_length=256, output_dir=str(out)))


def test_valid_sources_added_after_train_was_prepared(tmp_path):
    train_src, valid_src = _sources(tmp_path)
    out = tmp_path / "out"
    _prepare_train_only(train_src, out)
    train_index = (out / "train" / "index.json").stat().st_mtime_ns
    train, valid = open_datasets(load_config(None, _overrides(train_src, None, out)))
    assert valid is None and not (out / "valid").exists()
    train, valid = open_datasets(load_config(None, _overrides(train_src, valid_src, out)))
    assert valid is not None and len(valid) > 0 and valid.index["stats"]["records"] == len(CHATS)
    assert (out / "train" / "index.json").stat().st_mtime_ns == train_index  # not prepared again


def test_split_interrupted_before_publication_is_prepared_again(tmp_path):
    train_src, valid_src = _sources(tmp_path)
    out = tmp_path / "out"
    cfg = load_config(None, _overrides(train_src, valid_src, out))
    open_datasets(cfg)
    (out / "valid" / "index.json").unlink()  # as if killed after writing valid's arrays
    (out / "valid" / "tokens.npy").write_bytes(b"partial")
    _, valid = open_datasets(cfg)
    assert valid is not None and valid.index["stats"]["records"] == len(CHATS)
    assert sorted(p.name for p in (out / "valid").iterdir() if p.name.startswith(".")) == []


def _files(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_failed_rewrite_keeps_the_previous_split_and_publish_is_atomic(tmp_path):
    """A rewrite is written into a staging directory and moved into place complete: a failed one leaves the
    previous split as it was (published, the same bytes) and no staging directory."""
    train_src, _ = _sources(tmp_path)
    out = tmp_path / "out"
    _prepare_train_only(train_src, out)
    index = read_index(out / "train")
    assert index["stats"]["records"] == 24  # published once, stats included
    before = _files(out / "train")
    bad = write_jsonl(tmp_path / "bad.jsonl", [], raw_lines=["{"])
    with pytest.raises(DataError, match="no usable samples"):
        run(DataConfig(train=[SourceConfig(path=str(bad))], tokenizer=DEMO_SP, output_dir=str(out), on_error="skip"))
    assert is_prepared(out / "train") and _files(out / "train") == before
    assert sorted(p.name for p in out.iterdir()) == [".prepare.lock", "train"]
    publish_index(out / "train", index)
    assert read_index(out / "train") == index and [p.name for p in (out / "train").glob(".index*")] == []


def test_a_rewrite_leaves_the_arrays_a_reader_has_mapped_unchanged(tmp_path):
    """``prepare`` into the directory of a running training used to rewrite the arrays it had memory-mapped (the
    same files, opened "w+"): it went on training on the new rows from the first one not yet cached. The
    rewrite now moves a new directory into place; the mapped arrays keep their contents."""
    train_src, _ = _sources(tmp_path)
    out = tmp_path / "out"
    _prepare_train_only(train_src, out)
    mapped = np.load(out / "train" / "tokens.npy", mmap_mode="r")
    kept = np.array(mapped)
    run(DataConfig(train=[SourceConfig(path=str(train_src))], tokenizer=DEMO_SP, output_dir=str(out), seed=7))
    assert read_index(out / "train")["seed"] == 7
    fresh = np.load(out / "train" / "tokens.npy")
    assert not np.array_equal(fresh, kept)  # another seed: other rows
    assert np.array_equal(np.array(mapped), kept)
    assert sorted(p.name for p in out.iterdir()) == [".prepare.lock", "train"]  # the old split removed


def test_first_use_logs_the_summary_and_warns_about_truncation(tmp_path, monkeypatch):
    """As ``bft-megatron prepare`` prints it; the demo truncated a quarter of its samples without a word. While it
    tokenizes, a progress line (every minute; here every record) says how far it is (it was silent)."""
    from bft_megatron.data import progress

    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    train_src, _ = _sources(tmp_path)
    over = _overrides(train_src, None, tmp_path / "out") + ["data.seq_length=64"]
    with logged() as records:
        open_datasets(load_config(None, over))
    infos = [r.getMessage() for r in records if r.levelno == logging.INFO]
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert [m for m in infos if m.startswith("tokenize train: ")][-1].startswith("tokenize train: 24 of ~24 records")
    assert any(m.startswith("[train] records=24 samples=") for m in infos)
    assert any("packing_efficiency=" in m and "truncated=" in m for m in infos)
    assert len(warnings) == 1 and "samples (" in warnings[0]
    assert "were longer than data.seq_length=64 and truncated (data.truncation=truncate)" in warnings[0]
    with logged() as records:
        open_datasets(load_config(None, over))  # already prepared: nothing to report
    assert records == []


def test_data_layer_errors_on_first_use_are_config_errors(tmp_path):
    """A template the tokenizer does not have, a bad record: the data layer's user errors (DataError) reach the
    trainer as ConfigError (exit 2, never requeued), naming the output directory and the problem."""
    from bft_megatron.config.base import ConfigError

    train_src, _ = _sources(tmp_path)
    over = _overrides(train_src, None, tmp_path / "out")
    with pytest.raises(ConfigError, match=r"data.output_dir=.*out failed: template='tokenizer': .*hpo_sp.model has "
                                          r"no chat_template"):
        open_datasets(load_config(None, over + ["data.template=tokenizer"]))
    bad = write_jsonl(tmp_path / "bad.jsonl", [], raw_lines=['{"prompt": "q"}'])
    with pytest.raises(ConfigError, match=r"failed: .*bad.jsonl:line 1: missing field 'response'"):
        open_datasets(load_config(None, _overrides(bad, None, tmp_path / "out2")))


def test_a_tokenizer_larger_than_the_model_is_refused_before_preparing_and_by_check(tmp_path, monkeypatch):
    """The demo tokenizer's 3000 ids with model.vocab_size=2048: a ConfigError before any record is tokenized (a
    first use at scale would have spent an hour first), and from the pre-flight (--check) before anything is
    prepared; a split prepared meanwhile is refused alike."""
    from bft_megatron.config.base import ConfigError
    from bft_megatron.data import prepare
    from bft_megatron.training.data import check_prepared

    train_src, _ = _sources(tmp_path)
    cfg = load_config(None, _overrides(train_src, None, tmp_path / "out") + ["model.vocab_size=2048"])
    want = r"data.tokenizer=.*hpo_sp.model has a 3000-token vocabulary but model.vocab_size=2048: .* >= 3000"
    with pytest.raises(ConfigError, match=want):
        check_prepared(cfg)
    monkeypatch.setattr(prepare, "run", lambda *a, **k: pytest.fail("prepared before the vocabulary check"))
    with pytest.raises(ConfigError, match=want):
        open_datasets(cfg)
    monkeypatch.undo()
    _prepare_train_only(train_src, tmp_path / "out")
    with pytest.raises(ConfigError, match=r"the data was tokenized with a 3000-token vocabulary but model.vocab_size"):
        check_prepared(cfg)


def test_synthetic_data_is_announced():
    with logged(logging.WARNING) as records:
        train, _ = open_datasets(load_config(None, ["model.vocab_size=512", "data.seq_length=64"]))
    assert len(train) > 0 and len(records) == 1 and "training on SYNTHETIC data" in records[0].getMessage()


# ---------------------------------------------------------------------------- two gloo ranks
def _open_on_rank(rank: int, world: int, scenarios: list[tuple[list[str], str | None]]) -> list:
    """Per scenario: (broadcasts, train rows, valid rows or None), or (broadcasts, error type, message).
    ``wait_for``: rank 1 opens the data only once that file exists (rank 0 is then still preparing)."""
    import torch.distributed as dist

    from bft_megatron.config.base import ConfigError

    real, calls = dist.broadcast_object_list, []

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    results = []
    dist.broadcast_object_list = counted
    try:
        for overrides, wait_for in scenarios:
            calls.clear()
            deadline = time.monotonic() + 120
            while rank == 1 and wait_for and not Path(wait_for).is_file() and time.monotonic() < deadline:
                time.sleep(0.01)
            try:
                train, valid = open_datasets(load_config(None, overrides))
            except ConfigError as err:  # rank 0's error, on every rank, after the same broadcast
                results.append((len(calls), "ConfigError", str(err)))
                continue
            except Exception as err:  # noqa: BLE001 - a failed preparation must fail every rank, not hang them
                results.append((len(calls), "other", str(err)))
                continue
            results.append((len(calls), len(train), None if valid is None else len(valid)))
    finally:
        dist.broadcast_object_list = real
    return results


def test_all_ranks_get_rank0s_verdict_and_agree_on_valid(tmp_path):
    train_src, valid_src = _sources(tmp_path)
    fresh, added, no_valid = tmp_path / "fresh", tmp_path / "added", tmp_path / "no_valid"
    _prepare_train_only(train_src, added)
    _prepare_train_only(train_src, no_valid)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}\n')
    scenarios = [(_overrides(train_src, valid_src, fresh), str(fresh / "train" / "index.json")),
                 (_overrides(train_src, valid_src, added), None),
                 (_overrides(train_src, None, no_valid), None),
                 (_overrides(train_src, None, no_valid) + ["data.packing=false"], None),
                 (_overrides(str(broken), None, tmp_path / "broken_out"), None)]
    per_rank = run_distributed(_open_on_rank, 2, scenarios, timeout=240)
    assert per_rank[0][:4] == per_rank[1][:4]
    fresh, added, none, stale = per_rank[0][:4]
    (fresh_calls, rows, fresh_valid), (added_calls, _, added_valid), (none_calls, _, none_valid) = fresh, added, none
    assert (fresh_calls, added_calls, none_calls, stale[0]) == (1, 1, 1, 1)
    assert stale[1] == "ConfigError" and "data.packing: prepared true, configured false" in stale[2]
    # a preparation that fails on rank 0 (a bad record: the data layer's DataError) fails rank 1 too, after the
    # same broadcast, instead of leaving it waiting at a barrier, and as a ConfigError on both (the CLI exits 2)
    failed0, failed1 = per_rank[0][4], per_rank[1][4]
    assert failed0 == failed1 and failed0[:2] == (1, "ConfigError")
    assert "data preparation for data.output_dir=" in failed0[2] and "unknown role 'robot'" in failed0[2]
    assert rows > 0 and fresh_valid == added_valid and fresh_valid > 0 and none_valid is None


def test_failed_first_use_preparation_exits_2_on_every_rank(tmp_path):
    """The trainer's CLI as two gloo ranks (started as srun does: one process per rank, the torchrun variables
    set, so each rank's own exit status is seen; torchrun would kill the slower one): rank 0's DataError (every
    sample longer than data.seq_length under data.truncation=drop) is a one-line config error and exit status 2 on
    both ranks (slurm.sbatch never requeues exit 2), with the hint what to change; no rank hangs or prints a
    traceback."""
    import os
    import subprocess
    import sys

    from bft_megatron.parallel.bootstrap import free_port

    root = Path(__file__).resolve().parent.parent
    train_src, _ = _sources(tmp_path)
    cmd = [sys.executable, "-m", "bft_megatron.train", "--config", "configs/demo_cpu.yaml", f"data.train={train_src}",
           "data.valid=null", "data.seq_length=16", "data.truncation=drop", f"data.output_dir={tmp_path / 'out'}",
           f"checkpoint.save={tmp_path / 'ckpt'}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    logs = [open(tmp_path / f"rank{rank}.txt", "w+") for rank in (0, 1)]  # files, not pipes (see tests/launch.py)
    procs = [subprocess.Popen(cmd, cwd=root, env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)), stdout=log,
                              stderr=subprocess.STDOUT) for rank, log in enumerate(logs)]
    try:
        codes = [proc.wait(timeout=300) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for rank, (log, code) in enumerate(zip(logs, codes)):
        log.seek(0)
        out = log.read()
        log.close()
        assert code == 2, out[-3000:]
        errors = [ln for ln in out.splitlines() if " ERROR] " in ln]
        assert len(errors) == 1 and f" r{rank} ERROR] config error: data preparation for " in errors[0]
        assert "train split: no usable samples: 24 records" in errors[0] and "dropped_too_long" in errors[0]
        assert "raise data.seq_length, or set data.truncation=truncate" in errors[0]
        assert "Traceback" not in out


def test_first_use_waits_for_another_preparation_and_takes_its_result(tmp_path, monkeypatch):
    """Two jobs preparing one data.output_dir on first use: the second waits for the first's lock, then finds the
    split prepared and prepares nothing (they used to fail on each other's scratch files, FileNotFoundError)."""
    import shutil
    import threading

    from bft_megatron.data import pipeline
    from tests.lock_holder import Holder

    monkeypatch.setattr(pipeline, "LOCK_POLL_S", 0.05)
    train_src, _ = _sources(tmp_path)
    _prepare_train_only(train_src, tmp_path / "elsewhere")  # what the other job is about to publish
    out = tmp_path / "out"
    out.mkdir()
    other = Holder(out / pipeline.PREPARE_LOCK, tmp_path)
    results = {}
    cfg = DataConfig(train=[SourceConfig(path=str(train_src))], tokenizer=DEMO_SP, seq_length=256, output_dir=str(out))
    try:
        with logged() as records:
            waiter = threading.Thread(target=lambda: results.update(run=run(cfg, splits=["train"])))
            waiter.start()
            deadline = time.monotonic() + 60
            while not any("waiting for another preparation" in r.getMessage() for r in records):
                assert time.monotonic() < deadline and waiter.is_alive()
                time.sleep(0.05)
            shutil.copytree(tmp_path / "elsewhere" / "train", out / "train")  # the other job's result
            other.stop()
            waiter.join(60)
        assert not waiter.is_alive() and results["run"] == {}  # found prepared: nothing done again
        message = next(r.getMessage() for r in records if "waiting for another" in r.getMessage())
        assert f"waiting for another preparation into {out} to finish (host " in message
        assert f"pid {other.proc.pid}" in message
    finally:
        other.kill()


def test_a_prepared_split_gets_a_new_directory_s_permissions_and_replaces_a_link_s_target(tmp_path):
    """The staging directory (mkdtemp: 0700) is moved into place: the team could not read the split. A split that
    is a symbolic link (to a larger disk) stays one; its target is replaced."""
    from bft_megatron.utils.files import default_dir_mode

    train_src, _ = _sources(tmp_path)
    out, disk = tmp_path / "out", tmp_path / "disk"
    _prepare_train_only(train_src, out)
    assert (out / "train").stat().st_mode & 0o777 == default_dir_mode()
    disk.mkdir()
    (out / "train").rename(disk / "train")
    (out / "train").symlink_to(disk / "train")
    run(DataConfig(train=[SourceConfig(path=str(train_src))], tokenizer=DEMO_SP, output_dir=str(out), seed=7))
    assert (out / "train").is_symlink() and read_index(disk / "train")["seed"] == 7
    assert sorted(p.name for p in disk.iterdir()) == ["train"]  # no staging or replaced split left beside it


def test_opening_a_split_while_it_is_replaced_waits_for_a_consistent_one(tmp_path, monkeypatch):
    """Replaced by two renames: an open in between found no split, or an index and arrays of different
    preparations. PackedDataset retries until the index read before and after the arrays agrees with them."""
    from bft_megatron.data import storage

    train_src, _ = _sources(tmp_path)
    out = tmp_path / "out"
    _prepare_train_only(train_src, out)
    good = read_index(out / "train")
    real_load, calls = storage.np.load, []

    def missing_once(path, *args, **kwargs):  # the split is gone for the first array read (between the renames)
        calls.append(path)
        if len(calls) == 1:
            raise FileNotFoundError(path)
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(storage.np, "load", missing_once)
    index, arrays = storage._open_consistent(out / "train")
    assert index == good and len(arrays["tokens"]) == good["num_tokens"] and len(calls) > len(storage.ARRAYS)
    publish_index(out / "train", {**good, "num_tokens": good["num_tokens"] + 1})  # another preparation's index
    with pytest.raises(ValueError, match="index.json does not describe its arrays"):
        storage._open_consistent(out / "train", wait_s=0.3)
