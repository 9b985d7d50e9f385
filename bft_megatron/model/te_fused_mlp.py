"""megatron's ``TEFusedMLP`` (``train.te_op_fuser``) with its FP8 weights cast once per optimizer step.

TE's ``Linear`` modules (attention's QKV and output projection) cast their weights to FP8 only for the first
micro-batch of a step and reuse that copy for the others: megatron's schedule marks the first micro-batch
(``MegatronModule.set_is_first_microbatch``) and the weights change only in the optimizer step. The
operation API behind ``TEFusedMLP`` has no such cache: ``BasicLinear`` quantizes fc1's and fc2's weights (bf16
read, FP8 row- and column-wise written, 2/3 of a Llama layer's weights) for every micro-batch. Here the two
linear ops keep the quantized weight of the step's first micro-batch (``_StepCachedLinear``) and
``StepCachedFusedMLP.forward`` drops it when megatron marks the next first micro-batch: the same contract,
and the same memory (one FP8 copy of every weight, which the planner already counts), as TE's ``Linear``.

The cast itself stays TE's (the op's own weight quantizer, so delayed scaling records the weight's amax at
the first micro-batch exactly as TE's ``Linear`` does); the op then runs with the quantized tensor in place
of its bf16 parameter, the path TE takes for FP8 parameters (``fp8_model_init``). Off with
``train.fp8_weight_cache=false`` (megatron's ``disable_parameter_transpose_cache``, which also turns off
TE ``Linear``'s cache) and outside FP8. Imported only with Transformer Engine (``model/spec.py``).
"""

from __future__ import annotations

import torch
import transformer_engine.pytorch as te
from megatron.core.extensions.transformer_engine import TEFusedMLP

try:  # TE >= 2.9 (assumed; 2.20 has it); earlier releases keep it in pytorch.fp8
    from transformer_engine.pytorch.quantization import FP8GlobalStateManager
except ImportError:  # pragma: no cover - older TE
    from transformer_engine.pytorch.fp8 import FP8GlobalStateManager

__all__ = ["StepCachedFusedMLP"]


class _StepCachedLinear(te.ops.BasicLinear):
    """``BasicLinear`` whose FP8 weight is quantized once and reused until :meth:`drop_step_weight`."""

    # (FP8 weight, has column-wise data) of this step, or None. A tuple: nn.Module would register a bare
    # Parameter assigned to an attribute as a parameter of the op.
    _step_cache = None
    casts = 0  # how many times the weight was quantized (tests check one per optimizer step)

    def drop_step_weight(self) -> None:
        self._step_cache = None

    def _quantized_weight(self, requires_grad: bool):
        """The step's FP8 copy of ``self.weight``: row-wise for the forward GEMM, column-wise for the input
        gradient's (made by TE's own weight quantizer: scale, amax bookkeeping and kernels are TE's)."""
        if self._step_cache is not None and (self._step_cache[1] or not requires_grad):
            return self._step_cache[0]
        quantizer = self.get_quantizer("forward", 1)
        quantizer.set_usage(rowwise=True, columnwise=requires_grad)
        internal, quantizer.internal = quantizer.internal, False  # a tensor (dtype, requires_grad), not storage
        try:
            with torch.no_grad():
                w = quantizer(self.weight)
        finally:
            quantizer.internal = internal
        # a parameter, as TE wraps FP8 parameters: op_forward reads requires_grad to decide on the weight gradient
        w = torch.nn.Parameter(w, requires_grad=self.weight.requires_grad)
        self._step_cache, self.casts = (w, requires_grad), self.casts + 1
        return w

    def op_forward(self, ctx, input_, prev_op_grad_output_quantizer, next_op_input_quantizer, **kwargs):
        quantizers = dict(prev_op_grad_output_quantizer=prev_op_grad_output_quantizer,
                          next_op_input_quantizer=next_op_input_quantizer, **kwargs)
        if not FP8GlobalStateManager.is_fp8_enabled() or _recipe_overrides_backward():
            return super().op_forward(ctx, input_, **quantizers)
        # op_forward reads self.weight for the GEMM (a quantized tensor is used as is, and kept whole for the
        # backward GEMM) and for its dtype / requires_grad; an instance attribute shadows the registered
        # parameter for this call only, so the backward pass (main_grad, wgrad fusion) sees the parameter.
        self.__dict__["weight"] = self._quantized_weight(ctx.requires_grad)
        try:
            return super().op_forward(ctx, input_, **quantizers)
        finally:
            del self.__dict__["weight"]


def _recipe_overrides_backward() -> bool:
    """Recipes that run the backward pass in high precision keep the bf16 weight for it: no cache then."""
    return getattr(FP8GlobalStateManager.get_fp8_recipe(), "backward_override", None) is not None


class StepCachedFusedMLP(TEFusedMLP):
    """``TEFusedMLP`` whose fc1 / fc2 FP8 weights are cast at the first micro-batch of each step only."""

    def _make_fused_impl(self):
        impl = super()._make_fused_impl()
        if not self.config.disable_parameter_transpose_cache:
            for op in impl:
                # TE releases whose ops predate quantizer objects keep their own per-micro-batch casts
                if type(op) is te.ops.BasicLinear and hasattr(op, "get_quantizer"):
                    op.__class__ = _StepCachedLinear  # adds methods only: no new state to initialise
        return impl

    def forward(self, hidden_states: torch.Tensor, **kwargs):
        # megatron's schedule sets is_first_microbatch on every TE module at a step's first micro-batch
        # (TE's Linear clears it in its forward; the fused implementation never calls linear_fc1's forward)
        if self.linear_fc1.is_first_microbatch:
            for op in self._fused_impl[0] if self._fused_impl is not None else ():
                if isinstance(op, _StepCachedLinear):
                    op.drop_step_weight()
            self.linear_fc1.is_first_microbatch = False
        return super().forward(hidden_states, **kwargs)
