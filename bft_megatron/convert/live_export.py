"""Export in-memory (TP/PP-sharded) megatron model chunks to an HF directory, from inside a job.

For the trainer's ``export_hf: true``: call :func:`export_to_hf` on every rank after the last step.
Each pipeline stage writes its own shards (no pipeline traffic): on the ranks with data-parallel and
context-parallel rank 0, every parameter is all-gathered over the tensor-parallel group one at a
time and tensor-parallel rank 0 writes it. Global rank 0 then names the shards, writes the index,
config.json, generation_config.json and tokenizer files. ``out_dir`` must be on a filesystem that
every writing rank and rank 0 see (it is on one node).

Host memory per writing rank: one gathered parameter plus one shard buffer (``max_shard_bytes``).
With ``overlap_param_gather`` the distributed optimizer's last parameter all-gather must have
finished (it has once ``optimizer.step()`` returned and the next forward did not start).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from bft_megatron.checkpoint.state import unwrap
from bft_megatron.config.schema import ModelConfig
from bft_megatron.convert.hf_config import write_hf_metadata
from bft_megatron.convert.hf_io import DEFAULT_SHARD_BYTES, ShardWriter, finalize_shards, stale_weights_error
from bft_megatron.convert.mapping import OUTPUT, detect_spec, rule_by_megatron_name
from bft_megatron.convert.tensors import to_hf
from bft_megatron.parallel.bootstrap import ParallelGroups
from bft_megatron.utils.logging import get_logger

__all__ = ["export_to_hf", "unwrap"]

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
    for name, param in model.named_parameters():
        if name.startswith(_LAYERS):
            index, local = name[len(_LAYERS):].split(".", 1)
            layer = model.decoder.layers[int(index)].layer_number - 1  # layer_number is global, 1-based
            yield rule_by_megatron_name(local, spec, m.qkv_bias), layer, param
            continue
        rule = rule_by_megatron_name(name, spec, m.qkv_bias)
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
            writer.add(name, tensor.to(dtype) if dtype is not None else tensor)


def export_to_hf(model_chunks: list[torch.nn.Module], model_cfg: ModelConfig, out_dir: str, groups: ParallelGroups,
                 tokenizer_dir: str | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                 dtype: torch.dtype | None = None) -> None:
    """Collective over the world: write ``model_chunks`` (this rank's, possibly wrapped) as HF safetensors.

    ``tokenizer_dir`` (default ``model_cfg.from_hf``) supplies tokenizer files and the config.json
    template (checked against ``model_cfg``). ``dtype`` casts (default: the parameters' dtype).
    """
    verdict = [stale_weights_error(out_dir) if groups.rank == 0 else None]
    dist.broadcast_object_list(verdict, src=0)  # every rank refuses together (no half-entered collectives)
    if verdict[0]:
        raise FileExistsError(verdict[0])
    participates = groups.dp_rank == 0 and groups.cp_rank == 0
    manifests: list[dict[str, list[str]]] = []
    total, out_dtype = 0, dtype
    if participates:
        for index, chunk in enumerate(model_chunks):
            model = unwrap(chunk)
            out_dtype = out_dtype or next(model.parameters()).dtype
            writer = ShardWriter(out_dir, max_shard_bytes, tag=f"{groups.pp_rank:03d}-{index:02d}") \
                if groups.tp_rank == 0 else None
            _write_chunk(model, model_cfg, groups, writer, dtype)
            if writer is not None:
                writer.flush()
                manifests.append(writer.manifest)
                total += writer.total_bytes
    gathered: list = [None] * groups.world_size
    dist.all_gather_object(gathered, (groups.pp_rank, manifests, total, str(out_dtype).split(".")[-1]))
    if groups.rank == 0:
        writers = sorted((g for g in gathered if g[1]), key=lambda g: g[0])
        finalize_shards(out_dir, [mf for g in writers for mf in g[1]], sum(g[2] for g in writers))
        write_hf_metadata(out_dir, model_cfg, getattr(torch, writers[0][3]), tokenizer_dir or model_cfg.from_hf)
        _log.info("exported the in-memory model to %s", out_dir)
    dist.barrier()
