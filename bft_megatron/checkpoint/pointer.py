"""Checkpoint directory layout and the atomic ``latest`` pointer.

``<save>/iter_0000042/`` holds one megatron dist checkpoint (torch_dist). ``<save>/latest`` is a
one-line text file naming the newest *complete* checkpoint; it is written to a temporary file,
fsynced and renamed over the old one (atomic on POSIX) only after every rank finished writing. A
crash or kill during a save therefore leaves ``latest`` at the previous complete checkpoint; a resume
ignores the half-written ``iter_`` directory. :func:`commit` later removes it: every ``iter_``
directory newer than the previous ``latest`` and older than the checkpoint being committed was never
committed (nothing else is in flight then), so it is deleted and not counted toward ``keep_last``.
A leftover newer than the committed checkpoint stays until a later commit passes it, or is replaced
when a save reaches the same iteration. Directories at or below the previous ``latest`` carry no
marker of completeness, so all of them count as complete (and are pruned by age only); without a
previous ``latest`` (first commit into the directory) nothing is taken for a leftover either: every
directory below the committed one counts as complete.
"""

from __future__ import annotations

import os
import re

from bft_megatron.checkpoint.read_lock import remove_pruning_leftovers, remove_unless_read
from bft_megatron.utils.files import atomic_write_text
from bft_megatron.utils.locks import holder_text
from bft_megatron.utils.logging import get_logger

__all__ = ["iter_dirname", "read_latest", "write_latest", "resolve_load_dir", "load_problem", "require_loadable",
           "list_iterations", "unreferenced_problem", "in_run_dir", "prune", "commit", "existing_checkpoint",
           "HF_SUBDIR"]

LATEST = "latest"
# HF files (config.json, tokenizer, chat template) beside the weights: in an import's run directory, and in each
# trainer checkpoint's iter_ directory.
HF_SUBDIR = "hf"
# Where megatron-core <= 0.18's torch_dist save writes rank 0's common state (config, iteration) beside metadata.json;
# without it megatron's load_common_state_dict fails with an AttributeError on a str path (megatron-core 0.16).
# megatron-core 0.19 keeps it inside the torch_dist checkpoint instead, as the ShardedObject "common_state".
_COMMON = "common.pt"
_COMMON_OBJECT = "common_state/"
_ITER_RE = re.compile(r"^iter_(\d{7,})$")
_log = get_logger(__name__)


