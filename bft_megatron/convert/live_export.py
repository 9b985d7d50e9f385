"""Export in-memory (TP/PP-sharded) megatron model chunks to an HF directory, from inside a job.

For the trainer's ``export_hf: true``: call :func:`export_to_hf` on every rank after the last step.
Global rank 0 first checks the template config.json and the tokenizer and writes config.json,
generation_config.json and the tokenizer files into a hidden staging sibling of ``out_dir`` (a
failure there raises on every rank before any shard is written). Each pipeline stage then writes its
own shards there (no pipeline traffic): on the ranks with data-parallel and context-parallel rank 0,
every parameter is all-gathered over the tensor-parallel group one at a time and tensor-parallel
rank 0 writes it. Global rank 0 names the shards, writes the index and moves the complete export to
``out_dir``, which must be on a filesystem that every writing rank and rank 0 see (it is on one node).

Host memory per writing rank: one gathered parameter plus one shard buffer (``max_shard_bytes``).
With ``overlap_param_gather`` megatron leaves the last step's parameter all-gather to the next forward:
:func:`export_to_hf` finishes it first (``gather_params``), else the other DP ranks' shards would be
exported one step old.

No progress bar here (unlike the offline converters): tqdm on many ranks would interleave in the job's log, and
rank 0's bar would show one stage only. Rank 0 logs a line when the writing starts and one per pipeline stage
with the bytes it wrote.
"""

from __future__ import annotations

import os
import shutil

import torch
import torch.distributed as dist

from bft_megatron.checkpoint import pointer
from bft_megatron.checkpoint.state import gather_params, unwrap
from bft_megatron.config.base import to_dict
from bft_megatron.config.schema import Config, ModelConfig
from bft_megatron.convert.hf_config import write_hf_metadata
from bft_megatron.convert.hf_io import (DEFAULT_SHARD_BYTES, INDEX, ShardWriter, begin_staging, finalize_shards,
                                        publish_staging, staging_path)
from bft_megatron.convert.mapping import (FUSED_FAMILIES, OUTPUT, SANDWICH_FAMILIES, detect_spec,
                                         rule_by_megatron_name)
from bft_megatron.convert.sources import TRAINER_HINT, find_sources, stored_hf_dir
from bft_megatron.convert.tensors import cast, to_hf
from bft_megatron.parallel.bootstrap import ParallelGroups
from bft_megatron.parallel.rank0 import on_rank0
from bft_megatron.utils.logging import get_logger

__all__ = ["export_to_hf", "export_after_training", "unwrap"]

_log = get_logger(__name__)
_LAYERS = "decoder.layers."


def _gather_tp(param: torch.Tensor, axis: int | None, groups: ParallelGroups) -> torch.Tensor:
    """Full tensor from the TP shards (``axis`` None: replicated, returned as is)."""
    if axis is None or groups.tp_size == 1:
        return param.detach()
    expected = getattr(param, "partition_dim", axis)
    if getattr(param, "tensor_model_parallel", False) and expected != axis:
        raise ValueError(f"mapping says TP axis {axis} but the parameter is partitioned on axis {expected}")
    shards = [torch.empty_like(param) for _ in range(groups.tp_size)]
    dist.all_gather(shards, param.detach().contiguous(), group=groups.tp)
    return torch.cat(shards, dim=axis)


def _params(model: torch.nn.Module, spec: str, m: ModelConfig):
    """Yield ``(rule, global layer or None, parameter)`` for every parameter of one chunk."""
    fused = m.family in FUSED_FAMILIES  # Phi3: q/k/v and gate/up go out as one HF tensor each
    sandwich = m.family in SANDWICH_FAMILIES  # Gemma3: norms after attention and MLP
    for name, param in model.named_parameters():
        if name.startswith(_LAYERS):
            index, local = name[len(_LAYERS):].split(".", 1)
            layer = model.decoder.layers[int(index)].layer_number - 1  # layer_number is global, 1-based
            yield rule_by_megatron_name(local, spec, m.qkv_bias, m.qk_norm, fused, sandwich), layer, param
            continue
        rule = rule_by_megatron_name(name, spec, m.qkv_bias, m.qk_norm, fused, sandwich)
        if rule is OUTPUT and m.tie_embeddings:
            continue  # the last stage's copy of the tied embedding
        yield rule, None, param


def _write_chunk(model: torch.nn.Module, m: ModelConfig, groups: ParallelGroups, writer: ShardWriter | None,
                 dtype: torch.dtype | None) -> None:
    spec = detect_spec([n for n, _ in model.named_parameters()])
    for rule, layer, param in _params(model, spec, m):
        full = _gather_tp(param, rule.tp_axis, groups)
        if writer is None:
            continue
        for name, tensor in to_hf(rule, full, m, layer, fc1_tp=groups.tp_size):
            writer.add(name, cast(name, tensor, dtype))


