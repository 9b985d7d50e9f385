"""The optimizer step's contract with megatron-core (single process, CPU).

* ``known_grad_norm``: within it, megatron's own ``ChainedOptimizer.step`` (the installed version's code) clips
  with the norm the trainer's finiteness verdict already computed, never reads the gradients for a norm again
  nor prepares them twice, and returns that norm; afterwards the class methods are back.
* ``train.precision_aware_optimizer``: megatron's ``use_precision_aware_optimizer``; refused by name without TE,
  bf16 or the distributed optimizer; the planner counts 10 optimizer bytes per parameter instead of 12 (the master
  weight as the bf16 parameter plus a 16-bit remainder). Its training and resume run on the GPU
  (tests/test_optimizer_gpu.py).
"""

from types import SimpleNamespace

import pytest
import torch

from bft_megatron.config import ConfigError, load_config, validate
from tests.launch import TINY

BF16 = TINY + ["train.bf16=true"]


class _Inner:
    """One sub-optimizer as ChainedOptimizer.step sees it: parameters with gradients, a config, a step."""

    def __init__(self, params, clip_grad: float):
        from megatron.core.optimizer import OptimizerConfig

        self.params, self.config, self.steps = params, OptimizerConfig(clip_grad=clip_grad), 0
        self.is_stub_optimizer = False

    def get_parameters(self):
        return self.params

    def prepare_grads(self):
        raise AssertionError("gradients prepared twice")

    def get_main_grads_for_grad_norm(self):
        raise AssertionError("gradient norm computed twice")

    def has_grad_norm_group(self, name):  # megatron-core 0.19: separately clipped groups (none here)
        return False

    def step_with_ready_grads(self):
        self.steps += 1
        return True


def _chained(inner):
    from megatron.core.optimizer.optimizer import ChainedOptimizer

    opt = object.__new__(ChainedOptimizer)  # megatron's step() as installed; no model or groups needed
    opt.chained_optimizers, opt.config = [inner], inner.config
    return opt


@pytest.mark.parametrize("clip_grad", [1.0, 0.0])
def test_known_grad_norm_is_the_norm_the_step_clips_with(monkeypatch, clip_grad):
    from megatron.core.optimizer import optimizer as megatron_optimizer
    from megatron.core.optimizer.optimizer import ChainedOptimizer

    from bft_megatron.training.loop import known_grad_norm

    clipped = []  # megatron's clipping asserts CUDA tensors: record what step() hands it instead
    monkeypatch.setattr(megatron_optimizer, "clip_grad_by_total_norm_fp32",
                        lambda params, max_norm, total_norm, **kw: clipped.append((params, max_norm, total_norm)))
    param = torch.nn.Parameter(torch.zeros(3))
    param.grad = torch.tensor([1.0, -2.0, 3.0])
    inner = _Inner([param], clip_grad)
    opt = _chained(inner)
    with known_grad_norm(opt, 4.0):
        updated, grad_norm, _ = opt.step()
    assert updated and grad_norm == 4.0 and inner.steps == 1
    assert clipped == ([([param], 1.0, 4.0)] if clip_grad else [])
    assert opt.get_grad_norm.__func__ is ChainedOptimizer.get_grad_norm
    assert opt.prepare_grads.__func__ is ChainedOptimizer.prepare_grads
    assert "get_grad_norm" not in vars(opt) and "prepare_grads" not in vars(opt)


def test_known_grad_norm_restores_the_methods_when_the_step_raises():
    from bft_megatron.training.loop import known_grad_norm

    opt = SimpleNamespace()
    with pytest.raises(RuntimeError, match="boom"):
        with known_grad_norm(opt, 1.0):
            assert opt.get_grad_norm() == 1.0 and opt.prepare_grads() is False
            raise RuntimeError("boom")
    assert vars(opt) == {}


