"""``bft-megatron train`` / ``python -m bft_megatron.train``: fine-tune with BFT on megatron-core.

Launch with torchrun (``torchrun --nproc-per-node N -m bft_megatron.train --config C.yaml
train.lr=1e-5 ...``). Without CUDA it runs on CPU with gloo (cpu_compat applied automatically).
"""

from __future__ import annotations

import argparse
import sys

from bft_megatron.training.evaluation import parse_with_eval_flags

__all__ = ["main"]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bft-megatron train", description=__doc__.splitlines()[0].replace("``", ""))
    parser.add_argument("--config", "-c", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-5 parallel.tp=2")
    mode = parser.add_mutually_exclusive_group()  # --check with --dry-run skipped the checks of the paths
    mode.add_argument("--check", action="store_true", help="validate the config for WORLD_SIZE processes and "
                      "check the inputs on disk (checkpoint.load, data sources, tokenizer, prepared data), then exit")
    mode.add_argument("--dry-run", action="store_true", help="validate for WORLD_SIZE processes (no paths checked), "
                      "print the memory/throughput plan, exit")
    mode.add_argument("--eval-only", action="store_true", help="validate the weights the run would start from once "
                      "(its latest checkpoint, else checkpoint.load; weights only) on the validation split alone "
                      "(data.valid, prepared if missing; data.train not needed nor read), train and save nothing, exit")
    return parse_with_eval_flags(parser, argv)  # adds --eval-out, --eval-samples (usage errors without --eval-only)


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    from bft_megatron.training.preflight import load_checked, release_save_dir
    from bft_megatron.utils.logging import get_logger, quiet_known_warnings
    quiet_known_warnings()
    log = get_logger("bft_megatron.train")
    loaded = load_checked(args.config, args.overrides, log, check=args.check, dry_run=args.dry_run,
                          eval_only=args.eval_only)
    if loaded is None:
        return 2
    try:  # a real run's rank 0 holds checkpoint.save's run lock from load_checked on
        return _run(args, *loaded, log)
    finally:
        release_save_dir(loaded[0])


def _run(args: argparse.Namespace, cfg, layout, log) -> int:
    from bft_megatron.config import ConfigError

    if args.check or args.dry_run:
        from bft_megatron.training.preflight import report_check
        report_check(cfg, layout, log, args.dry_run)
        return 0

    from bft_megatron.training.fit import ExitRequest, fit
    # From here a SIGTERM/SIGUSR1 asks for a clean exit (loading included) and train.exit_duration_minutes counts
    exit_request = ExitRequest(install=cfg.checkpoint.save_on_signal and not args.eval_only)  # eval: a signal ends it
    from bft_megatron.checkpoint import Checkpointer
    from bft_megatron.parallel import bootstrap
    from bft_megatron.parallel.consistency import check_job
    from bft_megatron.training.build import build_trainer

    p = cfg.parallel
    try:  # every rank with the same config and one checkpoint.save before megatron's groups are made
        groups = bootstrap.initialize(p.tp, p.pp, p.vp, p.cp, seed=cfg.train.seed, timeout_minutes=p.timeout_minutes,
                                      agree=lambda: check_job(cfg, writes=not args.eval_only))
    except ConfigError as exc:
        log.error("config error: %s", exc)
        bootstrap.destroy()
        return 2
    try:
        try:
            trainer = build_trainer(cfg, layout, groups, args.eval_only)
            checkpointer = Checkpointer(cfg, groups, weights_only=args.eval_only)
            from_scratch = not checkpointer.load(trainer)
        except ConfigError as exc:  # prepared data, checkpoint's model or LR schedule vs config (on every rank)
            log.error("config error: %s", exc)
            return 2
        if args.eval_only:
            from bft_megatron.training.evaluation import evaluate_only
            return evaluate_only(trainer, checkpointer.loaded_from, args.eval_out, args.eval_samples)
        state = fit(trainer, checkpointer if cfg.checkpoint.save else None, exit_request, from_scratch)
        early = f" of {cfg.train.train_iters} (stopped early)" if state.iteration < cfg.train.train_iters else ""
        log.info("done: %d steps%s, %d skipped, %d rows consumed", state.iteration, early, state.skipped_steps,
                 state.consumed_rows)
        if cfg.checkpoint.export_hf:
            from bft_megatron.convert.live_export import export_after_training

            export_after_training(cfg, trainer.model, groups, state.iteration)
    finally:
        bootstrap.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
