"""Inputs a run reads from disk, checked before any process group exists (``--check`` and real runs; not
``--dry-run`` / ``plan``, which plan recipes whose placeholder paths do not exist): data sources, the tokenizer,
prepared data, log directories, and the checkpoint to resume or fine-tune from."""

from __future__ import annotations

import os

from bft_megatron.config.base import ConfigError
from bft_megatron.config.schema import Config
from bft_megatron.utils.files import not_a_directory

__all__ = ["check_paths", "loads_own_save_dir", "no_train_split"]


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _data_path_problems(d) -> list[str]:
    """Local ``data.train`` / ``data.valid`` sources (a name that may be a hub dataset id is left to the data layer,
    which loads it), the tokenizer (always local), and prepared data when no sources are listed: every problem."""
    from bft_megatron.data.errors import DataError
    from bft_megatron.data.readers import local_source_problem
    from bft_megatron.data.storage import is_prepared
    from bft_megatron.data.tokenizer import check_tokenizer_path

    problems = []
    for split in ("train", "valid"):
        for i, src in enumerate(getattr(d, split)):
            why = local_source_problem(src.path, src.split)
            if why is not None:
                problems.append(f"data.{split}[{i}].path={src.path}: {why} (relative paths are taken from "
                                f"{os.getcwd()})")
    if d.tokenizer:
        try:
            check_tokenizer_path(d.tokenizer)
        except DataError as err:  # "data.tokenizer='...': no such file or directory; ..."
            problems.append(f"data.{err}")
    if d.output_dir and not d.train and not is_prepared(os.path.join(d.output_dir, "train")):
        problems.append(no_train_split(d))
    return problems


def no_train_split(d) -> str:
    """Why ``data.output_dir`` cannot be trained on: no prepared train split, and no ``data.train`` sources."""
    valid = (f"; data.valid's {len(d.valid)} source(s) alone are for evaluation (bft-megatron train --eval-only), "
             "not for training" if d.valid else "")
    return (f"data.output_dir={d.output_dir}: no prepared train split (run bft-megatron prepare, or list data.train "
            f"sources){valid}")


def check_paths(cfg: Config, data: bool = True, contents: bool = True, weights_only: bool = False) -> None:
    """Inputs that must exist on disk for a run (``--check`` and real runs; not ``--dry-run`` / ``plan``,
    which plan recipes whose paths are placeholders): raises :class:`ConfigError` naming the field.

    ``data=False`` (real runs, on every rank): only the checkpoint, which every node must see anyway. The data
    sources and tokenizer may live on global rank 0's node alone (it prepares; docs/data.md), and a rank that
    exits before the rendezvous would leave the others waiting; the trainer's rank-0 preparation reports them
    (exit 2 on every rank) instead. ``--check`` (the SLURM pre-flight, on the first node) checks both.

    ``contents=False`` (real runs, every rank but global rank 0): what ``latest`` names and the checkpoint's
    common state are not judged. A node whose filesystem caches metadata (NFS after a quick requeue) could see an
    older ``latest`` and refuse a checkpoint the load, decided by rank 0 (``Checkpointer.load``), would use.

    Every data path problem is named, and the first checkpoint one (a recipe's placeholder paths all at once, not
    one per ``--check``). ``weights_only`` (``--eval-only``): any checkpoint is judged as a weights-only load (its
    model, not the schedule or optimizer format)."""
    problems = _data_path_problems(cfg.data) if data else []
    try:
        _check_output_and_checkpoint_paths(cfg, contents, weights_only)
    except ConfigError as exc:
        problems.append(str(exc))
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(f"{len(problems)} problems:\n  " + "\n  ".join(problems))


def _check_output_and_checkpoint_paths(cfg: Config, contents: bool, weights_only: bool = False) -> None:
    c = cfg.checkpoint
    from bft_megatron.checkpoint.pointer import read_latest, resolve_load_dir, unreferenced_problem

    # Else the run trains to its first save and dies there with NotADirectoryError, its steps lost (and a
    # TensorBoard directory that is a file fails the start with a FileExistsError traceback).
    logs = (("logging.tensorboard_dir", cfg.logging.tensorboard_dir),
            ("logging.wandb_dir", cfg.logging.wandb_dir if cfg.logging.wandb_project else None))
    for name, directory in (("checkpoint.save", c.save), *logs):
        problem = not_a_directory(directory)
        _require(problem is None, f"{name}={problem}")

    own = read_latest(c.save) if c.save else None  # a complete checkpoint there: checkpoint.load is not read
    if own is not None:
        if contents:
            _check_against_checkpoint(cfg, ("checkpoint.save", c.save), own, finetune=weights_only,
                                      own=not weights_only)
        return
    if contents:
        unreferenced = unreferenced_problem(c.save, c.load)
        _require(unreferenced is None, unreferenced)
    if not c.load or (loads_own_save_dir(c) and not c.finetune):
        return
    why = ("checkpoint.finetune=true starts from it" if c.finetune else
           "a full resume reads it; unset checkpoint.load to train from scratch")
    _require(os.path.exists(c.load), f"checkpoint.load={c.load} does not exist ({why})")
    hf = os.path.isfile(os.path.join(c.load, "config.json"))  # the HF model itself, not its import
    hint = (f"; it holds an HF config.json: import the model first (bft-megatron convert import --hf {c.load} "
            "--out DIR) and load DIR" if hf else "")
    path = resolve_load_dir(c.load)
    _require(path is not None,
             f"checkpoint.load={c.load}: no complete checkpoint there (no 'latest' pointer and not an iter_ "
             f"directory; {why}){hint}")
    if contents:
        _check_against_checkpoint(cfg, ("checkpoint.load", c.load), path, finetune=c.finetune or weights_only,
                                  own=False)


def _check_against_checkpoint(cfg: Config, named_by: tuple[str, str], path: str, finetune: bool, own: bool) -> None:
    """The load's own checks on ``path`` (what the field and value ``named_by`` resolved to): that it is a
    checkpoint (``pointer.require_loadable``), then ``checkpoint/compat.py`` (an import as the run's save directory,
    the model, and for a full resume the learning-rate schedule and the optimizer format at this layout), here
    before the job builds its model or prepares its data; the load would refuse the same config only then."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException

    from bft_megatron.checkpoint.compat import check_loadable, config_scheduler
    from bft_megatron.checkpoint.pointer import require_loadable

    require_loadable(*named_by, path)

    try:
        common = dist_checkpointing.load_common_state_dict(path)
    except (CheckpointingException, OSError):  # unreadable here: the load itself reports it, with the details
        return
    p = cfg.parallel
    layout = {"tp": p.tp, "pp": p.pp, "vp": p.vp if p.vp and p.vp > 1 else None, "cp": p.cp}  # vp 1 is saved as None
    check_loadable(common, cfg, path, finetune=finetune, own=own, layout=layout,
                   scheduler=None if finetune else config_scheduler(cfg), rank=-1)


def loads_own_save_dir(c) -> bool:
    """``checkpoint.load`` names this run's own ``checkpoint.save`` (Megatron-LM's ``--load X --save X``): on the
    first run it holds nothing yet, which is not an error."""
    return bool(c.load and c.save) and os.path.realpath(c.load) == os.path.realpath(c.save)
