"""Resuming with another learning-rate schedule: compare the checkpoint's scheduler state with the config's.

megatron's ``OptimizerParamScheduler.load_state_dict`` takes the checkpoint's schedule values
(``use_checkpoint_opt_param_scheduler``), the freshly built scheduler's (``override_opt_param_scheduler``), or
asserts that both agree (neither flag: Megatron-LM's default). The trainer builds it the Megatron-LM way, with
``override_opt_param_scheduler = checkpoint.override_scheduler`` (``training/setup.py``), and a full resume calls
:func:`check_schedule` first, on every rank, before anything else is loaded: a mismatch is a :class:`ConfigError`
naming the config fields and both values (instead of megatron's bare assert half-way through loading, or, as
``use_checkpoint_opt_param_scheduler`` would, silently keeping the old schedule); with ``override_scheduler`` it is
a warning and the config's schedule applies from the checkpoint's step count on.

The optimizer's parameter groups carry bounds too (``max_lr``/``min_lr``, which ``get_lr`` prefers to the
scheduler's own), and loading the optimizer state replaces them with the checkpoint's: megatron's override alone
would decay a new ``train.lr`` schedule from the old peak (Megatron-LM issue #1138). Adam's ``betas`` and ``eps``
live only there (:data:`ADAM_FIELDS`, compared through the config stored in the checkpoint, same error or
warning). :func:`group_bounds` / :func:`restore_group_bounds` keep the config's across the optimizer load.
From megatron-core 0.19 on, ``max_lr``/``min_lr``/``start_wd``/``end_wd`` also identify a saved group to its
current one (``param_group_identifier_keys``): with another schedule no group matches and the load fails, so
:func:`align_saved_group_bounds` first gives the checkpoint's groups the current bounds (put back afterwards anyway).
"""

from __future__ import annotations

from bft_megatron.config.base import ConfigError, format_value, to_dict
from bft_megatron.utils.logging import get_logger

__all__ = ["SOURCES", "ADAM_FIELDS", "WSD_FIELDS", "schedule_changes", "describe_changes", "adam_changes",
           "check_schedule", "group_bounds", "restore_group_bounds", "align_saved_group_bounds"]

_log = get_logger(__name__)

# Scheduler state key -> the config fields ``build_scheduler`` computes it from.
SOURCES: dict[str, tuple[str, ...]] = {
    "max_lr": ("train.lr",),
    "min_lr": ("train.min_lr",),
    "lr_warmup_steps": ("train.warmup_iters",),
    "lr_decay_steps": ("train.decay_iters", "train.train_iters", "train.warmup_iters"),
    "lr_decay_style": ("train.decay",),
    "start_wd": ("train.weight_decay",),
    "end_wd": ("train.weight_decay",),
    "wd_incr_steps": ("train.decay_iters", "train.train_iters"),
    "wd_incr_style": (),
}
_SOURCE_TEXT = {"lr_decay_steps": "train.decay_iters, or train.train_iters when null",
                "wd_incr_steps": "train.decay_iters, or train.train_iters when null",
                "wd_incr_style": "fixed by the trainer"}
_MISSING = object()
# What OptimizerParamScheduler reads from a parameter group (get_lr, get_wd) in preference to its own values,
# and Adam's own hyper-parameters: all of them come back from the checkpoint with the optimizer state.
_GROUP_KEYS = ("max_lr", "min_lr", "start_wd", "end_wd", "betas", "eps")
# Config fields that reach the optimizer only through its parameter groups (compared like the schedule).
ADAM_FIELDS = ("train.adam_beta1", "train.adam_beta2", "train.adam_eps")
# The WSD anneal's settings: arguments of megatron's scheduler that its state_dict leaves out.
WSD_FIELDS = ("train.wsd_decay_iters", "train.wsd_decay_style")


def _lookup(cfg_dict: dict | None, dotted: str):
    node = cfg_dict
    for name in dotted.split("."):
        if not isinstance(node, dict) or name not in node:
            return _MISSING
        node = node[name]
    return node


