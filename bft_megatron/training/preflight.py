"""What ``bft-megatron train`` checks before any process group, model or GPU memory exists.

``load_checked`` loads the YAML and overrides, validates them against ``WORLD_SIZE``, and checks inputs on disk:
``--check`` (the SLURM pre-flight, on the first node) checks everything a run will read, including data already
prepared under ``data.output_dir`` that the trainer would refuse; a real run only the checkpoint (its data may
live on rank 0's node alone); ``--dry-run`` nothing (recipes carry placeholder paths).
"""

from __future__ import annotations

import os

__all__ = ["load_checked", "release_save_dir", "report_check"]


def load_checked(config_path: str | None, overrides: list[str], log, *, check: bool, dry_run: bool,
                 eval_only: bool = False):
    """(cfg, layout), or None after logging a config error (the CLI then exits 2). ``eval_only`` (``--eval-only``)
    reads ``checkpoint.save`` without locking it (it writes nothing there) and needs validation data (``data.valid``
    alone will do); training needs training data (``data.valid`` alone is refused, naming ``data.train``)."""
    from bft_megatron.config import check_paths, config_warnings, load_config, validate
    from bft_megatron.config.validate import error_hint
    from bft_megatron.training.data import check_prepared

    cfg = None
    try:
        cfg = load_config(config_path, overrides)
        layout = validate(cfg, _world_size())
        if not (check or dry_run):
            _require_launcher()
        if eval_only:
            _require_validation_data(cfg)
            cfg = _without_run_logs(cfg, log)
        else:
            _require_training_data(cfg)
        if not dry_run:  # the checkpoint's contents on global rank 0 alone, as the load decides (check_paths)
            if not eval_only:
                _lock_save_dir(cfg, log, check)
            check_paths(cfg, data=check, contents=check or _global_rank_zero(), weights_only=eval_only)
            if check:  # prepared data the trainer would refuse (another template or tokenizer, valid/ vs train/)
                check_prepared(cfg)
    except (ValueError, FileNotFoundError) as exc:  # ConfigError and the data layer's checks are ValueErrors
        log.error("config error: %s%s", exc, error_hint(str(exc), config_path))
        release_save_dir(cfg)
        return None
    except BaseException:  # anything else (a KeyboardInterrupt, an OSError): the lock goes with it
        release_save_dir(cfg)
        raise
    if _global_rank_zero():
        for warning in config_warnings(cfg, eval_only) + (_finished(cfg) if check else []):
            log.warning("config: %s", warning)
    return cfg, layout


def _lock_save_dir(cfg, log, check: bool) -> None:
    """Global rank 0 of a real run locks ``checkpoint.save`` before reading its ``latest`` (kept for the run);
    ``--check`` only probes. Another run holding it is a config error (:mod:`..checkpoint.run_lock`)."""
    from bft_megatron.checkpoint import run_lock
    from bft_megatron.config import ConfigError

    save = cfg.checkpoint.save
    if not save or not _global_rank_zero():
        return
    if check:
        problem = run_lock.probe(save)
        if problem:
            raise ConfigError(problem)
    else:
        run_lock.acquire(save, log)


def _require_validation_data(cfg) -> None:
    """``--eval-only`` evaluates on the validation split the trainer opens (``training.data.has_validation``):
    ``data.valid`` sources, with or without ``data.train`` (then checked as the data layer checks them), prepared
    into ``data.output_dir``, or a ``valid/`` prepared there."""
    from bft_megatron.config import ConfigError
    from bft_megatron.training.data import has_validation

    d = cfg.data
    if d.valid and not d.output_dir:  # else synthetic data, silently instead of the configured validation set
        raise ConfigError(f"--eval-only: data.valid lists {len(d.valid)} source(s) but data.output_dir is empty: set "
                          "data.output_dir, where their prepared validation split goes")
    if d.valid and not d.train:
        d.validate()  # the data layer's own checks (data.tokenizer, data.template, ...), as validate() with data.train
    if has_validation(cfg, eval_only=True):
        return
    raise ConfigError(f"--eval-only evaluates on validation data, but data.valid is empty and data.output_dir="
                      f"{d.output_dir} has no prepared valid/ split: list data.valid sources (prepared on first use), "
                      "or prepare them (bft-megatron prepare --valid PATH)")


