"""Multi-process worker for the trainer tests (launched by tests/launch.py through torchrun).

Runs a list of training runs in one process group, re-initialising megatron's model-parallel groups
per run (so several layouts share one launch and its import cost). Rank 0 writes per-run results
(loss history, skipped steps, latest pointer) as JSON. Test seams used here: ``poison`` (make
the loss of given iterations NaN on given ranks), ``poison_grad`` (their gradients inf, losses finite),
``signal_at`` (rank 0 sends itself SIGUSR1 after a step), ``signal_in_eval`` (rank 0 sends it during its first
validation batch; the validation batches each rank ran are recorded), ``die_in_commit`` (exit hard after shards
are written, before ``latest`` moves), ``evaluate`` (validate before training and twice after it; the iterations
``fit`` validated at are recorded too), ``grad_check`` (compare one step's gradient with the reference's instead
of training, tests/gradient_check.py). A run whose checkpoint load raises ``ConfigError`` reports every rank's message
(``load_errors``) and does not train.
"""

import faulthandler
import json
import logging
import os
import signal
import sys
import warnings

warnings.filterwarnings("ignore")


def _die(code: int) -> None:
    """Crash hard, taking this rank's helper processes (dist_checkpointing's spawned workers) along,
    as a scheduler's kill of the job would; otherwise they outlive us and hold the test's pipes."""
    import multiprocessing

    for child in multiprocessing.active_children():
        child.kill()
    os._exit(code)


def _embedding_wgrad_fused(trainer) -> bool | None:
    """Whether the last backward added the word embedding's gradient into main_grad itself (the flag DDP's
    hook reads; reset at the next zero_grad_buffer). None on ranks without the embedding."""
    for name, param in trainer.model[0].named_parameters():
        if name.endswith("embedding.word_embeddings.weight"):
            return bool(param.grad_added_to_main_grad)
    return None


def _poison_gradients(trainer, iterations: set[int]) -> None:
    """After the backward of ``iterations`` (0-based, as ``poison``), +inf in every element of this rank's gradient
    buffers, its own shard included: the losses stay finite, so only the gradient verdict can catch it."""
    if not iterations:
        return
    fwd_bwd = trainer._fwd_bwd

    def poisoned(data, forward_only, **kwargs):
        out = fwd_bwd(data, forward_only, **kwargs)
        if not forward_only and trainer.state.iteration in iterations:
            for chunk in trainer.model:
                for buffer in chunk.buffers:
                    buffer.grad_data.fill_(float("inf"))
        return out

    trainer._fwd_bwd = poisoned


def _state_counts(trainer) -> list[dict]:
    """Every rank's model-state sizes in elements (all-gathered): its parameters, its DDP gradient buffers
    (with megatron's padding) and its optimizer's Adam state (``exp_avg``: the distributed optimizer's shard)."""
    import torch.distributed as dist

    params = sum(p.numel() for chunk in trainer.model for p in chunk.parameters())
    tensors = sum(1 for chunk in trainer.model for _ in chunk.parameters())
    grads = sum(b.grad_data.numel() for chunk in trainer.model for b in chunk.buffers + chunk.expert_parallel_buffers)
    inner = getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer])
    adam = sum(st["exp_avg"].numel() for opt in inner for st in opt.optimizer.state.values() if "exp_avg" in st)
    g = trainer.groups
    mine = {"pp_rank": g.pp_rank, "dp_rank": g.dp_rank, "cp_rank": g.cp_rank, "tp_rank": g.tp_rank,
            "params": params, "tensors": tensors, "grad_buffer": grads, "adam": adam}
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return everyone


def _signal_after_step(trainer, at: int) -> None:
    """This rank sends itself SIGUSR1 after the step that reaches iteration ``at`` (before it is recorded)."""
    step = trainer.train_step

    def train_step_then_signal(**kwargs):
        result = step(**kwargs)
        if trainer.state.iteration + 1 == at:
            os.kill(os.getpid(), signal.SIGUSR1)
        return result

    trainer.train_step = train_step_then_signal


def _signal_in_validation(trainer) -> list[int]:
    """Rank 0 sends itself SIGUSR1 during its first validation batch; returns the list that counts every
    forward-only batch this rank runs."""
    import torch.distributed as dist

    forward_only_batches = []
    fwd_bwd = trainer._fwd_bwd

    def fwd_bwd_then_signal(data, forward_only, **kwargs):
        out = fwd_bwd(data, forward_only, **kwargs)
        if forward_only:
            forward_only_batches.append(trainer.state.iteration)
            if len(forward_only_batches) == 1 and dist.get_rank() == 0:
                os.kill(os.getpid(), signal.SIGUSR1)
        return out

    trainer._fwd_bwd = fwd_bwd_then_signal
    return forward_only_batches


