"""What goes into a checkpoint, as megatron sharded state dicts.

* ``model`` / ``model<i>`` (virtual chunks): megatron's own sharded state dicts — keys are global
  (layer numbers offset per stage, TP shards as slices), so a checkpoint loads at any TP/PP/VP. Under
  ``overlap_param_gather`` the last step's parameter all-gather is finished first (:func:`gather_params`).
* ``optimizer``: ``sharded_state_dict(..., metadata=optimizer_metadata(checkpoint.optimizer_format))``:
  ``fully_reshardable`` — canonical per-parameter Adam state, reloadable at another layout — or
  ``dp_reshardable`` — each DP rank's flat buffers, reloadable at another DP size only, no gather before a save.
  Both resume bitwise at the same layout (through :func:`tolerate_missing_adam_step`).
* ``rng_state``: one ShardedObject per global rank, restored only at the identical layout.
* common (rank-0) items: scheduler state, :class:`TrainState` (iteration, consumed rows), layout.
"""

from __future__ import annotations

import contextlib

import torch

from bft_megatron.parallel.bootstrap import ParallelGroups
from bft_megatron.utils.logging import get_logger

__all__ = ["optimizer_metadata", "saved_optimizer_format", "optimizer_layout_problem", "layout_of",
           "model_sharded_state_dict", "gather_params", "init_optimizer_state", "torch_optimizers", "untie_adam_steps",
           "rng_sharded_object", "restore_rng", "unwrap", "tolerate_missing_adam_step"]

DEFAULT_OPTIMIZER_FORMAT = "fully_reshardable"  # of checkpoints whose config does not name one


def optimizer_metadata(optimizer_format: str) -> dict:
    """The ``metadata`` of megatron's ``DistributedOptimizer.sharded_state_dict`` for ``checkpoint.optimizer_format``
    (the same dict must be used to save and to load a checkpoint)."""
    return {"distrib_optim_sharding_type": optimizer_format, "chained_optim_avoid_prefix": True}


def saved_optimizer_format(common: dict) -> str:
    """The optimizer format a checkpoint was saved with (its config), from its common state dict."""
    ckpt = (common.get("config") or {}).get("checkpoint") or {}
    return ckpt.get("optimizer_format", DEFAULT_OPTIMIZER_FORMAT)


def optimizer_layout_problem(common: dict, layout: dict, path: str) -> str | None:
    """Why a full resume at ``layout`` (tp/pp/vp/cp) cannot load the optimizer state of the checkpoint whose common
    state dict is ``common``, or None: megatron's ``dp_reshardable`` format reloads at another DP size only."""
    saved = common.get("layout") or {}
    changed = [f"{k} {saved.get(k)} -> {layout[k]}" for k in ("tp", "pp", "vp", "cp") if saved.get(k) != layout[k]]
    if saved_optimizer_format(common) != "dp_reshardable" or not changed:
        return None
    return (f"{path}: its optimizer state is in the dp_reshardable format (checkpoint.optimizer_format), which a full "
            f"resume can only load at the same tp/pp/vp/cp (dp may change); this run changes {', '.join(changed)}. "
            "Resume at the saved layout, or start a new run from its weights: checkpoint.load=<that run> "
            "checkpoint.finetune=true with another checkpoint.save (fresh optimizer state)")


def layout_of(groups: ParallelGroups) -> dict:
    return {"tp": groups.tp_size, "pp": groups.pp_size, "vp": groups.vp_size, "cp": groups.cp_size,
            "dp": groups.dp_size, "world": groups.world_size}


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(module, "module"):
        module = module.module
    return module


def model_sharded_state_dict(model: list[torch.nn.Module]) -> dict:
    """Sharded state dicts of the unwrapped chunks (wrappers would prefix every key with ``module.``)."""
    if len(model) == 1:
        return {"model": unwrap(model[0]).sharded_state_dict()}
    return {f"model{i}": unwrap(chunk).sharded_state_dict() for i, chunk in enumerate(model)}


def gather_params(model: list[torch.nn.Module]) -> None:
    """Finish the distributed optimizer's parameter all-gather of the last step (collective over DP x CP).

    With ``overlap_param_gather`` megatron defers it to the next forward's pre-hooks: until then every rank holds
    only its own shard of the updated weights, the rest one step old. Whatever reads whole weights between a
    step and the next forward (a checkpoint save, an HF export) must gather first. The next forward finds the
    gather done (under virtual pipelining the interleaved schedule gathers the chunks after the first again, the
    same values), so training continues exactly as without this call.
    """
    for chunk in model:
        if getattr(chunk, "use_forward_hook", False):  # megatron DDP with overlap_param_gather
            chunk.start_param_sync(force_sync=True)


def torch_optimizers(optimizer) -> list[torch.optim.Optimizer]:
    """The torch optimizers inside a megatron (possibly chained) optimizer."""
    chained = getattr(optimizer, "chained_optimizers", None)
    megatron_opts = chained if chained is not None else [optimizer]
    return [m.optimizer for m in megatron_opts if getattr(m, "optimizer", None) is not None]