def iter_dirname(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def read_latest(run_dir: str) -> str | None:
    """Absolute path of the checkpoint ``latest`` names, or None if there is none."""
    path = os.path.join(run_dir, LATEST)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as fh:
        name = fh.read().strip()
    return os.path.join(run_dir, name) if name else None


def write_latest(run_dir: str, iteration: int) -> None:
    """Atomically point ``latest`` at ``iter_<iteration>`` (call on one rank, after all ranks saved)."""
    atomic_write_text(os.path.join(run_dir, LATEST), iter_dirname(iteration) + "\n")


def resolve_load_dir(path: str) -> str | None:
    """``checkpoint.load`` may name a run directory (use its ``latest``) or one ``iter_`` directory."""
    if _ITER_RE.match(os.path.basename(os.path.normpath(path))):
        return path if os.path.isdir(path) else None
    return read_latest(path)


def load_problem(field: str, value: str, path: str) -> str | None:
    """Why ``path`` (what ``field=value`` resolved to: its ``latest``'s target, or the ``iter_`` directory it
    names) cannot be loaded, as a config error's message naming the field; None if it is a megatron checkpoint.
    Without this a ``latest`` left pointing at a deleted or never-finished directory failed the run only after
    its data preparation, with megatron's traceback (exit 1: a crash to SLURM's requeue, not a config error)."""
    if not os.path.exists(path):
        why = "does not exist"
    elif not os.path.isdir(path):
        why = "is not a directory"
    elif not _complete(path):
        why = (f"holds no megatron checkpoint (no readable metadata.json or no common state, {_COMMON} or the "
               "torch_dist checkpoint's common_state: empty, or a save that never finished)")
    else:
        return None
    if os.path.normpath(path) == os.path.normpath(value):
        return f"{field}={value} {why}; point it at a run directory or a complete iter_ directory"
    name = os.path.basename(os.path.normpath(path))  # a latest written by hand may end in "/"
    complete = [d for d in map(iter_dirname, list_iterations(value))
                if load_problem(field, os.path.join(value, d), os.path.join(value, d)) is None]
    return (f"{field}={value}: its '{LATEST}' names {name}, which {why}; point '{LATEST}' at a "
            f"complete iter_ directory there ({', '.join(complete[-3:]) or 'there is none'}), or remove it to start "
            "without this checkpoint")


def unreferenced_problem(save: str, load: str | None) -> str | None:
    """Why a run cannot save into ``save`` (``checkpoint.save``): it has no ``latest`` but holds complete ``iter_``
    directories (copied without ``latest``, or a first save killed between its last shard and its commit), and
    ``load`` (``checkpoint.load``) does not name one of them. Such a run started from scratch (logging "no complete
    checkpoint yet") and then overwrote them (a save of the same iteration) or pruned them (``keep_last``)."""
    if not save or os.path.lexists(os.path.join(save, LATEST)):
        return None
    names = [n for n in map(iter_dirname, list_iterations(save)) if _complete(os.path.join(save, n))]
    target = resolve_load_dir(load) if load else None
    if not names or (target and in_run_dir(target, save)):
        return None
    return (f"checkpoint.save={save} holds {len(names)} complete checkpoint{'s' if len(names) > 1 else ''} "
            f"({', '.join(names[-3:])}) but no '{LATEST}' pointer (copied without it, or a first save killed between "
            "its last shard and its commit); a run saving there would start from scratch and overwrite or prune "
            f"{'them' if len(names) > 1 else 'it'}. Resume with checkpoint.load={os.path.join(save, names[-1])}, "
            "or move them away (or set another checkpoint.save) to start without them")


def in_run_dir(ckpt_dir: str, run_dir: str) -> bool:
    """Whether the checkpoint directory ``ckpt_dir`` (an ``iter_`` directory) is one of ``run_dir``'s."""
    return os.path.realpath(os.path.dirname(os.path.normpath(ckpt_dir))) == os.path.realpath(run_dir)


def _complete(path: str) -> bool:
    return _readable_marker(path) and _has_common_state(path)


def _has_common_state(path: str) -> bool:
    """The checkpoint's common state is there: ``common.pt`` (megatron-core <= 0.18), or in the torch_dist metadata
    (0.19: ``.metadata``, which torch's distributed checkpoint writes last, lists the ``common_state`` object)."""
    if os.path.isfile(os.path.join(path, _COMMON)):
        return True
    from torch.distributed.checkpoint import FileSystemReader

    try:
        keys = FileSystemReader(path).read_metadata().state_dict_metadata
    except Exception:  # noqa: BLE001 - a missing, cut or foreign .metadata (pickle) means: not a complete checkpoint
        return False
    return any(key.startswith(_COMMON_OBJECT) for key in keys)


def require_loadable(field: str, value: str, path: str) -> None:
    """Raise :class:`ConfigError` with :func:`load_problem`'s message if ``path`` cannot be loaded."""
    from bft_megatron.config.base import ConfigError

    problem = load_problem(field, value, path)
    if problem:
        raise ConfigError(problem)


def _readable_marker(path: str) -> bool:
    """megatron's metadata.json is there and parses (corrupt or unreadable: False, not an exception)."""
    from megatron.core.dist_checkpointing.core import check_is_distributed_checkpoint

    try:
        return check_is_distributed_checkpoint(path)
    except (OSError, ValueError, TypeError):  # JSONDecodeError is a ValueError
        return False


def list_iterations(run_dir: str) -> list[int]:
    if not os.path.isdir(run_dir):
        return []
    return sorted(int(m.group(1)) for m in map(_ITER_RE.match, os.listdir(run_dir)) if m)


def existing_checkpoint(run_dir: str) -> str | None:
    """What in ``run_dir`` marks it as a checkpoint directory already (``latest`` and its target, or an ``iter_``
    directory), for a refusal message; None when it holds neither (or does not exist)."""
    names = [iter_dirname(i) for i in list_iterations(run_dir)]
    dirs = f"{len(names)} iter_ director{'y' if len(names) == 1 else 'ies'} ({', '.join(names[-3:])})"
    if os.path.isfile(os.path.join(run_dir, LATEST)):
        target = read_latest(run_dir)
        return f"a '{LATEST}' pointer to {os.path.basename(target) if target else 'nothing'}" + (
            f" and {dirs}" if names else "")
    if names:
        return f"{dirs} but no '{LATEST}' pointer (an unfinished save or import)"
    return None


def latest_iteration(run_dir: str) -> int | None:
    """The iteration ``latest`` names, or None when there is no (well-formed) ``latest``."""
    path = read_latest(run_dir)
    m = _ITER_RE.match(os.path.basename(path)) if path else None
    return int(m.group(1)) if m else None


def _remove(run_dir: str, iterations: list[int], later: bool = True) -> list[int]:
    """Delete these ``iter_`` directories but those another job is reading (:mod:`.read_lock`); returns the deleted
    iterations. ``later``: whether a later commit prunes a kept one (by age, with ``keep_last``)."""
    removed = []
    for i in iterations:
        reader = remove_unless_read(os.path.join(run_dir, iter_dirname(i)))
        if reader is None:
            removed.append(i)
        else:
            then = "a later save removes it" if later else "an uncommitted save: remove it once it is no longer read"
            _log.warning("%s is not pruned yet: another job is reading it (%s); %s",
                         os.path.join(run_dir, iter_dirname(i)), holder_text(reader), then)
    return removed


def prune(run_dir: str, keep_last: int | None, current: int) -> list[int]:
    """Remove all but the newest ``keep_last`` ``iter_`` directories at or below ``current``.

    Every such directory is taken as complete (:func:`commit` removes uncommitted ones first);
    ``current`` is always kept, and directories newer than ``current`` are left alone. Returns the
    removed iterations.
    """
    its = [i for i in list_iterations(run_dir) if i <= current]
    keep = set(its[-keep_last:]) if keep_last else set(its)
    keep.add(current)
    return _remove(run_dir, [i for i in its if i not in keep])


def commit(run_dir: str, iteration: int, keep_last: int | None) -> list[int]:
    """Make ``iter_<iteration>`` the ``latest`` checkpoint and clean up; returns the removed iterations.

    Call on one rank, after every rank finished writing ``iteration`` and with no other save in
    flight. First deletes the uncommitted leftovers strictly between the previous ``latest`` and
    ``iteration`` (a save killed before its commit; none when there is no previous ``latest``), then
    moves ``latest``, then prunes to ``keep_last`` (:func:`prune`). A crash between the steps leaves
    ``latest`` on a complete checkpoint.
    """
    remove_pruning_leftovers(run_dir)
    previous = latest_iteration(run_dir)
    stale = [] if previous is None else [i for i in list_iterations(run_dir) if previous < i < iteration]
    removed = _remove(run_dir, stale, later=bool(keep_last))  # without keep_last nothing is pruned by age
    write_latest(run_dir, iteration)
    return sorted(removed + prune(run_dir, keep_last, iteration))