def schedule_changes(saved: dict, current: dict) -> dict[str, tuple]:
    """Scheduler keys whose checkpoint value differs from the config's: ``{key: (checkpoint, config)}``.

    Compares what megatron's ``load_state_dict`` checks (every key both state dicts have, with ``==``),
    except the step count ``num_steps``, which a resume always takes from the checkpoint.
    """
    return {k: (saved[k], v) for k, v in current.items() if k != "num_steps" and k in saved and saved[k] != v}


def describe_changes(changes: dict[str, tuple], saved_cfg: dict | None, cfg_dict: dict) -> list[str]:
    """One line per config field that changed and moved a scheduler value, with both values.

    ``saved_cfg``: the config stored in the checkpoint (None if absent). A scheduler value no changed field
    explains is reported as itself, with the fields it comes from.
    """
    by_field: dict[str, list[str]] = {}
    lines = []
    for key, (old, new) in changes.items():
        fields = []
        for name in SOURCES.get(key, ()):
            before, after = _lookup(saved_cfg, name), _lookup(cfg_dict, name)
            if before is not _MISSING and after is not _MISSING and before != after:
                fields.append(name)
                by_field.setdefault(name, []).append(f"{key} {format_value(old)} -> {format_value(new)}")
        if not fields:
            sources = _SOURCE_TEXT.get(key) or ", ".join(SOURCES.get(key, ())) or "unknown"
            lines.append(f"scheduler {key} (from {sources}): checkpoint {format_value(old)}, "
                         f"config {format_value(new)}")
    named = [f"{name}: checkpoint {format_value(_lookup(saved_cfg, name))}, "
             f"config {format_value(_lookup(cfg_dict, name))} "
             f"(scheduler {', '.join(moved)})" for name, moved in by_field.items()]
    return named + lines


def adam_changes(saved_cfg: dict | None, cfg_dict: dict) -> list[str]:
    """One line per Adam hyper-parameter (:data:`ADAM_FIELDS`) that differs from the checkpoint's config, and, for a
    WSD schedule, per WSD field (:data:`WSD_FIELDS`: megatron's scheduler state does not hold them)."""
    fields = [(name, "Adam's parameter groups") for name in ADAM_FIELDS]
    if _lookup(cfg_dict, "train.decay") == "wsd":
        fields += [(name, "the WSD anneal") for name in WSD_FIELDS]
    lines = []
    for name, where in fields:
        before, after = _lookup(saved_cfg, name), _lookup(cfg_dict, name)
        if before is not _MISSING and after is not _MISSING and before != after:
            lines.append(f"{name}: checkpoint {format_value(before)}, config {format_value(after)} ({where})")
    return lines


def check_schedule(scheduler, common: dict, cfg, path: str, rank: int = 0) -> None:
    """Compare the checkpoint's scheduler state (``common["scheduler"]``) with ``scheduler``, freshly built from
    ``cfg``. Differences raise :class:`ConfigError` unless ``checkpoint.override_scheduler`` (then a warning, on
    ``rank`` 0). Reads nothing but ``common``, so every rank decides the same without communicating."""
    if "scheduler" not in common:
        raise ConfigError(f"resuming {path}: it holds no optimizer/scheduler state (e.g. an imported HF model); "
                          "load it with checkpoint.finetune=true")
    changes = schedule_changes(common["scheduler"], scheduler.state_dict())
    cfg_dict = to_dict(cfg)
    adam = adam_changes(common.get("config"), cfg_dict)
    if not changes and not adam:
        return
    lines = "\n  ".join(describe_changes(changes, common.get("config"), cfg_dict) + adam)
    iteration = (common.get("train_state") or {}).get("iteration", "?")
    if not cfg.checkpoint.override_scheduler:
        raise ConfigError(
            f"resuming {path} (iteration {iteration}): this config gives another learning-rate schedule (or "
            f"Adam settings) than the checkpoint's:\n  {lines}\nSet checkpoint.override_scheduler=true to train "
            f"with this config's values from iteration {iteration} on, or set the values above back to the "
            f"checkpoint's to keep them.")
    if rank == 0:
        _log.warning("checkpoint.override_scheduler=true: resuming %s at iteration %s with this config's "
                     "learning-rate schedule and Adam settings instead of the checkpoint's:\n  %s", path, iteration,
                     lines)