def _require_training_data(cfg) -> None:
    """A run that trains needs ``data.train`` sources or prepared data; ``data.valid`` alone without
    ``data.output_dir`` would train on synthetic data (the prepared case: ``training.data`` on rank 0)."""
    from bft_megatron.config import ConfigError

    d = cfg.data
    if d.valid and not d.train and not d.output_dir:
        raise ConfigError(f"data.train lists no sources (and data.output_dir is empty), but data.valid lists "
                          f"{len(d.valid)}: training needs data.train sources. To evaluate a checkpoint on data.valid "
                          "alone, set data.output_dir and pass --eval-only")


def _without_run_logs(cfg, log):
    """``cfg`` with TensorBoard and W&B off: an evaluation appends nothing to the run's logs (a W&B run in progress
    would be resumed)."""
    import dataclasses

    lg = cfg.logging
    if lg.tensorboard_dir or lg.wandb_project:
        if _global_rank_zero():
            log.info("--eval-only: logging.tensorboard_dir and logging.wandb_project are not used (the metrics go "
                     "to the log and --eval-out)")
        cfg = dataclasses.replace(cfg, logging=dataclasses.replace(lg, tensorboard_dir=None, wandb_project=None))
    return cfg


def report_check(cfg, layout, log, dry_run: bool) -> None:
    """What ``--check`` / ``--dry-run`` print once the config passed: the layout, and for a dry run the plan."""
    import sys

    log.info("config OK: world=%d dp=%d micro-batches/step=%d", layout.world_size, layout.dp, layout.num_microbatches)
    if dry_run:
        from bft_megatron.config.plan import DEFAULT_PEAK_TFLOPS, format_plan

        peak = cfg.logging.peak_tflops or DEFAULT_PEAK_TFLOPS  # as bft-megatron plan's default
        sys.stdout.write(format_plan(cfg, layout.world_size, 0.40, peak) + "\n" + _no_gpu_note())


def _no_gpu_note() -> str:
    """A dry run on a login node plans the GPU job; on a machine without CUDA say that the figures are the GPUs'."""
    import torch

    if torch.cuda.is_available():
        return ""
    return ("note: no CUDA device here: the figures above are for the GPUs the config is planned for (a run on this "
            "machine uses gloo on CPU, fp32 or bf16 without Transformer Engine, at a small fraction of that speed)\n")


def release_save_dir(cfg) -> None:
    """Drop the lock :func:`load_checked` took on ``checkpoint.save`` (process exit drops it too)."""
    from bft_megatron.checkpoint import run_lock

    if cfg is not None:
        run_lock.release(cfg.checkpoint.save)


def _finished(cfg) -> list[str]:
    """``--check`` on a run whose own checkpoint already reached ``train.train_iters``: the run would start and stop
    at once, which only its first log lines said."""
    from bft_megatron.checkpoint.pointer import latest_iteration
    from bft_megatron.training.fit import finished_note

    done = latest_iteration(cfg.checkpoint.save) if cfg.checkpoint.save else None
    if done is None or done < cfg.train.train_iters:
        return []
    return [finished_note(cfg, done, f"checkpoint.save={cfg.checkpoint.save}'s latest checkpoint")]


def _global_rank_zero() -> bool:
    """torchrun's (or SLURM's) global rank 0, or no launcher at all (any other ``RANK`` text: not 0)."""
    return os.environ.get("RANK", "0").strip() in ("0", "")


def _world_size() -> int:
    """``WORLD_SIZE`` (set by torchrun and slurm.sbatch; by hand to check or plan for N processes), 1 when unset.
    A value that is not a whole number is a config error naming it, not Python's ``invalid literal for int()``."""
    from bft_megatron.config import ConfigError

    text = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={text!r} is not a whole number of processes (unset it for 1, or set "
                          "WORLD_SIZE=N to check or plan for N processes)") from None


def _require_launcher() -> None:
    """A real run of WORLD_SIZE > 1 processes needs the launcher that starts them and gives each its ``RANK``. With
    only ``WORLD_SIZE`` set by hand (as for ``--check`` and ``--dry-run``) the one process waited for the others,
    silently, until the collective timeout (30 minutes), and a SIGTERM only flagged an exit it never reached."""
    from bft_megatron.config import ConfigError

    world = os.environ.get("WORLD_SIZE", "1").strip()
    if world != "1" and "RANK" not in os.environ:
        raise ConfigError(f"WORLD_SIZE={world} but RANK is not set: no launcher started this process, and the "
                          f"other {int(world) - 1} would never join. Start a run of several processes with "
                          "launch/torchrun.sh (or torchrun --nproc-per-node N, or launch/slurm.sbatch), which set "
                          "RANK for each; WORLD_SIZE by hand is for --check and --dry-run (unset it to train in one "
                          "process)")
