"""Checkpoint bookkeeping files: the atomic ``latest`` pointer, pruning and commit order, atomic writes, and
the Adam step counters untied on resume, the optimizer-state copy on load (never the step, under no_grad), and the
unwrapping of DDP / Float16Module wrappers."""

from __future__ import annotations

import os

import pytest
import torch

from bft_megatron.checkpoint import pointer
from bft_megatron.checkpoint.state import (gather_params, model_sharded_state_dict, tolerate_missing_adam_step,
                                           untie_adam_steps, unwrap)
from tests.data_fixtures import megatron_marker


def test_latest_pointer_is_atomic_and_prune_keeps_last(tmp_path):
    run = str(tmp_path)
    assert pointer.read_latest(run) is None
    for it in (2, 4, 6):
        os.makedirs(os.path.join(run, pointer.iter_dirname(it)))
        pointer.write_latest(run, it)
    assert pointer.read_latest(run) == os.path.join(run, "iter_0000006")
    assert not [f for f in os.listdir(run) if f.startswith(".latest")]  # no temp files left
    os.makedirs(os.path.join(run, "iter_0000008"))  # an uncommitted (in-flight or crashed) save
    assert pointer.prune(run, 2, 6) == [2]
    assert pointer.list_iterations(run) == [4, 6, 8]
    assert pointer.resolve_load_dir(run) == os.path.join(run, "iter_0000006")
    assert pointer.resolve_load_dir(os.path.join(run, "iter_0000004")).endswith("iter_0000004")
    assert pointer.resolve_load_dir(os.path.join(run, "iter_0000005")) is None  # an iter_ name that is not there


def test_pointer_edge_cases_and_what_marks_a_checkpoint_directory(tmp_path):
    """An empty ``latest`` names nothing; iterations past 7 digits are still iter_ directories; the refusal
    message of ``existing_checkpoint`` names the pointer's target and the newest three directories."""
    run = str(tmp_path)
    assert pointer.existing_checkpoint(run) is None
    assert pointer.existing_checkpoint(str(tmp_path / "absent")) is None
    _iter_dirs(run, 1, 2, 3, 4, 12_345_678)
    assert pointer.list_iterations(run) == [1, 2, 3, 4, 12_345_678]
    assert pointer.existing_checkpoint(run) == ("5 iter_ directories (iter_0000003, iter_0000004, iter_12345678) "
                                                "but no 'latest' pointer (an unfinished save or import)")
    (tmp_path / "latest").write_text("\n")
    assert pointer.read_latest(run) is None and pointer.latest_iteration(run) is None
    assert pointer.existing_checkpoint(run) == ("a 'latest' pointer to nothing and 5 iter_ directories (iter_0000003, "
                                                "iter_0000004, iter_12345678)")
    pointer.write_latest(run, 12_345_678)
    assert pointer.latest_iteration(run) == 12_345_678
    assert pointer.resolve_load_dir(run) == os.path.join(run, "iter_12345678")



def test_latest_pointer_survives_a_failed_write(tmp_path, monkeypatch):
    """A crash while writing `latest` (here fsync fails) leaves the previous pointer whole and readable."""
    run = str(tmp_path)
    pointer.write_latest(run, 2)

    def failing_fsync(fd):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk gone"):
        pointer.write_latest(run, 4)
    monkeypatch.undo()
    assert pointer.read_latest(run) == os.path.join(run, "iter_0000002")
    assert os.listdir(run) == ["latest"]  # and no temporary file left behind


def _iter_dirs(run, *its):
    for it in its:
        os.makedirs(os.path.join(run, pointer.iter_dirname(it)))


@pytest.mark.parametrize("keep_last", [1, 2])
def test_commit_removes_uncommitted_saves_before_pruning(tmp_path, keep_last):
    """A save killed before its commit (iter 20, between latest=10 and the next commits) must neither
    count toward keep_last nor outlive the complete checkpoints; saves newer than the commit stay."""
    run = str(tmp_path)
    _iter_dirs(run, 10)
    assert pointer.commit(run, 10, keep_last) == []
    _iter_dirs(run, 20)  # written, never committed (SIGKILL mid-save); the job resumes from 10
    _iter_dirs(run, 15)
    assert pointer.commit(run, 15, keep_last) == ([10] if keep_last == 1 else [])
    assert pointer.list_iterations(run) == ([15, 20] if keep_last == 1 else [10, 15, 20])  # 20 > 15: untouched
    _iter_dirs(run, 30, 40)  # 40: newer than the commit below (not ours to judge)
    assert pointer.commit(run, 30, keep_last) == ([15, 20] if keep_last == 1 else [10, 20])
    assert pointer.list_iterations(run) == ([30, 40] if keep_last == 1 else [15, 30, 40])
    assert pointer.latest_iteration(run) == 30