def group_bounds(optimizer) -> list[dict]:
    """The schedule bounds the optimizer's parameter groups hold now (built from the config), in group order."""
    return [{k: group[k] for k in _GROUP_KEYS if k in group} for group in optimizer.param_groups]


def restore_group_bounds(optimizer, bounds: list[dict]) -> None:
    """Put :func:`group_bounds` back after loading the optimizer state (which brings the checkpoint's).

    Without ``override_scheduler`` :func:`check_schedule` has made sure they are the checkpoint's anyway."""
    groups = optimizer.param_groups
    if len(groups) != len(bounds):
        raise RuntimeError(f"optimizer has {len(groups)} parameter groups after loading, {len(bounds)} before")
    for group, saved in zip(groups, bounds):
        group.update(saved)


def _identifier_keys() -> tuple[str, ...]:
    from megatron.core.optimizer.optimizer import param_group_identifier_keys

    return tuple(param_group_identifier_keys)


def _group_id(group: dict, keys: tuple[str, ...]) -> tuple:
    """megatron's identifier of a parameter group restricted to ``keys`` (NeMo's ``pre_`` aliases, missing = None)."""
    return tuple(group.get(k, group.get(f"pre_{k}")) for k in keys)


def _saved_param_groups(node) -> list[list]:
    """Every ``param_groups`` list in a loaded (possibly chained / nested) optimizer state dict."""
    if isinstance(node, dict):
        own = [node["param_groups"]] if isinstance(node.get("param_groups"), list) else []
        return own + [g for k, v in node.items() if k != "param_groups" for g in _saved_param_groups(v)]
    if isinstance(node, (list, tuple)):
        return [g for v in node for g in _saved_param_groups(v)]
    return []


def align_saved_group_bounds(optimizer, state_dict) -> int:
    """Give the checkpoint's parameter groups (in ``state_dict``, before ``optimizer.load_state_dict``) the schedule
    bounds of the optimizer's current groups; returns how many saved groups changed.

    megatron-core 0.19 identifies a saved group by ``param_group_identifier_keys``, which then include ``max_lr``,
    ``min_lr``, ``start_wd`` and ``end_wd`` (before: ``wd_mult``, ``lr_mult``, ``is_expert_parallel``,
    ``is_decoupled_lr`` only): a resume with another schedule (``override_scheduler``) finds no group and fails with
    a ``KeyError``/``ValueError``. A saved group takes the bounds of the one current group that agrees with it on the
    other identifier keys, which is how megatron-core < 0.19 paired them; :func:`restore_group_bounds` puts the
    config's bounds back after the load in any case. A no-op where the bounds are not identifier keys.
    """
    keys = _identifier_keys()
    bounds = tuple(k for k in keys if k in _GROUP_KEYS)
    others = tuple(k for k in keys if k not in _GROUP_KEYS)
    if not bounds:
        return 0
    current: dict[tuple, list[dict]] = {}
    for group in optimizer.param_groups:
        current.setdefault(_group_id(group, others), []).append(group)
    changed = 0
    for groups in _saved_param_groups(state_dict):
        for saved in groups:
            match = current.get(_group_id(saved, others), [])
            if len(match) != 1 or _group_id(saved, bounds) == _group_id(match[0], bounds):
                continue  # ambiguous or absent: megatron's own error names it; equal: nothing to do
            saved.update({k: match[0][k] for k in bounds if k in match[0]})
            changed += 1
    return changed
