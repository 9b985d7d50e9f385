"""The optimizer step's contract with megatron-core (single process, CPU).

* ``known_grad_norm``: within it, megatron's own ``ChainedOptimizer.step`` (the installed version's code) clips
  with the norm the trainer's finiteness verdict already computed, never reads the gradients for a norm again
  nor prepares them twice, and returns that norm; afterwards the class methods are back.
"""

from types import SimpleNamespace

import pytest
import torch


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
