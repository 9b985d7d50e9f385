"""Whether a checkpoint can be loaded by a config: one sequence of checks, run by the load (``Checkpointer``) and,
before any process group or model exists, by the pre-flight (``config.paths.check_paths``: ``--check`` and
every run), so a config the load would refuse fails in seconds instead of after the data preparation.

They read only the checkpoint's common state (``common.pt``: its config, scheduler state, layout, train state),
so every rank decides the same without communicating.
"""

from __future__ import annotations

from types import SimpleNamespace

from bft_megatron.checkpoint.architecture import check_architecture
from bft_megatron.checkpoint.schedule import check_schedule
from bft_megatron.checkpoint.state import optimizer_layout_problem
from bft_megatron.config.base import ConfigError

__all__ = ["check_loadable", "config_scheduler"]


def check_loadable(common: dict, cfg, path: str, *, finetune: bool, own: bool, layout: dict, scheduler,
                   rank: int = 0) -> None:
    """Raise :class:`ConfigError` naming the fields if ``cfg`` cannot load ``path`` (``common``: its common
    state): a weights-only checkpoint (an import) in the run's own ``checkpoint.save``, another model, and for a
    full resume another learning-rate schedule (``scheduler``: built from ``cfg``), another optimizer
    (``parallel.distributed_optimizer``) or an optimizer format that cannot be resharded to ``layout`` (tp, pp, vp,
    cp). ``rank`` 0 logs the warnings and notes (-1: none, for the pre-flight, whose load repeats them)."""
    if own and "train_state" not in common:
        # checkpoint.save is an import's directory (Megatron-LM's --load X --save X with X from `convert import`):
        # the import wins as "own" and cannot be resumed, whatever checkpoint.finetune says, and keep_last would
        # later prune it. Say which setting to change instead of "use finetune=true".
        save = cfg.checkpoint.save
        raise ConfigError(
            f"checkpoint.save={save}: its 'latest' names {path}, a weights-only checkpoint (e.g. from bft-megatron "
            "convert import) that a run cannot resume, and a run must not save into its directory (keep_last would "
            f"prune it); set checkpoint.save to a new directory (fine-tune from it with checkpoint.load={save} "
            "checkpoint.finetune=true)")
    check_architecture(common, cfg, path, finetune, rank)  # a model the checkpoint does not describe
    if finetune:  # fresh optimizer and scheduler: the config's schedule from step 0
        return
    if scheduler is not None:
        check_schedule(scheduler, common, cfg, path, rank)
    problem = _optimizer_kind_problem(common, cfg, path) or optimizer_layout_problem(common, layout, path)
    if problem:
        raise ConfigError(problem)


def _optimizer_kind_problem(common: dict, cfg, path: str) -> str | None:
    """Why a full resume cannot switch ``parallel.distributed_optimizer``, or None: megatron's distributed optimizer
    and its plain one name their state differently (flat DP shards vs per-parameter), and neither loads the
    other's; the load failed inside megatron with a KeyError (exit 1, a crash to SLURM's requeue)."""
    saved = ((common.get("config") or {}).get("parallel") or {}).get("distributed_optimizer")
    now = cfg.parallel.distributed_optimizer
    if saved is None or bool(saved) == now:
        return None
    return (f"parallel.distributed_optimizer={str(now).lower()}: {path} was saved with "
            f"parallel.distributed_optimizer={str(bool(saved)).lower()}, and a full resume cannot load one "
            "optimizer's state into the other. Set it back, or start a new run from its weights: "
            "checkpoint.load=<that run> checkpoint.finetune=true with another checkpoint.save (fresh optimizer state)")


def config_scheduler(cfg):
    """The learning-rate scheduler ``cfg`` builds (``training.setup.build_scheduler``), on a stand-in optimizer:
    what the pre-flight compares with a checkpoint's before any model exists. None where this megatron-core's
    scheduler needs more of an optimizer, or fails on it in any way (the load still compares)."""
    from bft_megatron.training.setup import build_scheduler

    t = cfg.train  # a parameter group as megatron's optimizer makes it (the scheduler reads its bounds)
    groups = [{"max_lr": t.lr, "min_lr": t.min_lr, "wd_mult": 1.0}]
    try:
        return build_scheduler(SimpleNamespace(param_groups=groups), cfg)
    except Exception:  # noqa: BLE001 - a stand-in that this scheduler rejects must not refuse the run
        return None
