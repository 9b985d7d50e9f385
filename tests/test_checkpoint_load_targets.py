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
                                                   r"or no common.pt"),
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
