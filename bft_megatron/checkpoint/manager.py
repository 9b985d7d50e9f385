"""Save and load training checkpoints with megatron dist_checkpointing (torch_dist format).

Save protocol (``Checkpointer.save``): every rank writes its shards of ``<save>/iter_N`` (sync, or
async through megatron's ``AsyncCallsQueue``); when all ranks are done (barrier / async finalize),
rank 0 writes the checkpoint's HF files (``iter_N/hf/``: config, tokenizer, chat template; ``hf_files.py``),
deletes uncommitted leftovers, atomically moves ``latest`` to ``iter_N`` and prunes to ``keep_last``
(``pointer.commit``). Load
(``Checkpointer.load``): full resume (model, optimizer, scheduler, data position, RNG at the same
layout) or ``finetune`` (weights only, fresh everything else). Loading at another TP/PP/VP works
because every sharded key is global. Every load first checks that the config's model is the checkpoint's
(``architecture.py``), and a full resume that the config reproduces the checkpoint's learning-rate schedule
(``schedule.py``; ``checkpoint.override_scheduler`` to change it).
"""

from __future__ import annotations

import inspect
import os
import shutil
from contextlib import ExitStack

import torch
import torch.distributed as dist

from bft_megatron.checkpoint import pointer
from bft_megatron.checkpoint.compat import check_loadable
from bft_megatron.checkpoint.data_order import warn_data_order
from bft_megatron.checkpoint.disk_space import (checkpoint_bytes, explain_failed_save, free_bytes, keep_last_advice,
                                                size_text, space_warning)
from bft_megatron.checkpoint.hf_files import CheckpointHF
from bft_megatron.checkpoint.read_lock import CheckpointRemoved, moved_aside, reading
from bft_megatron.checkpoint.schedule import align_saved_group_bounds, group_bounds, restore_group_bounds
from bft_megatron.checkpoint.state import (gather_params, init_optimizer_state, layout_of, model_sharded_state_dict,
                                           optimizer_metadata, restore_rng, rng_sharded_object, saved_optimizer_format,
                                           tolerate_missing_adam_step, untie_adam_steps, unwrap)
from bft_megatron.checkpoint.weights import load_model_weights
from bft_megatron.config.base import ConfigError, to_dict
from bft_megatron.config.paths import loads_own_save_dir
from bft_megatron.parallel.rank0 import rank0_value
from bft_megatron.utils.logging import get_logger

__all__ = ["Checkpointer"]

_log = get_logger(__name__)


def _mcore_async_kwargs() -> dict:
    """``async_strategy="mcore"`` where ``dist_checkpointing.save`` takes it.

    megatron-core 0.17 added ``async_strategy`` to ``save`` with the default ``"nvrx"``, which needs
    nvidia-resiliency-ext and returns that package's request type; the queue that schedules our async saves is
    megatron's own ``AsyncCallsQueue`` (the only writer before 0.17), whose requests ``"mcore"`` produces.
    """
    from megatron.core import dist_checkpointing

    takes_strategy = "async_strategy" in inspect.signature(dist_checkpointing.save).parameters
    return {"async_strategy": "mcore"} if takes_strategy else {}


