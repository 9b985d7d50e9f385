"""GPU checks of ``train.precision_aware_optimizer`` (TE's FusedAdam holds the master weights; skipped on CPU).

* It trains like megatron's own fp32 master weights: the same losses for 30 steps (the master weight is the bf16
  parameter plus a 16-bit remainder, which reconstructs the fp32 value exactly; the update kernel is TE's in both).
* Its checkpoint resumes bitwise at the same layout, in both optimizer formats, and a checkpoint written without
  it resumes with it (and the other way round) to the same losses as the uninterrupted run: both store fp32 masters.
"""

import os

import pytest
import torch

from tests.test_train_gpu import GPU_TINY

pytestmark = pytest.mark.gpu

AWARE = ["train.precision_aware_optimizer=true"]


@pytest.fixture(scope="module")
def groups():
    from bft_megatron.parallel import bootstrap

    os.environ.setdefault("MASTER_PORT", "29541")
    g = bootstrap.initialize(seed=1234)
    yield g
    bootstrap.destroy(keep_process_group=True)


def _trainer(groups, extra=()):
    from bft_megatron.config import load_config, validate
    from bft_megatron.training.build import build_trainer

    cfg = load_config(None, GPU_TINY + list(extra))
    return build_trainer(cfg, validate(cfg, 1), groups)


def _run(groups, extra=(), load=None):
    from bft_megatron.checkpoint import Checkpointer
    from bft_megatron.training.fit import fit

    trainer = _trainer(groups, list(extra) + ([f"checkpoint.load={load}"] if load else []))
    ck = Checkpointer(trainer.cfg, groups)
    if load:
        assert ck.load(trainer)
    fit(trainer, ck if trainer.cfg.checkpoint.save else None)
    return [h["loss"] for h in trainer.state.history]


def _adam_state_keys(trainer) -> set:
    inner = getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer])
    return {k for opt in inner for st in opt.optimizer.state.values() for k in st}


def test_precision_aware_optimizer_trains_like_fp32_master_weights(groups):
    plain, aware = _run(groups), _run(groups, AWARE)
    assert aware[-1] < 0.7 * aware[0], aware
    torch.testing.assert_close(torch.tensor(aware), torch.tensor(plain), rtol=1e-3, atol=0)
    trainer = _trainer(groups, AWARE)
    trainer.train_step()
    assert "master_param" in _adam_state_keys(trainer)  # TE holds the masters (megatron keeps none of its own)
    assert all(getattr(p, "main_param", None) is None for c in trainer.model for p in c.parameters())


@pytest.mark.parametrize("optimizer_format", ["fully_reshardable", "dp_reshardable"])
def test_precision_aware_optimizer_resumes_bitwise_and_across_the_setting(groups, tmp_path, optimizer_format):
    fmt = [f"checkpoint.optimizer_format={optimizer_format}", "checkpoint.save_interval=20"]
    aware = _run(groups, AWARE + fmt + [f"checkpoint.save={tmp_path}/aware"])
    plain = _run(groups, fmt + [f"checkpoint.save={tmp_path}/plain"])
    assert _run(groups, AWARE, load=f"{tmp_path}/aware/iter_0000020") == aware[20:]
    torch.testing.assert_close(torch.tensor(_run(groups, load=f"{tmp_path}/aware/iter_0000020")),
                               torch.tensor(aware[20:]), rtol=1e-3, atol=0)
    torch.testing.assert_close(torch.tensor(_run(groups, AWARE, load=f"{tmp_path}/plain/iter_0000020")),
                               torch.tensor(plain[20:]), rtol=1e-3, atol=0)
