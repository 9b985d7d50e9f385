"""megatron dist checkpoint -> HF safetensors, layer group by layer group (bounded memory).

The exporter needs no model: it reads the checkpoint's tensor metadata (keys, global shapes), then
loads a few layers at a time as plain ``ShardedTensor`` requests (``dist_checkpointing`` reshards
from whatever TP/PP the checkpoint was written at), converts them to HF tensors and hands them to a
:class:`ShardWriter`. Host memory is bounded by about two shards (one being loaded/converted, one
being buffered), whatever the model size.

Checkpoint keys are the same for both layer specs (megatron's local spec saves its norms under the
TE names), and ``linear_fc1`` is stored as ``[gate; up]`` whatever the TP size.
"""

from __future__ import annotations

import math
import os
import shutil

import torch

from bft_megatron.checkpoint import pointer
from bft_megatron.checkpoint.read_lock import CheckpointRemoved, reading
from bft_megatron.config.base import from_dict
from bft_megatron.config.schema import ModelConfig
from bft_megatron.convert import progress as bars
from bft_megatron.convert.hf_config import write_hf_metadata
from bft_megatron.convert.hf_io import (DEFAULT_SHARD_BYTES, ShardWriter, begin_staging, finalize_shards,
                                        publish_staging, stale_weights_error)
from bft_megatron.convert.importer import model_config_from_hf_dir
from bft_megatron.convert.mapping import EMBEDDING, FINAL_NORM, OUTPUT, detect_spec, model_layer_rules
from bft_megatron.convert.runtime import process_group
from bft_megatron.convert.sources import CLI_HINT, ExportSources, find_sources, stored_hf_dir
from bft_megatron.convert.tensors import cast, to_hf
from bft_megatron.utils.logging import get_logger

__all__ = ["export_checkpoint", "resolve_checkpoint_dir"]

_log = get_logger(__name__)
_LAYER_PREFIX = "decoder.layers."


def resolve_checkpoint_dir(path: str) -> str:
    """A dist checkpoint directory from a run directory (``latest``), an ``iter_`` dir or a plain one."""
    if os.path.isfile(os.path.join(path, "metadata.json")):
        return path
    if not os.path.exists(path):  # a typo, or a relative path from another directory: say so plainly
        raise FileNotFoundError(f"{path}: no such checkpoint directory (relative paths are taken from {os.getcwd()})")
    resolved = pointer.resolve_load_dir(path)
    if resolved is None or not os.path.isfile(os.path.join(resolved, "metadata.json")):
        hf = os.path.isfile(os.path.join(path, "config.json"))  # an HF model folder: already in HF format
        hint = (f"; it holds an HF config.json, i.e. it is an HF model already (bft-megatron convert import --hf "
                f"{path} --out DIR brings it to megatron)" if hf else "")
        raise FileNotFoundError(f"{path}: not a dist checkpoint (no metadata.json) nor a run directory with "
                                f"a 'latest' pointer to one{hint}")
    return resolved


def _sources(ckpt_dir: str, common: dict, hf_dir: str | None,
             tokenizer: str | None) -> tuple[ModelConfig, ExportSources]:
    """(model config, where config.json and the tokenizer come from: :func:`find_sources`)."""
    run_dir = os.path.dirname(os.path.normpath(ckpt_dir))
    config = common.get("config") if isinstance(common.get("config"), dict) else {}
    sources = find_sources(config, hf_dir=hf_dir, tokenizer=tokenizer, run_dir=run_dir, hint=CLI_HINT,
                           stored=stored_hf_dir(ckpt_dir))
    saved = config.get("model")
    if saved:
        return from_dict(ModelConfig, saved, "model"), sources
    if sources.template_dir is None:
        raise ValueError(f"{ckpt_dir}: the checkpoint carries no model config; pass --hf DIR with config.json")
    return model_config_from_hf_dir(sources.template_dir), sources