def _build(spec: dict):
    """(cfg, groups, trainer) of ``spec``'s overrides, megatron's groups initialised for its layout."""
    from bft_megatron.config import load_config, validate
    from bft_megatron.parallel import bootstrap
    from bft_megatron.training.build import build_trainer

    cfg = load_config(None, spec["overrides"])
    layout = validate(cfg, int(os.environ["WORLD_SIZE"]))
    p = cfg.parallel
    groups = bootstrap.initialize(p.tp, p.pp, p.vp, p.cp, seed=cfg.train.seed)
    return cfg, groups, build_trainer(cfg, layout, groups)


def check_gradient(spec: dict) -> dict:
    """One step's gradient against the reference's, no training (tests/gradient_check.py)."""
    from bft_megatron.parallel import bootstrap
    from tests.gradient_check import compare

    cfg, _, trainer = _build(spec)
    out = {"grad_check": compare(trainer, cfg)}
    bootstrap.destroy(keep_process_group=True)
    return out


def run_one(spec: dict) -> dict:
    import torch.distributed as dist

    from bft_megatron.checkpoint import Checkpointer
    from bft_megatron.config import ConfigError
    from bft_megatron.parallel import bootstrap
    from bft_megatron.training.fit import ExitRequest, fit
    from bft_megatron.training.loop import NonFiniteError
    from tests.data_fixtures import logged

    cfg, groups, trainer = _build(spec)
    ckpt = Checkpointer(cfg, groups)
    try:
        with logged(logging.WARNING) as load_records:
            ckpt.load(trainer)
    except ConfigError as exc:  # raised on every rank (e.g. another LR schedule): report each rank's, don't train
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, str(exc))
        bootstrap.destroy(keep_process_group=True)
        return {"load_errors": errors, "history": [], "iteration": trainer.state.iteration}
    if dist.get_rank() in spec.get("poison_ranks", [dist.get_rank()]):
        trainer.poison_steps = set(spec.get("poison", []))
        _poison_gradients(trainer, set(spec.get("poison_grad", [])))
    if "die_in_commit" in spec:
        ckpt.before_commit = lambda it: _die(17) if it == spec["die_in_commit"] else None
    exit_request = ExitRequest(install=True)
    if "signal_at" in spec and dist.get_rank() == 0:
        _signal_after_step(trainer, spec["signal_at"])
    eval_batches = _signal_in_validation(trainer) if spec.get("signal_in_eval") else None
    if spec.get("save_init"):
        ckpt.save(trainer)
    evaluations = {"before": trainer.evaluate() if spec.get("evaluate") else None, "at": []}
    validate = trainer.evaluate

    def validate_and_record(**kwargs):
        evaluations["at"].append(trainer.state.iteration)
        evaluations["last"] = validate(**kwargs)
        return evaluations["last"]

    trainer.evaluate = validate_and_record
    error = None
    try:
        fit(trainer, ckpt if cfg.checkpoint.save else None, exit_request)
    except NonFiniteError as exc:
        error = str(exc)
    objective_module = sys.modules["bft_megatron.loss.objective"]
    compiled = sorted(set(objective_module._COMPILED) - objective_module._FAILED)  # backends that compiled
    out = {"history": trainer.state.history, "iteration": trainer.state.iteration,
           "skipped": trainer.state.skipped_steps, "error": error, "compiled": compiled,
           "embedding_wgrad_fused": _embedding_wgrad_fused(trainer), "evaluated_at": evaluations["at"],
           "eval_before": evaluations["before"], "eval_last": evaluations.get("last"),
           "eval_batches": eval_batches, "load_warnings": [r.getMessage() for r in load_records],
           "state_counts": _state_counts(trainer) if spec.get("count_state") else None,
           "eval_after": [validate(), validate()] if spec.get("evaluate") else None}
    bootstrap.destroy(keep_process_group=True)
    return out


def main() -> None:
    import torch.distributed as dist

    faulthandler.register(signal.SIGUSR2, all_threads=True)  # tests/launch.py: a hung launch's stacks
    with open(sys.argv[1]) as fh:
        job = json.load(fh)
    results = [check_gradient(spec) if spec.get("grad_check") else run_one(spec) for spec in job["runs"]]
    if dist.get_rank() == 0:
        with open(job["out"], "w") as fh:
            json.dump(results, fh)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