def test_precision_aware_optimizer_maps_to_megatron(monkeypatch):
    import megatron.core.optimizer as megatron_optimizer

    from bft_megatron.training.setup import build_optimizer

    seen = []  # megatron's OptimizerConfig imports TE's FusedAdam when the flag is on: record the arguments
    monkeypatch.setattr(megatron_optimizer, "OptimizerConfig", lambda **kw: SimpleNamespace(**kw))
    monkeypatch.setattr(megatron_optimizer, "get_megatron_optimizer", lambda config, model: seen.append(config))
    for flag in (False, True):
        build_optimizer([], load_config(None, BF16 + [f"train.precision_aware_optimizer={flag}"]))
    assert [c.use_precision_aware_optimizer for c in seen] == [False, True]
    assert all(c.use_distributed_optimizer and c.bf16 for c in seen)


@pytest.mark.parametrize("extra, require_te, message", [
    ([], True, "train.precision_aware_optimizer=true requires Transformer Engine"),
    (["train.bf16=false"], False, "train.precision_aware_optimizer=true requires train.bf16=true"),
    (["parallel.distributed_optimizer=false"], False,
     "train.precision_aware_optimizer=true requires parallel.distributed_optimizer=true"),
])
def test_precision_aware_optimizer_is_refused_by_name(extra, require_te, message):
    cfg = load_config(None, BF16 + ["train.precision_aware_optimizer=true"] + extra)
    with pytest.raises(ConfigError, match=message):
        validate(cfg, 1, require_te=require_te)
    validate(load_config(None, BF16 + extra), 1, require_te=require_te)  # the same config without the flag is fine


def test_precision_aware_optimizer_plans_two_bytes_less_per_parameter():
    from bft_megatron.config.plan import plan_memory

    plain, _ = plan_memory(load_config(None, BF16), dp=2, num_microbatches=2)
    aware, _ = plan_memory(load_config(None, BF16 + ["train.precision_aware_optimizer=true"]), dp=2,
                           num_microbatches=2)
    assert aware.optimizer == pytest.approx(plain.optimizer * 10 / 12)
    assert aware.total(False) < plain.total(False)


class _TeAdam:
    """TE FusedAdam's state API as megatron-core calls it: TE >= 2.1 takes ``store_param_remainders``."""

    def __init__(self, params, remainders: bool, new_signature: bool):
        self.param_groups, self.state, self.calls = [{"params": params}], {p: {} for p in params}, []
        self.store_param_remainders = remainders
        if new_signature:
            self.initialize_state = lambda p, store_param_remainders: self._init(p, store_param_remainders)
        else:
            self.initialize_state = lambda p: self._init(p, None)

    def _init(self, p, flag):
        self.calls.append((p.dtype, flag))
        self.state[p]["exp_avg"] = torch.zeros_like(p)


@pytest.mark.parametrize("new_signature", [True, False])
def test_precision_aware_state_is_created_as_te_step_would(new_signature):
    """megatron's init_state_fn calls ``initialize_state(p)``, a TypeError with TE 2.x: the checkpointer creates the
    states first, remainders for bf16 parameters only (as TE's step does), and leaves existing states alone."""
    from bft_megatron.checkpoint.state import init_optimizer_state

    params = [torch.zeros(2, dtype=torch.bfloat16), torch.zeros(2), torch.zeros(3, dtype=torch.bfloat16)]
    inner = _TeAdam(params, remainders=True, new_signature=new_signature)
    inner.state[params[2]]["exp_avg"] = torch.ones(3)
    megatron_opt = SimpleNamespace(optimizer=inner, config=SimpleNamespace(use_precision_aware_optimizer=True),
                                   init_state_fn=lambda opt, config: None)
    init_optimizer_state(SimpleNamespace(chained_optimizers=[megatron_opt]))
    expected = [(torch.bfloat16, True), (torch.float32, False)] if new_signature else [(torch.bfloat16, None),
                                                                                      (torch.float32, None)]
    assert inner.calls == expected and inner.state[params[2]]["exp_avg"].sum() == 3