def test_first_commit_without_latest_keeps_older_directories(tmp_path):
    """With no previous latest nothing is known to be a leftover: older directories count as complete."""
    run = str(tmp_path)
    _iter_dirs(run, 5, 7, 9, 12)
    assert pointer.latest_iteration(run) is None
    assert pointer.commit(run, 9, 2) == [5]
    assert pointer.list_iterations(run) == [7, 9, 12]
    _iter_dirs(run, 11)
    assert pointer.commit(run, 11, None) == []  # nothing between 9 and 11; 12 is newer
    assert pointer.read_latest(run).endswith("iter_0000011")

def test_untie_adam_steps_gives_each_param_its_own_counter():
    params = [torch.nn.Parameter(torch.randn(3)) for _ in range(4)]
    opt = torch.optim.Adam(params, lr=0.1)
    shared = torch.tensor(3.0)
    for p in params:
        opt.state[p] = {"step": shared, "exp_avg": torch.zeros(3), "exp_avg_sq": torch.zeros(3)}

    class Wrapper:
        optimizer = opt

    assert untie_adam_steps(Wrapper()) == 3
    for p in params:
        p.grad = torch.ones(3)
    opt.step()
    assert [float(opt.state[p]["step"]) for p in params] == [4.0] * 4


def test_optimizer_load_copies_the_checkpoints_tensors_but_never_the_adam_step():
    """megatron's dp_reshardable loader hands back, as ``step``, the optimizer's own step tensor of the time the load
    request was built (0 here), and copies into fp32 main parameters (views of the model's leaf parameters) without
    ``no_grad``; fully_reshardable has no ``step`` at all. The patched copy keeps the loaded step and copies under
    no_grad."""
    from types import SimpleNamespace

    model_param = torch.nn.Parameter(torch.zeros(4))
    main_param = model_param.view(-1)[1:3]  # megatron's fp32 main parameter: a view of the leaf
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    opt.param_groups[0]["params"] = [main_param]  # as megatron swaps in its shards (Adam refuses non-leaves)
    loaded_step = torch.tensor(2.0)
    opt.state[main_param] = {"step": loaded_step, "exp_avg": torch.zeros(2), "exp_avg_sq": torch.zeros(2)}

    class FakeDistOpt:
        def __init__(self):
            self.optimizer, self.config = opt, SimpleNamespace(use_precision_aware_optimizer_no_fp8_or_ds_fp8=False)
            self.model_param_group_index_map = {model_param: (0, 0)}

        def _set_main_param_and_optimizer_states(self, model_param, tensors):
            raise AssertionError("patched away")

    dist_opt = FakeDistOpt()
    stale = {"param": torch.tensor([1.0, 2.0]), "exp_avg": torch.tensor([3.0, 4.0]),
             "exp_avg_sq": torch.tensor([5.0, 6.0]), "step": torch.tensor(0.0)}  # dp_reshardable's tensors
    with tolerate_missing_adam_step(dist_opt):
        dist_opt._set_main_param_and_optimizer_states(model_param, stale)
        dist_opt._set_main_param_and_optimizer_states(model_param, {k: v for k, v in stale.items() if k != "step"})
    assert model_param.tolist() == [0.0, 1.0, 2.0, 0.0]
    assert opt.state[main_param]["exp_avg_sq"].tolist() == [5.0, 6.0]
    assert opt.state[main_param]["step"] is loaded_step and float(loaded_step) == 2.0
    assert "_set_main_param_and_optimizer_states" not in vars(dist_opt)  # the class method again


def test_atomic_write_keeps_the_files_permissions(tmp_path):
    """mkstemp's private 0600 temporary must not become the file: a group-readable index stays readable."""
    from bft_megatron.utils.files import atomic_write_text

    shared = tmp_path / "index.json"
    shared.write_text("old")
    os.chmod(shared, 0o640)
    atomic_write_text(shared, "new")
    assert shared.read_text() == "new" and (shared.stat().st_mode & 0o777) == 0o640
    fresh = tmp_path / "fresh.json"
    umask = os.umask(0o022)
    try:
        atomic_write_text(fresh, "x")
    finally:
        os.umask(umask)
    assert (fresh.stat().st_mode & 0o777) == 0o644 and sorted(os.listdir(tmp_path)) == ["fresh.json", "index.json"]


def test_unwrap_removes_every_wrapper_level():
    """DDP(Float16Module(GPTModel)) under bf16: both levels go, or checkpoint keys and export names get a
    ``module.`` prefix."""

    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    inner = torch.nn.Linear(2, 2)
    assert unwrap(inner) is inner and unwrap(Wrapper(inner)) is inner and unwrap(Wrapper(Wrapper(inner))) is inner
    assert [n for n, _ in unwrap(Wrapper(Wrapper(inner))).named_parameters()] == ["weight", "bias"]

    class Sharded(torch.nn.Module):
        def sharded_state_dict(self):
            return {"id": id(self)}

    one, two = Sharded(), Sharded()
    assert model_sharded_state_dict([Wrapper(Wrapper(one))]) == {"model": {"id": id(one)}}
    assert model_sharded_state_dict([Wrapper(one), Wrapper(two)]) == {"model0": {"id": id(one)},
                                                                      "model1": {"id": id(two)}}


