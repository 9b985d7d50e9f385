"""Weights & Biases logging (``logging.wandb_project``): the TensorBoard scalars, plotted against ``iteration``,
one W&B run per checkpoint directory (a resume continues it), and the config checks. A stand-in ``wandb``
module records the calls; the last test runs the real package offline where it is installed."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from types import ModuleType, SimpleNamespace

import pytest

from bft_megatron.config import ConfigError, load_config
from bft_megatron.config.validate import config_warnings, validate
from bft_megatron.training.progress import ProgressLog
from bft_megatron.training.wandb_log import RUN_ID_FILE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["model.hidden_size=64", "model.num_layers=2", "model.num_attention_heads=4", "model.num_query_groups=2",
        "model.ffn_hidden_size=128", "model.vocab_size=128", "data.seq_length=32", "train.global_batch_size=8",
        "train.micro_batch_size=2", "train.train_iters=10"]


class _FakeRun:
    def __init__(self, calls: list) -> None:
        self.calls = calls

    def define_metric(self, name, **kwargs):
        self.calls.append(("define_metric", name, kwargs))

    def log(self, data):
        self.calls.append(("log", dict(data)))

    def finish(self):
        self.calls.append(("finish",))


@pytest.fixture
def fake_wandb(monkeypatch):
    calls: list = []
    module = ModuleType("wandb")
    module.init = lambda **kwargs: calls.append(("init", kwargs)) or _FakeRun(calls)
    monkeypatch.setitem(sys.modules, "wandb", module)
    return calls


def _progress(overrides: list[str], rank: int = 0) -> ProgressLog:
    return ProgressLog(load_config(None, TINY + overrides), SimpleNamespace(rank=rank, world_size=1))


def test_the_tensorboard_scalars_go_to_one_run_plotted_against_iteration(fake_wandb, tmp_path):
    save = tmp_path / "run7"
    log = _progress(["logging.wandb_project=bio", "logging.wandb_entity=lab", f"checkpoint.save={save}"])
    log.line(3, {"loss": 1.5, "lm_loss": 2.0, "p_conf": math.nan}, 0.5, 1e-5, 0.25, 0)
    log.eval(3, {"lm_loss": 1.75})
    log.close()
    (_, init), *rest = fake_wandb
    assert init["project"] == "bio" and init["entity"] == "lab" and init["resume"] == "allow"
    assert init["name"] == f"{tmp_path.name}/run7" and init["dir"] == str(save) and os.path.isdir(init["dir"])
    assert init["id"] == (save / RUN_ID_FILE).read_text().strip()
    assert init["config"]["logging"]["wandb_project"] == "bio" and init["config"]["train"]["train_iters"] == 10
    assert ("define_metric", "train/*", {"step_metric": "iteration"}) in rest
    assert ("define_metric", "valid/*", {"step_metric": "iteration"}) in rest
    logs = [c[1] for c in rest if c[0] == "log"]
    train, valid = logs
    assert train["iteration"] == 3 and train["train/loss"] == 1.5 and train["train/lm_loss"] == 2.0
    assert train["train/lr"] == 1e-5 and train["train/grad_norm"] == 0.25 and train["train/skipped_steps"] == 0.0
    assert "train/p_conf" not in train                                 # NaN left out, as for TensorBoard
    assert valid == {"iteration": 3, "valid/lm_loss": 1.75}
    assert rest[-1] == ("finish",)


def test_a_dead_wandb_service_warns_once_and_training_goes_on(fake_wandb, tmp_path, monkeypatch):
    """W&B's service dies on a SIGTERM sent to the whole SLURM step; the next log call raised on rank 0 in the step
    that asked for the exit save. Now: one warning, no more W&B calls, no exception."""
    from bft_megatron.training import wandb_log

    warnings = []
    monkeypatch.setattr(wandb_log._log, "warning", lambda msg, *args: warnings.append(msg % args))
    log = _progress(["logging.wandb_project=bio", f"checkpoint.save={tmp_path}"])

    def lost(*_):
        raise ConnectionResetError("Connection lost")

    log.wandb.run.log = lost
    for it in (1, 2):
        log.line(it, {"loss": 1.0}, 0.5, 1e-5, 0.25, 0)
    log.close()
    assert warnings == ["W&B log failed (ConnectionResetError: Connection lost); no more W&B logging in this run"]
    assert ("finish",) not in fake_wandb


def test_a_resume_continues_the_run_and_another_save_dir_starts_a_new_one(fake_wandb, tmp_path):
    ids = []
    for save in ("a", "a", "b"):
        _progress(["logging.wandb_project=bio", f"checkpoint.save={tmp_path / save}"]).close()
        ids.append([c[1]["id"] for c in fake_wandb if c[0] == "init"][-1])
    assert ids[0] == ids[1] != ids[2]
    _progress(["logging.wandb_project=bio"]).close()                  # no checkpoint.save: a run of its own
    no_save = [c[1] for c in fake_wandb if c[0] == "init"][-1]
    assert no_save["id"] not in ids and no_save["dir"] is None and no_save["name"] is None


def test_only_global_rank_0_and_only_with_a_project(fake_wandb, tmp_path):
    _progress(["logging.wandb_project=bio", f"checkpoint.save={tmp_path}"], rank=1).close()
    _progress([f"checkpoint.save={tmp_path}"]).close()
    assert fake_wandb == []


def _failing_start(rank: int, world: int) -> str:
    """A W&B start that fails on rank 0 (as with a bad API key), on 2 gloo ranks: what each rank raises."""
    module = ModuleType("wandb")
    module.init = lambda **kwargs: (_ for _ in ()).throw(PermissionError("api key not valid"))
    sys.modules["wandb"] = module
    try:
        _progress(["logging.wandb_project=bio"], rank=rank)
    except Exception as exc:  # noqa: BLE001 - the outcome under test
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def test_a_failed_start_on_rank_0_fails_every_rank():
    from tests.dist_harness import run_distributed

    rank0, rank1 = run_distributed(_failing_start, 2, timeout=120)
    assert rank0 == "PermissionError: api key not valid"
    assert rank1 == ("RuntimeError: starting the W&B run (logging.wandb_project) failed on rank 0: PermissionError: "
                     "api key not valid")


def test_a_project_without_the_package_is_refused_naming_the_field(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    cfg = load_config(None, TINY + ["logging.wandb_project=bio"])
    with pytest.raises(ConfigError, match=r"logging.wandb_project='bio' needs the wandb package.*pip install wandb"):
        validate(cfg, 1)
    validate(cfg, 1, require_te=False)                                # bft-megatron plan on a login node


def test_wandb_settings_without_a_project_are_warned_about():
    cfg = load_config(None, TINY + ["logging.wandb_entity=lab", "logging.wandb_dir=/tmp/w"])
    assert any("logging.wandb_entity, logging.wandb_dir set but logging.wandb_project is not" in w
               for w in config_warnings(cfg))


OFFLINE = """
import sys
from types import SimpleNamespace
from bft_megatron.config import load_config
from bft_megatron.training.progress import ProgressLog
cfg = load_config(None, sys.argv[2:])
for it in (1, 2):  # two starts on one checkpoint directory: a resume
    log = ProgressLog(cfg, SimpleNamespace(rank=0, world_size=1))
    log.line(it, {"loss": 1.0 / it, "lm_loss": 2.0}, 0.1, 1e-5, 0.5, 0)
    log.eval(it, {"lm_loss": 1.5})
    log.close()
    print("run", log.wandb.run.id)
"""


def test_the_real_package_offline(tmp_path):
    pytest.importorskip("wandb")
    save = tmp_path / "ckpt"
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", OFFLINE, "-", *TINY, "logging.wandb_project=bio",
                          f"checkpoint.save={save}"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    run_id = (save / RUN_ID_FILE).read_text().strip()
    assert out.stdout.split("\n")[:2] == [f"run {run_id}"] * 2          # both starts logged to the same run
    runs = sorted(p for p in os.listdir(save / "wandb") if p.startswith("offline-run-"))
    assert len(runs) == 2 and all(r.split("-")[3] == run_id for r in runs)  # a directory per start
    assert all(os.path.getsize(save / "wandb" / r / f"run-{run_id}.wandb") > 0 for r in runs)