def _range_request(metadata: dict, key: str, start: int, stop: int) -> object:
    """A request for layers ``[start, stop)`` of a stacked ``decoder.layers.*`` tensor ``[L, ...]``.

    No axis fragmentation (an irregular grid): a single process may ask for any slab, and
    dist_checkpointing reads the overlapping parts of whatever shards were saved.
    """
    from megatron.core.dist_checkpointing import ShardedTensor

    md = metadata[key]
    data = torch.empty((stop - start, *md.global_shape[1:]), dtype=md.dtype)
    offset = (start,) + (0,) * (len(md.global_shape) - 1)
    return ShardedTensor(key=key, data=data, dtype=md.dtype, local_shape=tuple(data.shape),
                         global_shape=tuple(md.global_shape), global_offset=offset, axis_fragmentations=None,
                         replica_id=0)


def _load_global(path: str, metadata: dict, key: str) -> torch.Tensor:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    md = metadata[key]
    req = {key: ShardedTensor.from_rank_offsets(key, torch.empty(md.global_shape, dtype=md.dtype), replica_id=0)}
    return dist_checkpointing.load(req, path)[key]


class _Export:
    """State of one offline export: checkpoint metadata, model config, the shard writer."""

    def __init__(self, path: str, m: ModelConfig, dtype: torch.dtype | None) -> None:
        from megatron.core import dist_checkpointing

        self.path, self.m, self.dtype = path, m, dtype
        self.writer: ShardWriter | None = None  # set by run()
        self.bar = None  # set by run(): a tqdm over the bytes of HF tensors written
        self.metadata = dist_checkpointing.load_tensors_metadata(path)
        self.spec = detect_spec(self.metadata.keys())
        self.rules = model_layer_rules(m)
        self.layer_keys = [_LAYER_PREFIX + r.megatron(self.spec) for r in self.rules]
        for key in self.layer_keys + [EMBEDDING.local, FINAL_NORM.local]:
            if key not in self.metadata:
                raise KeyError(f"{path}: tensor {key!r} missing from the checkpoint")
        if not m.tie_embeddings and OUTPUT.local not in self.metadata:  # checked before any shard is written
            raise KeyError(f"{path}: untied model but {OUTPUT.local!r} is missing from the checkpoint")
        found = self.metadata[self.layer_keys[0]].global_shape[0]
        if found != m.num_layers:
            raise ValueError(f"{path}: checkpoint has {found} layers, the model config says {m.num_layers}")

    def write(self, rule, tensor: torch.Tensor, layer: int | None) -> None:
        for name, t in to_hf(rule, tensor, self.m, layer):
            out = cast(name, t, self.dtype)
            self.writer.add(name, out)
            if self.bar is not None:
                self.bar.update(out.numel() * out.element_size())

    def _hf_bytes(self, rule, key: str) -> int:
        """Bytes of the HF tensors ``rule`` makes of checkpoint tensor ``key`` (of every layer, for a stacked
        ``decoder.layers.*`` key): splits (QKV, fc1) keep every element, a vocabulary tensor loses megatron's
        padding rows, ``dtype`` sets the element size."""
        md = self.metadata[key]
        shape = list(md.global_shape)
        if rule.kind == "vocab":
            shape[0] = self.m.vocab_size
        return math.prod(shape) * (self.dtype or md.dtype).itemsize

    def total_bytes(self) -> int:
        """Bytes of HF tensors the export writes (the bar's total, and the index's ``total_size``)."""
        rules = [(EMBEDDING, EMBEDDING.local), (FINAL_NORM, FINAL_NORM.local)]
        if not self.m.tie_embeddings:
            rules.append((OUTPUT, OUTPUT.local))
        rules += zip(self.rules, self.layer_keys)
        return sum(self._hf_bytes(rule, key) for rule, key in rules)

    def layer_bytes(self) -> int:
        return sum(math.prod(self.metadata[k].global_shape[1:]) * self.metadata[k].dtype.itemsize
                   for k in self.layer_keys)

    def layers(self) -> None:
        from megatron.core import dist_checkpointing

        per_group = max(1, self.writer.max_bytes // max(1, self.layer_bytes()))
        for start in range(0, self.m.num_layers, per_group):
            group = range(start, min(start + per_group, self.m.num_layers))
            request = {key: _range_request(self.metadata, key, group.start, group.stop) for key in self.layer_keys}
            # A partial (layer-range) request: megatron's whole-tensor coverage check does not apply.
            loaded = dist_checkpointing.load(request, self.path, validate_access_integrity=False)
            for i in group:  # loaded[key]: [len(group), ...]
                for rule, key in zip(self.rules, self.layer_keys):
                    self.write(rule, loaded[key][i - group.start], i)
            if self.bar.disable:  # the bar says more; a log line would break it up
                _log.info("exported layers %d..%d of %d", group.start, group.stop - 1, self.m.num_layers)

    def run(self, writer: ShardWriter, progress: bool = False) -> None:
        self.writer = writer
        with bars.byte_bar("export", self.total_bytes(), progress) as self.bar:
            self._run()
            writer.flush()  # the last shard: on disk before the bar closes

    def _run(self) -> None:
        self.write(EMBEDDING, _load_global(self.path, self.metadata, EMBEDDING.local), None)
        self.layers()
        self.write(FINAL_NORM, _load_global(self.path, self.metadata, FINAL_NORM.local), None)
        if not self.m.tie_embeddings:
            self.write(OUTPUT, _load_global(self.path, self.metadata, OUTPUT.local), None)


def export_checkpoint(ckpt: str, out_dir: str, hf_dir: str | None = None,
                      max_shard_bytes: int = DEFAULT_SHARD_BYTES, dtype: torch.dtype | None = None,
                      tokenizer: str | None = None, progress: bool = False) -> str:
    """Export a dist checkpoint (run dir, iter_ dir or plain) to an HF directory; returns ``out_dir``.

    ``tokenizer`` (HF tokenizer directory or sentencepiece ``.model``) overrides the training tokenizer: the
    checkpoint's stored copy (``<ckpt>/hf/``, written by the trainer), else the one its config names;
    ``hf_dir`` supplies config.json (and a tokenizer if no other is found);
    ``dtype`` casts the weights (default: keep the checkpoint's dtype). Everything that can be checked
    (checkpoint tensors and layer count, template config.json, tokenizer size) is checked before any shard
    is written; the export is written into a hidden sibling directory and moved to ``out_dir`` when
    complete, so a failed export leaves nothing behind that blocks a retry. ``progress``: a bar on stderr
    over the bytes of HF tensors written (:mod:`.progress`).
    """
    path = resolve_checkpoint_dir(ckpt)
    stale = stale_weights_error(out_dir)
    if stale:
        raise FileExistsError(stale)
    try:
        with reading(path):  # a run pruning its older checkpoints (keep_last) leaves this one until we are done
            _export(path, out_dir, hf_dir, max_shard_bytes, dtype, tokenizer, progress)
    except BaseException as exc:
        if not isinstance(exc, CheckpointRemoved) and (isinstance(exc, KeyboardInterrupt) or os.path.isdir(path)):
            raise
        raise FileNotFoundError(  # the reader saw a missing file, a missing directory or megatron's exception
            f"{path} was removed while it was being exported: a run still training into {os.path.dirname(path)} "
            "prunes its older checkpoints (checkpoint.keep_last). Export its newest checkpoint again, or one it "
            "keeps (raise keep_last, or export after the run has ended)") from exc
    _log.info("exported %s -> %s", path, out_dir)
    return out_dir


def _export(path: str, out_dir: str, hf_dir: str | None, max_shard_bytes: int, dtype: torch.dtype | None,
            tokenizer: str | None, progress: bool) -> None:
    from megatron.core import dist_checkpointing

    with process_group():
        common = dist_checkpointing.load_common_state_dict(path)
        m, sources = _sources(path, common, hf_dir, tokenizer)
        job = _Export(path, m, dtype)
        stage = begin_staging(out_dir)
        try:
            write_hf_metadata(stage, m, dtype or job.metadata[EMBEDDING.local].dtype, sources)
            writer = ShardWriter(stage, max_shard_bytes)
            job.run(writer, progress)
            finalize_shards(stage, [writer.manifest], writer.total_bytes)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
    publish_staging(stage, out_dir)