@pytest.mark.parametrize("load, save, finetune, error", [
    ("{tmp}/typo", "{tmp}/run", False, True),       # a wrong path: never train from scratch instead
    ("{tmp}/empty", "{tmp}/run", False, True),      # exists, holds no checkpoint
    ("{tmp}/empty", "{tmp}/run", True, True),
    ("{tmp}/run", "{tmp}/run", False, False),      # --load X --save X on a first run: from scratch
])
def test_load_without_a_checkpoint_raises_unless_it_is_the_own_save_dir(tmp_path, load, save, finetune, error):
    from types import SimpleNamespace

    from bft_megatron.checkpoint.manager import Checkpointer
    from bft_megatron.config import ConfigError, load_config

    (tmp_path / "empty").mkdir()
    cfg = load_config(None, [f"checkpoint.load={load.format(tmp=tmp_path)}",
                             f"checkpoint.save={save.format(tmp=tmp_path)}", f"checkpoint.finetune={finetune}"])
    ckpt = Checkpointer(cfg, SimpleNamespace(rank=0, control=None))
    if error:
        with pytest.raises(ConfigError, match=r"no complete checkpoint there .* or unset it to train from scratch"):
            ckpt.load(trainer=None)
    else:
        assert ckpt.load(trainer=None) is False


def test_the_run_config_is_written_and_reads_back_as_the_same_config(tmp_path):
    from types import SimpleNamespace

    from bft_megatron.checkpoint.manager import Checkpointer
    from bft_megatron.config import load_config, to_dict

    cfg = load_config("configs/demo_cpu.yaml", [f"checkpoint.save={tmp_path}/run", "train.lr=2e-4",
                                                "model.rope_scaling.factor=4"])
    path = Checkpointer(cfg, SimpleNamespace(rank=0)).write_run_config()
    assert path == f"{tmp_path}/run/config.yaml"
    assert to_dict(load_config(path)) == to_dict(cfg)


@pytest.mark.parametrize("load, finetune", [("{save}", True), (None, False)])
def test_a_save_dir_holding_an_import_is_refused_naming_checkpoint_save(tmp_path, monkeypatch, load, finetune):
    """checkpoint.save names a `convert import` directory (Megatron-LM's --load X --save X): its 'latest' wins as
    the run's own checkpoint but holds no training state; the error says to give checkpoint.save a new directory,
    not (as the resume check would) to set checkpoint.finetune=true, which may be set already."""
    from types import SimpleNamespace

    from megatron.core import dist_checkpointing

    from bft_megatron.checkpoint.manager import Checkpointer
    from bft_megatron.config import ConfigError, load_config

    save = str(tmp_path / "import")
    megatron_marker(os.path.join(save, pointer.iter_dirname(0)))
    pointer.write_latest(save, 0)
    common = {"layout": {"tp": 1, "pp": 1, "vp": None, "cp": 1, "dp": 1, "world": 1},
              "hf_import": {"source": "/models/x", "spec": "local"}}  # what importer._save_import stores
    monkeypatch.setattr(dist_checkpointing, "load_common_state_dict", lambda path: common)
    overrides = [f"checkpoint.save={save}", f"checkpoint.finetune={finetune}"]
    cfg = load_config(None, overrides + ([f"checkpoint.load={load.format(save=save)}"] if load else []))
    groups = SimpleNamespace(rank=0, tp_size=1, pp_size=1, vp_size=None, cp_size=1, dp_size=1, world_size=1,
                             control=None)
    with pytest.raises(ConfigError, match=rf"checkpoint.save={save}: .*iter_0000000, a weights-only checkpoint.*"
                                          r"set checkpoint.save to a new directory"):
        Checkpointer(cfg, groups).load(trainer=SimpleNamespace(scheduler=None))


@pytest.mark.parametrize("replicas, save_on, load_on", [(2, True, False), (2, False, True), (2, False, False),
                                                        (1, True, True)])