def _prepare(model_chunks: list[torch.nn.Module], model_cfg: ModelConfig, out_dir: str, recorded: dict,
             tokenizer_dir: str | None, dtype: torch.dtype | None, group: dist.ProcessGroup,
             checkpoint_hf: str | None = None) -> None:
    """Rank 0 finds the sources, checks them and writes the non-weight files into the staging directory before
    any shard is written; every rank raises together if that failed (no half-entered collectives)."""

    def write_metadata() -> None:
        sources = find_sources(recorded, hf_dir=tokenizer_dir, hint=TRAINER_HINT, stored=checkpoint_hf)
        stage = begin_staging(out_dir)
        out_dtype = dtype or next(unwrap(model_chunks[0]).parameters()).dtype
        write_hf_metadata(stage, model_cfg, out_dtype, sources)

    on_rank0(write_metadata, "HF export (config, tokenizer)", group,
             cleanup=lambda: shutil.rmtree(staging_path(out_dir), ignore_errors=True))


def export_to_hf(model_chunks: list[torch.nn.Module], model_cfg: ModelConfig, out_dir: str, groups: ParallelGroups,
                 tokenizer_dir: str | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                 dtype: torch.dtype | None = None, config: Config | None = None,
                 checkpoint_hf: str | None = None) -> None:
    """Collective over the world: write ``model_chunks`` (this rank's, possibly wrapped) as HF safetensors.

    ``config`` (the training config) names the tokenizer the data was tokenized with (``data.tokenizer``),
    its chat template (``data.template``) and the import the run started from (``checkpoint.load``, whose
    ``hf/`` supplies config.json); ``tokenizer_dir`` (default ``model_cfg.from_hf``) is an HF directory for
    config.json (checked against ``model_cfg``) and a tokenizer if no other is found. ``checkpoint_hf``: the
    ``hf/`` the trainer stored in the checkpoint of these weights, whose tokenizer files and chat template win
    over ``data.tokenizer``'s. ``dtype`` casts (default: the parameters' dtype). Written into a hidden sibling
    of ``out_dir``, moved there when complete.
    """
    recorded = to_dict(config) if config is not None else {"model": {"from_hf": model_cfg.from_hf}}
    _prepare(model_chunks, model_cfg, out_dir, recorded, tokenizer_dir, dtype, groups.control, checkpoint_hf)
    gather_params(model_chunks)  # every rank: a collective, before the DP-rank-0 ranks read whole weights
    stage = staging_path(out_dir)
    _log.info("HF export to %s: each of %d pipeline stage(s) writes its weights", out_dir, groups.pp_size)
    participates = groups.dp_rank == 0 and groups.cp_rank == 0
    manifests: list[dict[str, list[str]]] = []
    total = 0
    if participates:
        for index, chunk in enumerate(model_chunks):
            model = unwrap(chunk)
            writer = ShardWriter(stage, max_shard_bytes, tag=f"{groups.pp_rank:03d}-{index:02d}") \
                if groups.tp_rank == 0 else None
            _write_chunk(model, model_cfg, groups, writer, dtype)
            if writer is not None:
                writer.flush()
                manifests.append(writer.manifest)
                total += writer.total_bytes
    gathered: list = [None] * groups.world_size
    dist.all_gather_object(gathered, (groups.pp_rank, manifests, total))
    if groups.rank == 0:
        writers = sorted((g for g in gathered if g[1]), key=lambda g: g[0])
        for pp_rank, _, nbytes in writers:
            _log.info("HF export: pipeline stage %d wrote %.1f MB", pp_rank, nbytes / 1e6)
        finalize_shards(stage, [mf for g in writers for mf in g[1]], sum(g[2] for g in writers))
        publish_staging(stage, out_dir)
        _log.info("exported the in-memory model to %s", out_dir)
    dist.barrier()


def _exported_already(out_dir: str, groups: ParallelGroups) -> bool:
    """Whether ``out_dir`` holds a complete export (its index: an export is published whole, the index last);
    rank 0 looks and tells every rank, so that all of them skip or none."""
    box = [os.path.isfile(os.path.join(out_dir, INDEX))] if groups.rank == 0 else [None]
    dist.broadcast_object_list(box, src=0, group=groups.control)
    return bool(box[0])


def export_after_training(cfg: Config, model_chunks: list[torch.nn.Module], groups: ParallelGroups,
                          iteration: int) -> None:
    """``checkpoint.export_hf``: the final weights to ``<checkpoint.save>/hf_iter_<N>`` (collective), with the
    tokenizer, chat template and config.json of the final checkpoint's ``hf/`` (else ``data.tokenizer`` /
    ``data.template``, and config.json from the import the run started from, ``checkpoint.load``'s ``hf/``, or
    ``model.from_hf``).
    Skipped, with a log line, when the run stopped before ``train.train_iters``, and when ``hf_iter_<N>`` holds a
    complete export already (a finished run started again: its weights are that checkpoint's, exported then)."""
    if iteration < cfg.train.train_iters:
        _log.info("stopped at step %d before train.train_iters=%d: no HF export", iteration, cfg.train.train_iters)
        return
    save = cfg.checkpoint.save or "."
    out_dir = os.path.join(save, f"hf_iter_{iteration:07d}")
    if _exported_already(out_dir, groups):
        _log.info("%s already holds the HF export of step %d: left as it is (remove it to export again)", out_dir,
                  iteration)
        return
    latest = pointer.read_latest(save)
    final = latest if latest and os.path.basename(latest) == pointer.iter_dirname(iteration) else None
    export_to_hf(model_chunks, cfg.model, out_dir, groups, config=cfg, checkpoint_hf=stored_hf_dir(final))