def init_optimizer_state(optimizer) -> None:
    """Create zero optimizer state so a sharded save/load has targets (no-op where state exists).

    megatron's own ``init_state_fn`` creates the Adam moments (TE FusedAdam keeps its step in the param
    groups); torch Adam/AdamW additionally need one ``step`` tensor per parameter.
    """
    chained = getattr(optimizer, "chained_optimizers", None)
    for m in chained if chained is not None else [optimizer]:
        inner = getattr(m, "optimizer", None)
        if inner is None:
            continue
        if getattr(m, "init_state_fn", None) is not None:
            m.init_state_fn(inner, getattr(m, "config", None))
        if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            for group in inner.param_groups:
                for p in group["params"]:
                    st = inner.state[p]
                    if "exp_avg" not in st:
                        st["exp_avg"] = torch.zeros_like(p.data)
                        st["exp_avg_sq"] = torch.zeros_like(p.data)
                    st.setdefault("step", torch.zeros((), dtype=torch.float32))


def untie_adam_steps(optimizer) -> int:
    """Give every parameter its own ``step`` tensor (the resume trap; returns how many were cloned).

    megatron's DistributedOptimizer (torch Adam, no TE/apex) loads one shared ``step`` tensor into
    every parameter's state; torch Adam increments ``state["step"]`` in place once per parameter, so
    a shared tensor advances N times per optimizer step and the bias correction goes wrong
    silently. Cloning restores one counter per parameter.
    """
    cloned = 0
    for opt in torch_optimizers(optimizer):
        seen: set[int] = set()
        for st in opt.state.values():
            step = st.get("step")
            if isinstance(step, torch.Tensor):
                if id(step) in seen:
                    st["step"] = step.detach().clone()
                    cloned += 1
                seen.add(id(st["step"]))
    return cloned


@contextlib.contextmanager
def tolerate_missing_adam_step(optimizer):
    """Let a distributed-optimizer load copy only the per-parameter tensors the checkpoint has, never ``step``.

    megatron-core 0.16 (torch Adam, no TE/apex) first loads the param groups' ``step`` into every parameter
    state (``DistributedOptimizer.load_state_dict``), then copies each checkpointed tensor into *every* state key:

    * ``fully_reshardable`` does not store ``step`` -> ``KeyError: 'step'``;
    * ``dp_reshardable`` returns, as ``step``, a ``LocalNonpersistentObject`` of this optimizer's own step
      tensor at the time the load request was built (0 for a fresh optimizer), which would silently
      overwrite the loaded step: Adam's bias correction restarts and the resumed run diverges;
    * ``dp_reshardable``'s loader, unlike ``fully_reshardable``'s, does not run under ``torch.no_grad``, and
      fp32 main parameters are views of the model's leaf parameters -> "a view of a leaf Variable that
      requires grad is being used in an in-place operation".

    Within this context each DistributedOptimizer copies the checkpoint's keys other than ``step`` (which
    keeps the param groups' value), under ``torch.no_grad``.
    """
    patched = []
    for opt in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        if not hasattr(opt, "_set_main_param_and_optimizer_states"):
            continue
        original = opt._set_main_param_and_optimizer_states

        def copy_present(model_param, tensors, _opt=opt, _orig=original):
            if _opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
                return _orig(model_param, tensors)
            group_index, group_order = _opt.model_param_group_index_map[model_param]
            main_param = _opt.optimizer.param_groups[group_index]["params"][group_order]
            dst = {"param": main_param, **_opt.optimizer.state[main_param]}
            with torch.no_grad():  # fp32: main params are views of the model's leaf parameters
                for key in (dst.keys() & tensors.keys()) - {"step"}:
                    dst[key].copy_(tensors[key])

        opt._set_main_param_and_optimizer_states = copy_present
        patched.append(opt)
    try:
        yield
    finally:
        for opt in patched:
            del opt._set_main_param_and_optimizer_states  # back to the class method


def _rng_states() -> dict:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    states = {"torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def rng_sharded_object(groups: ParallelGroups):
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject("rng_state", _rng_states(), (groups.world_size,), (groups.rank,), replica_id=0)


def restore_rng(states: dict) -> bool:
    """Put the saved generators back; False where the checkpoint was saved on the other kind of device (only the
    CPU generator then): megatron's model-parallel tracker holds CUDA generators on GPUs and CPU ones here, whose
    states differ in size, and a foreign one failed at the first ``fork`` ("RNG state is wrong size")."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    torch.set_rng_state(states["torch"])
    if ("cuda" in states) != torch.cuda.is_available():
        saved_on, here = ("GPU", "CPU") if "cuda" in states else ("CPU", "GPU")
        get_logger(__name__).warning(
            "the checkpoint was saved on %s and is resumed on %s: its CUDA and model-parallel RNG states are not "
            "restored (dropout draws differ from an uninterrupted run; the weights and optimizer are restored)",
            saved_on, here)
        return False
    if "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"])
    get_cuda_rng_tracker().set_states(states["tracker"])
    return True