def test_fully_parallel_strategies_spread_over_the_dp_cp_group_when_asked(tmp_path, replicas, save_on, load_on):
    """checkpoint.fully_parallel_save/load wrap torch_dist's strategies over the DP x CP group (more than one
    replica only); off, or with one replica, megatron's plain strategies. (DP2 file sizes and bitwise resumes in
    test_train_faults.py.)"""
    from types import SimpleNamespace

    from megatron.core.dist_checkpointing.strategies.fully_parallel import (FullyParallelLoadStrategyWrapper,
                                                                             FullyParallelSaveStrategyWrapper)

    from bft_megatron.checkpoint.manager import Checkpointer
    from bft_megatron.config import load_config

    (tmp_path / "metadata.json").write_text('{"sharded_backend": "torch_dist", "sharded_backend_version": 1, '
                                            '"common_backend": "torch", "common_backend_version": 1}')
    cfg = load_config(None, [f"checkpoint.fully_parallel_save={save_on}", f"checkpoint.fully_parallel_load={load_on}"])
    group = object()
    ckpt = Checkpointer(cfg, SimpleNamespace(rank=1, dp_cp_size=replicas, dp_cp=group))
    save, load = ckpt._save_strategy(), ckpt._load_strategy(str(tmp_path))
    spread = replicas > 1 and save_on
    assert isinstance(save, FullyParallelSaveStrategyWrapper) == spread
    assert (save.parallelization_group is group) if spread else save.backend == "torch_dist"
    spread = replicas > 1 and load_on
    assert isinstance(load, FullyParallelLoadStrategyWrapper) == spread
    assert (load.parallelization_group is group) if spread else load is None


def test_both_loads_read_with_the_checkpointers_load_strategy(tmp_path, monkeypatch):
    """A weights-only load (finetune) and a full resume both pass _load_strategy's wrapper to megatron's load."""
    from types import SimpleNamespace

    from megatron.core import dist_checkpointing

    from bft_megatron.checkpoint import manager
    from bft_megatron.config import load_config

    class Stop(Exception):
        pass

    class Chunk(torch.nn.Module):
        def sharded_state_dict(self):
            return {}

    seen = []

    def load(request, path, sharded_strategy=None):
        seen.append(sharded_strategy)
        raise Stop

    monkeypatch.setattr(dist_checkpointing, "load", load)
    for name in ("init_optimizer_state", "model_sharded_state_dict"):
        monkeypatch.setattr(manager, name, lambda *a, **k: {})
    cfg = load_config(None, ["checkpoint.fully_parallel_load=true"])
    ckpt = manager.Checkpointer(cfg, SimpleNamespace(rank=0, dp_cp_size=2, dp_cp=object()))
    strategy = object()
    monkeypatch.setattr(ckpt, "_load_strategy", lambda path: strategy if path == str(tmp_path) else None)
    trainer = SimpleNamespace(model=[Chunk()], optimizer=SimpleNamespace(sharded_state_dict=lambda *a, **k: {}))
    with pytest.raises(Stop):
        ckpt._load_weights(trainer, str(tmp_path))
    with pytest.raises(Stop):
        ckpt._load_full(trainer, str(tmp_path), {}, same_layout=False)
    assert seen == [strategy, strategy]


def test_gather_params_finishes_the_deferred_gather_of_every_overlapping_chunk():
    """Every virtual-pipeline chunk of a megatron DDP with overlap_param_gather gathers synchronously (an async
    dispatch would let the save read the buffers mid-gather); other chunks (no distributed optimizer, no DDP
    wrapper) are left alone: their start_param_sync would assert or not exist."""
    calls = []

    class Chunk:
        def __init__(self, name, hook):
            self.name, self.use_forward_hook = name, hook

        def start_param_sync(self, *unused, force_sync=False):
            calls.append((self.name, force_sync))

    gather_params([Chunk("vp0", True), Chunk("no_overlap", False), torch.nn.Linear(1, 1), Chunk("vp1", True)])
    assert calls == [("vp0", True), ("vp1", True)]


@pytest.mark.parametrize("saved_on_gpu", [True, False], ids=["gpu_to_cpu", "cpu_to_gpu"])
def test_rng_states_from_the_other_kind_of_device_are_left_out(monkeypatch, saved_on_gpu):
    """A CPU checkpoint resumed on a GPU (or back) at the same layout: megatron's tracker would get generator
    states of the wrong size and fail at its first fork; only the CPU generator is restored then."""
    from types import SimpleNamespace

    from megatron.core.tensor_parallel import random as mcore_random

    from bft_megatron.checkpoint import state

    restored = []
    monkeypatch.setattr(mcore_random, "get_cuda_rng_tracker", lambda: SimpleNamespace(set_states=restored.append))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s: restored.append("cuda"))
    states = {"torch": torch.get_rng_state(), "tracker": {"model-parallel-rng": "states"},
              **({"cuda": "states"} if saved_on_gpu else {})}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: not saved_on_gpu)
    assert state.restore_rng(states) is False and restored == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: saved_on_gpu)   # the same kind: all of it
    assert state.restore_rng(states) is True
    assert restored == ["cuda"] * saved_on_gpu + [states["tracker"]]
