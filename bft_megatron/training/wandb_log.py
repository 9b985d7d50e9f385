"""Weights & Biases logging (``logging.wandb_project``): the TensorBoard scalars, also sent to a W&B run.

Global rank 0 only, as TensorBoard. The run's id is kept in ``<checkpoint.save>/wandb_run_id``, so a resumed or
requeued job (``launch/slurm.sbatch``) continues the same W&B run (online; offline, each start writes an
``offline-run-*`` directory of its own under that id). Every point carries ``iteration``, which W&B plots
``train/*`` and ``valid/*`` against: W&B's own step counter only grows, so the steps a resume repeats (those after
its checkpoint) are logged again instead of being dropped. Compute nodes without internet: ``WANDB_MODE=offline``
(W&B's own switch), then ``wandb sync <wandb_dir>/wandb/offline-run-*``.
"""

from __future__ import annotations

import os
import uuid

from bft_megatron.config.base import to_dict
from bft_megatron.config.schema import Config
from bft_megatron.utils.files import atomic_write_text
from bft_megatron.utils.logging import get_logger

__all__ = ["WandbLog", "RUN_ID_FILE", "wandb_dir"]

RUN_ID_FILE = "wandb_run_id"

_log = get_logger(__name__)


def wandb_dir(cfg: Config) -> str | None:
    """The directory W&B writes its ``wandb/`` folder into: ``logging.wandb_dir``, else ``checkpoint.save`` (so
    ``<checkpoint.save>/wandb/``), else W&B's default (the working directory)."""
    return cfg.logging.wandb_dir or cfg.checkpoint.save or None


def _run_id(save_dir: str | None) -> str:
    """The id of this checkpoint directory's W&B run (made and kept at its first start); a new one without it."""
    if not save_dir:
        return uuid.uuid4().hex[:12]
    path = os.path.join(save_dir, RUN_ID_FILE)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            kept = fh.read().strip()
        if kept:
            return kept
    run_id = uuid.uuid4().hex[:12]
    os.makedirs(save_dir, exist_ok=True)
    atomic_write_text(path, run_id + "\n")
    return run_id


class WandbLog:
    """One W&B run per checkpoint directory; ``log`` takes the finite scalars TensorBoard gets."""

    def __init__(self, cfg: Config) -> None:
        import wandb

        lc, save = cfg.logging, cfg.checkpoint.save
        directory = wandb_dir(cfg)
        if directory:
            os.makedirs(directory, exist_ok=True)
        # runs/llama3.1_8b/ckpt -> "llama3.1_8b/ckpt": the recipes' save directories are all named ckpt
        name = lc.wandb_run_name or ("/".join(os.path.abspath(save).split(os.sep)[-2:]) if save else None)
        self.run = wandb.init(project=lc.wandb_project, entity=lc.wandb_entity, name=name, dir=directory,
                              id=_run_id(save), resume="allow", config=to_dict(cfg))
        self.run.define_metric("iteration")
        for prefix in ("train", "valid"):
            self.run.define_metric(f"{prefix}/*", step_metric="iteration")

    def log(self, iteration: int, scalars: dict[str, float]) -> None:
        self._call("log", {"iteration": iteration, **scalars})

    def close(self) -> None:
        self._call("finish")

    def _call(self, method: str, *args) -> None:
        """Best effort: W&B's service process (its own session, so torchrun's killpg misses it) dies on a SIGTERM
        sent to every process of a SLURM step (scancel, preemption, the time limit); the next call then raised on
        rank 0 in the very step that asked for the exit save, leaving the other ranks waiting. One warning, then
        no more W&B for this run; TensorBoard and the save go on."""
        if self.run is None:
            return
        try:
            getattr(self.run, method)(*args)
        except Exception as exc:  # noqa: BLE001 - logging must never end the run
            _log.warning("W&B %s failed (%s: %s); no more W&B logging in this run", method, type(exc).__name__, exc)
            self.run = None