def _shield_mcore_results_queue() -> None:
    """Start megatron's write-results queue (a ``spawn`` ``Manager`` server that megatron makes at the first save
    and every later save reuses) in a server that survives SIGTERM/SIGUSR1 (``utils/signal_shield.py``): killed
    by the signal that asked for the exit save, it failed that save with BrokenPipeError. A no-op where megatron
    made it already or keeps it elsewhere."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa

    if getattr(fa, "_results_queue", True) is not None:
        return
    import multiprocessing as mp
    from multiprocessing.managers import SyncManager

    from bft_megatron.utils.signal_shield import ignore_exit_signals

    server = SyncManager(ctx=mp.get_context("spawn"))
    server.start(ignore_exit_signals)
    fa._results_queue = server.Queue()  # the proxy keeps its manager (and so the server) alive


class Checkpointer:
    def __init__(self, cfg, groups, weights_only: bool = False) -> None:
        """``weights_only`` (``--eval-only``): every load reads the model alone (no optimizer, scheduler or data
        position, so no schedule check) and keeps the checkpoint's iteration for the report."""
        self.cfg, self.groups = cfg, groups
        self.weights_only = weights_only
        self.ckpt = cfg.checkpoint
        self._async_queue = None
        self.before_commit = None  # test seam: called on every rank after shards are written
        self._hf = CheckpointHF(cfg) if groups.rank == 0 else None
        self._model_dtype = None  # the parameters' dtype, for the checkpoint's config.json (set by save)
        self._need = 0  # bytes of the last save (an async one's failure surfaces later, in poll/finalize)
        self._readers = ExitStack()  # rank 0's read lock on another run's checkpoint while it is loaded
        self.loaded_from: str | None = None  # the checkpoint directory load() read, if any

    # ------------------------------------------------------------------ save
    def write_run_config(self) -> str:
        """``<checkpoint.save>/config.yaml``: the resolved config of this start, every field with its value
        (defaults included; ``bft-megatron train --config`` reads it back). Rewritten at every start; each
        checkpoint also keeps the config it was saved with in its metadata. Global rank 0 only."""
        import yaml

        from bft_megatron.utils.files import atomic_write_text

        os.makedirs(self.ckpt.save, exist_ok=True)
        path = os.path.join(self.ckpt.save, "config.yaml")
        atomic_write_text(path, yaml.safe_dump(to_dict(self.cfg), sort_keys=False))
        return path

    def _state_for_save(self, trainer) -> dict:
        init_optimizer_state(trainer.optimizer)  # no-op after the first step; needed to save at step 0
        gather_params(trainer.model)  # overlap_param_gather: else the other ranks' shards are one step old
        model_sd = model_sharded_state_dict(trainer.model)
        sd = dict(model_sd)
        # Pass the nested per-chunk dicts: megatron maps parameters through their values, and the chunks'
        # local keys (decoder.layers.0...) collide, so merging them would lose parameters under VP.
        sd["optimizer"] = trainer.optimizer.sharded_state_dict(
            model_sd, is_loading=False, metadata=optimizer_metadata(self.ckpt.optimizer_format))
        sd["rng_state"] = rng_sharded_object(self.groups)
        sd["scheduler"] = trainer.scheduler.state_dict()
        s = trainer.state
        sd["train_state"] = {"iteration": s.iteration, "consumed_rows": s.consumed_rows,
                             "skipped_steps": s.skipped_steps, "consecutive_skips": s.consecutive_skips,
                             "train_rows": trainer.train_data.sampler.num_rows}  # the resume's row-order check
        sd["layout"] = layout_of(self.groups)
        sd["config"] = to_dict(self.cfg)
        return sd

    def save(self, trainer) -> str:
        from megatron.core import dist_checkpointing

        run_dir = self.ckpt.save
        iteration = trainer.state.iteration
        path = os.path.join(run_dir, pointer.iter_dirname(iteration))
        self.finalize()  # at most one save in flight
        complete = rank0_value(lambda: pointer.read_latest(run_dir) == path, "reading latest", self.groups.control)
        if complete:  # already complete (e.g. a finished run started again)
            _log.info("checkpoint %s is already complete; not rewriting it", path)
            return path
        if self.groups.rank == 0:
            if os.path.isdir(path):  # a stale, uncommitted save of this iteration (crash): start clean; renamed
                shutil.rmtree(moved_aside(path))  # aside first, so that a reader sees it gone, not half deleted
            os.makedirs(path, exist_ok=True)
        dist.barrier()
        self._model_dtype = next(unwrap(trainer.model[0]).parameters()).dtype
        sd = self._state_for_save(trainer)
        self._need = self._check_space(sd)
        _shield_mcore_results_queue()
        with explain_failed_save(run_dir, self._need):
            request = dist_checkpointing.save(sd, path, sharded_strategy=self._save_strategy(),
                                              async_sharded_save=self.ckpt.async_save, **_mcore_async_kwargs())
            if self.ckpt.async_save:
                request.add_finalize_fn(lambda: self._commit(iteration))
                self._queue().schedule_async_request(request)
                _log.info("checkpoint %s: async save started", path)
            else:
                self._commit(iteration)
        return path

    def _check_space(self, sd: dict) -> int:
        """The checkpoint's size in bytes (a collective), and on rank 0 a warning if its filesystem has less free
        space (``disk_space.py``: a full disk fails the save with an error that does not say so)."""
        need = checkpoint_bytes(sd, self.groups.control)
        if self.groups.rank == 0:
            warning = space_warning(f"checkpoint.save={self.ckpt.save}", need, free_bytes(self.ckpt.save),
                                    keep_last_advice(self.ckpt.keep_last))
            if warning:
                _log.warning("%s", warning)
        return need

    def _save_strategy(self):
        """torch_dist; with ``checkpoint.fully_parallel_save`` (and more than one replica) spread over the DP x CP
        group: a shard every replica holds is written by one of them, chosen to balance the bytes per rank, instead
        of always by the first. Every replica holds the weights and, with the fully_reshardable optimizer format
        (all-gathered over DP before a save), the whole optimizer state of its TP/PP shard; with dp_reshardable each
        rank writes its own optimizer shard."""
        from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
        from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

        strategy = get_default_save_sharded_strategy("torch_dist")
        if self.ckpt.fully_parallel_save and self.groups.dp_cp_size > 1:
            strategy = FullyParallelSaveStrategyWrapper(strategy, self.groups.dp_cp)
        return strategy

    def _load_strategy(self, path: str):
        """None (megatron's default for the checkpoint), or with ``checkpoint.fully_parallel_load`` the same
        spread over the DP x CP group: each replica reads a part and the parts are exchanged."""
        if not (self.ckpt.fully_parallel_load and self.groups.dp_cp_size > 1):
            return None
        from megatron.core.dist_checkpointing.serialization import get_default_load_sharded_strategy
        from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelLoadStrategyWrapper

        return FullyParallelLoadStrategyWrapper(get_default_load_sharded_strategy(path), self.groups.dp_cp)

    def _commit(self, iteration: int) -> None:
        if self.before_commit is not None:
            self.before_commit(iteration)
        dist.barrier()
        if self.groups.rank == 0:
            # Into the checkpoint before `latest` names it (a kill here leaves it uncommitted, as a kill during
            # the shards would); its failure is only a warning: the weights, all written, make it complete.
            self._hf.write(os.path.join(self.ckpt.save, pointer.iter_dirname(iteration)), self._model_dtype)
            removed = pointer.commit(self.ckpt.save, iteration, self.ckpt.keep_last)
            _log.info("checkpoint iter %d complete (%s; latest updated%s)", iteration, size_text(self._need),
                      f"; pruned {removed}" if removed else "")
        dist.barrier()

    def _queue(self):
        if self._async_queue is None:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self._async_queue = AsyncCallsQueue()
        return self._async_queue

    def poll(self) -> None:
        """Commit an async save whose shards are all written (collective, non-blocking; call every step).

        Without it a finished async save would only be committed at the next save, so a crash in between
        would fall back a whole save interval although the shards were on disk.
        """
        if self._async_queue is not None:
            with explain_failed_save(self.ckpt.save, self._need):
                self._async_queue.maybe_finalize_async_calls(blocking=False)

    def finalize(self) -> None:
        """Block until an in-flight async save is written and committed."""
        if self._async_queue is not None:
            with explain_failed_save(self.ckpt.save, self._need):
                self._async_queue.maybe_finalize_async_calls(blocking=True)

    # ------------------------------------------------------------------ load
    def load(self, trainer) -> bool:
        """Resume or load into ``trainer``; returns False when there is nothing to load.

        A complete checkpoint in ``checkpoint.save`` wins (a restarted or requeued job resumes its own run,
        fully, even when ``checkpoint.load`` names a pretrained checkpoint to fine-tune from); otherwise
        ``checkpoint.load`` (weights only with ``finetune``). Global rank 0 decides, for every rank (``rank0_value``).
        """
        kind, path = rank0_value(self._source, "finding the checkpoint to load", self.groups.control)
        if kind == "none":
            return False
        try:
            finetune = self.weights_only or (kind == "load" and self.ckpt.finetune)
            self._load_path(trainer, path, finetune=finetune, own=kind == "own" and not self.weights_only)
            self.loaded_from = path
            if kind == "load":
                dist.barrier()  # every rank has read its files: rank 0 may let the checkpoint be pruned
        finally:
            self._readers.close()
        return True

    def _source(self) -> tuple[str, str | None]:
        """("own", the save directory's latest), ("load", checkpoint.load resolved) or ("none", None)."""
        own = pointer.read_latest(self.ckpt.save) if self.ckpt.save else None
        if own is not None:
            pointer.require_loadable("checkpoint.save", self.ckpt.save, own)
            self._say_load_is_not_read(own)
            return "own", own
        unreferenced = pointer.unreferenced_problem(self.ckpt.save, self.ckpt.load)
        if unreferenced:
            raise ConfigError(unreferenced)
        if not self.ckpt.load:
            return "none", None
        path = pointer.resolve_load_dir(self.ckpt.load)
        if path is None:
            # Only the run's own save directory may be empty (its first run); anything else is a wrong path,
            # and training from scratch instead of from it would waste the whole job.
            if self.ckpt.finetune or not loads_own_save_dir(self.ckpt):
                raise ConfigError(
                    f"checkpoint.load={self.ckpt.load}: no complete checkpoint there (no 'latest' pointer and not an "
                    f"iter_ directory){' to fine-tune from' if self.ckpt.finetune else ''}; point it at a run "
                    "directory or one of its iter_ directories, or unset it to train from scratch")
            _log.info("checkpoint.load=%s (this run's checkpoint.save): no complete checkpoint yet, starting from "
                      "scratch", self.ckpt.load)
            return "none", None
        pointer.require_loadable("checkpoint.load", self.ckpt.load, path)
        try:  # another run may be saving there with keep_last: it leaves this checkpoint until all ranks read it
            self._readers.enter_context(reading(path))
        except CheckpointRemoved as exc:
            raise ConfigError(f"checkpoint.load={self.ckpt.load}: {exc} before it could be loaded (a run still "
                              "saving there prunes its older checkpoints, checkpoint.keep_last); start again to load "
                              "its newest one") from None
        return "load", path

    def _say_load_is_not_read(self, own: str) -> None:
        """Log that ``checkpoint.load`` is not read because the run's own ``latest`` (``own``) wins; a warning where
        it names another checkpoint of the same run directory (an attempt to go back to it)."""
        target = pointer.resolve_load_dir(self.ckpt.load) if self.ckpt.load else None
        if target is None or os.path.realpath(target) == os.path.realpath(own):
            return
        if not pointer.in_run_dir(target, self.ckpt.save):
            _log.info("checkpoint.load=%s is not read: resuming this run's own checkpoint %s (checkpoint.save's "
                      "'latest' always wins, so a requeued job goes on)", self.ckpt.load, own)
            return
        _log.warning("checkpoint.load=%s is not read: checkpoint.save's 'latest' names %s, and a run's own latest "
                     "checkpoint always wins (a requeued job goes on from it). To go back to %s, write its name "
                     "into %s (the newer checkpoints are then removed as the run passes them)", self.ckpt.load,
                     os.path.basename(own), os.path.basename(target), os.path.join(self.ckpt.save, pointer.LATEST))

    def _load_path(self, trainer, path: str, finetune: bool, own: bool = False) -> None:
        from megatron.core import dist_checkpointing

        common = dist_checkpointing.load_common_state_dict(path)
        same_layout = common.get("layout") == layout_of(self.groups)
        # First, on every rank: a model, schedule or optimizer format the config cannot load fails before any
        # tensor is loaded (the pre-flight ran the same checks before the model was built).
        check_loadable(common, self.cfg, path, finetune=finetune, own=own, layout=layout_of(self.groups),
                       scheduler=trainer.scheduler if not finetune else None, rank=self.groups.rank)
        if finetune:
            self._load_weights(trainer, path)  # fresh optimizer and scheduler: the config's schedule from step 0
            if self.weights_only:  # an evaluation reports the step the weights are from
                trainer.state.iteration = int((common.get("train_state") or {}).get("iteration", 0))
        else:
            warn_data_order(common, self.cfg.data.seed, trainer.train_data.sampler.num_rows, path, self.groups.rank)
            self._load_full(trainer, path, common, same_layout)
            if self._hf is not None:  # the same run goes on: its checkpoints keep the resumed one's HF files
                self._hf.resume(path, common.get("config") or {})
        _log.info("loaded %s (%s%s)", path, "weights only" if finetune else "full state",
                  "" if same_layout else f", resharded from {common.get('layout')}")

    def _load_weights(self, trainer, path: str) -> None:
        load_model_weights(trainer.model, path, self._load_strategy(path))
        trainer.optimizer.reload_model_params()

    def _apply_model(self, trainer, loaded: dict) -> None:
        if len(trainer.model) == 1:
            unwrap(trainer.model[0]).load_state_dict(loaded["model"])
        else:
            for i, chunk in enumerate(trainer.model):
                unwrap(chunk).load_state_dict(loaded[f"model{i}"])

    def _load_full(self, trainer, path: str, common: dict, same_layout: bool) -> None:
        from megatron.core import dist_checkpointing

        init_optimizer_state(trainer.optimizer)
        model_sd = model_sharded_state_dict(trainer.model)
        request = dict(model_sd)
        request["optimizer"] = trainer.optimizer.sharded_state_dict(
            model_sd, is_loading=True, metadata=optimizer_metadata(saved_optimizer_format(common)))
        if same_layout:
            request["rng_state"] = rng_sharded_object(self.groups)
        loaded = dist_checkpointing.load(request, path, sharded_strategy=self._load_strategy(path))
        self._apply_model(trainer, loaded)
        bounds = group_bounds(trainer.optimizer)
        align_saved_group_bounds(trainer.optimizer, loaded["optimizer"])  # megatron-core 0.19 matches groups by them
        with tolerate_missing_adam_step(trainer.optimizer):
            trainer.optimizer.load_state_dict(loaded["optimizer"])
        restore_group_bounds(trainer.optimizer, bounds)  # the config's max_lr/min_lr, not the checkpoint's
        cloned = untie_adam_steps(trainer.optimizer)
        if cloned:
            _log.debug("resume: gave %d parameters their own Adam step counter", cloned)
        # Built with megatron's override flag = checkpoint.override_scheduler (else the values must match, as
        # checked first): the step count comes from the checkpoint, the schedule from the config.
        trainer.scheduler.load_state_dict(common["scheduler"])
        ts = common["train_state"]
        trainer.state.iteration = int(ts["iteration"])
        trainer.state.consumed_rows = int(ts["consumed_rows"])
        trainer.state.skipped_steps = int(ts.get("skipped_steps", 0))
        trainer.state.consecutive_skips = int(ts.get("consecutive_skips", 0))
        trainer.train_data.consumed_rows = trainer.state.consumed_rows
        if same_layout:
            restore_rng(loaded["rng_state"])
        torch.distributed.barrier()
