"""HF safetensors -> megatron dist checkpoint (torch_dist), streamed tensor by tensor.

The model skeleton comes from the trainer's builder (:func:`bft_megatron.model.build_model_chunks`)
at TP1/PP1 on the ``meta`` device, so it costs no memory and its ``sharded_state_dict`` has exactly
the keys, shapes and sharding (QKV groups, swiglu factory, padded vocab with
``allow_shape_mismatch``) that a training run at any TP/PP, local or TE spec, asks for. Each megatron tensor is built
from the HF tensors it needs (read one at a time with ``safe_open``) and *assigned* into the
skeleton, so host memory holds the model at most once, never twice: tensors that pass through unchanged
stay copy-on-write maps of the safetensors files; ``low_memory`` spills the transformed ones too.

Output layout (a trainer run directory, loadable with ``checkpoint.load=OUT checkpoint.finetune=true``)::

    OUT/latest            -> iter_0000000
    OUT/iter_0000000/     the dist checkpoint ({"model": ..., common: config, layout, hf_import})
    OUT/hf/               config.json, generation_config.json, tokenizer files of the source
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from unittest import mock

import torch

from bft_megatron.checkpoint import pointer
from bft_megatron.checkpoint.disk_space import explain_failed_save, free_bytes, space_warning, state_bytes
from bft_megatron.checkpoint.pointer import HF_SUBDIR
from bft_megatron.config.base import ConfigError, to_dict
from bft_megatron.config.hf import model_fields_from_hf
from bft_megatron.config.schema import Config, ModelConfig
from bft_megatron.convert import progress as bars
from bft_megatron.convert.hf_io import HFReader, copy_side_files
from bft_megatron.convert.mapping import detect_spec, global_rules, model_layer_rules
from bft_megatron.convert.tensors import to_megatron
from bft_megatron.convert.runtime import process_group
from bft_megatron.model import build_model_chunks, builder, padded_vocab_size
from bft_megatron.utils.files import not_a_directory
from bft_megatron.utils.logging import get_logger

__all__ = ["import_hf", "model_config_from_hf_dir", "read_total_bytes", "HF_SUBDIR", "SPILL_SUBDIR"]

_log = get_logger(__name__)

SPILL_SUBDIR = ".import_spill"  # import --low-memory: converted layers, memory-mapped, removed at the end
# HF tensors that carry no parameters of their own (recomputed buffers in old Llama exports).
_IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq",)


def model_config_from_hf_dir(hf_dir: str) -> ModelConfig:
    """:class:`ModelConfig` from ``hf_dir/config.json`` (unsupported architectures raise ConfigError)."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist")
    with open(path, encoding="utf-8") as fh:
        hf = json.load(fh)
    try:
        fields = model_fields_from_hf(hf)
    except ConfigError as exc:  # it names model.from_hf, the training config's field; here the file was given
        raise ConfigError(str(exc).replace("model.from_hf: ", f"{path}: ", 1)) from None
    return ModelConfig(from_hf=hf_dir, **fields)


def _spill(tensors: dict[str, torch.Tensor], spill_dir: str | None, name: str) -> dict[str, torch.Tensor]:
    """With ``spill_dir``: write ``tensors`` there and return them memory-mapped from the file.

    The returned tensors are backed by the page cache (file pages the kernel can drop and re-read),
    not by anonymous memory, so holding the whole model costs about one layer of resident memory.
    """
    if spill_dir is None or not tensors:
        return tensors
    path = os.path.join(spill_dir, f"{name}.pt")
    torch.save(tensors, path)
    tensors.clear()
    return torch.load(path, mmap=True, weights_only=True)


def _own_storage_views(sharded_sd: dict) -> None:
    """Build megatron's sharded-tensor factories now and give every view its own exact storage.

    The swiglu factory saves fc1 as separate gate/up shards, views of the fc1 weight; megatron's writer
    clones CPU tensors whose storage is larger than themselves (a view would otherwise serialise its whole
    storage) and keeps the clones until the write: another copy of every fc1 (about 75 GB for
    Llama-3-70B). A tensor over an exact slice of the same memory needs no clone and no copy.
    """
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    apply_factories(sharded_sd)  # what save() does first; a no-op there afterwards
    for sh in nested_values(sharded_sd):
        data = sh.data if isinstance(sh, ShardedTensor) else None
        if data is None or not data.is_contiguous():
            continue
        nbytes = data.numel() * data.element_size()
        if data.untyped_storage().nbytes() != nbytes:
            start = data.storage_offset() * data.element_size()
            exact = data.untyped_storage()[start:start + nbytes]
            sh.data = torch.empty(0, dtype=data.dtype).set_(exact, 0, data.shape, data.stride())


def _convert(rule, reader: HFReader, m: ModelConfig, layer: int | None, padded_vocab: int):
    """``(tensor, transformed)``: the megatron tensor of ``rule`` and whether it is new memory (False when
    it is an HF tensor passed through unchanged, i.e. still a file-backed map of the safetensors file)."""
    read_ptrs = set()

    def read(name: str) -> torch.Tensor:
        t = reader.get(name)
        read_ptrs.add(t.data_ptr())
        return t

    out = to_megatron(rule, read, m, layer, padded_vocab)
    return out, out.data_ptr() not in read_ptrs


def _groups(m: ModelConfig) -> list[tuple]:
    """``(layer or None, rules, megatron name prefix, spill file name)`` of each conversion group, in order."""
    groups = [(None, global_rules(m.tie_embeddings), "", "global")]
    rules = model_layer_rules(m)
    return groups + [(i, rules, f"decoder.layers.{i}.", f"layer_{i:05d}") for i in range(m.num_layers)]


def read_total_bytes(reader: HFReader, m: ModelConfig) -> int:
    """Bytes of the HF tensors the import reads (the "read" bar's total), from the file headers; a tensor
    missing from ``reader`` is left out (the import then fails on it, naming it)."""
    return sum(reader.nbytes(name) for layer, rules, _, _ in _groups(m) for rule in rules
               for name in rule.hf_names(layer) if name in reader)


def _collect_state(reader: HFReader, m: ModelConfig, spec: str, padded_vocab: int,
                   spill_dir: str | None = None, bar=None) -> dict[str, torch.Tensor]:
    """megatron ``state_dict`` names (TP1/PP1) -> tensors, read layer by layer; with ``spill_dir`` each group's
    transformed tensors come back memory-mapped (pass-through ones are file-backed already). ``bar`` (tqdm)
    advances by the bytes read."""
    state: dict[str, torch.Tensor] = {}
    for layer, rules, prefix, spill_name in _groups(m):
        transformed = {}
        for rule in rules:
            tensor, new = _convert(rule, reader, m, layer, padded_vocab)
            (transformed if new else state)[prefix + rule.megatron(spec)] = tensor
            if bar is not None:
                bar.update(reader.bytes_read - bar.n)
        state.update(_spill(transformed, spill_dir, spill_name))
    return state


def _check_all_consumed(reader: HFReader, tied: bool) -> None:
    unused = [n for n in reader.names() if n not in reader.consumed and not n.endswith(_IGNORABLE_SUFFIXES)
              and not (tied and n == "lm_head.weight")]
    if unused:
        raise ValueError(f"{reader.dir}: {len(unused)} HF tensor(s) have no megatron mapping, e.g. {unused[:5]}")


def _assign(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put ``state`` into the meta skeleton without copies; every parameter must be covered."""
    expected = {k for k in model.state_dict() if not k.endswith("_extra_state")}
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ValueError(f"mapping does not match the model: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    for name, tensor in state.items():
        ref = model.get_parameter(name)
        if tuple(ref.shape) != tuple(tensor.shape):
            raise ValueError(f"{name}: converted shape {tuple(tensor.shape)} != model shape {tuple(ref.shape)}")
    model.load_state_dict(state, strict=False, assign=True)


def _meta_skeleton(cfg: Config, groups) -> torch.nn.Module:
    """The TP1/PP1 model on the ``meta`` device (no memory), local spec."""
    # RoPE frequencies are not parameters: the skeleton skips Llama-3 scaling (it cannot run on meta).
    skeleton_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, rope_scaling=None))
    # Local spec even where TE is installed: TE modules allocate on CUDA explicitly (defeating
    # the meta device), and checkpoint keys do not depend on the spec (megatron's local layers
    # save their norms under the TE names), so TE runs load the result all the same.
    # A CPU "device" keeps the builder from moving the skeleton to CUDA on GPU machines.
    cpu_groups = dataclasses.replace(groups, device=torch.device("cpu"))
    with torch.device("meta"), mock.patch.object(builder, "have_te", lambda: False):
        chunks, _ = build_model_chunks(skeleton_cfg, cpu_groups)
    return chunks[0]


def _refuse_existing(out_dir: str) -> None:
    """An ``out_dir`` that holds checkpoints already (e.g. a training run's ``checkpoint.save``) is refused: the
    import would move its ``latest`` to the weights-only ``iter_0000000``, and resuming, or exporting, the run
    would then take the import for it."""
    problem = not_a_directory(out_dir)
    if problem:  # else a NotADirectoryError traceback
        raise FileExistsError(f"--out {problem}; import into a new directory")
    existing = pointer.existing_checkpoint(out_dir)
    if existing:
        raise FileExistsError(f"{out_dir} already holds a checkpoint ({existing}); import into a new directory "
                              "(or, if it is the leftover of a killed import, remove it)")


def _save_import(hf_dir: str, iter_dir: str, cfg: Config, spill_dir: str | None, progress: bool = False) -> str:
    """Build the skeleton, fill it from ``hf_dir`` and save it to ``iter_dir``; returns the spec's name.
    ``progress``: a bar for each of the two long stages, reading (and converting) the HF tensors and writing
    the checkpoint."""
    from megatron.core import dist_checkpointing

    from bft_megatron.parallel.bootstrap import initialize

    m = cfg.model
    with process_group():
        model = _meta_skeleton(cfg, initialize(tp=1, pp=1))
        spec = detect_spec(model.state_dict().keys())
        reader = HFReader(hf_dir)
        padded = padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by, 1)
        try:
            if spill_dir:
                os.makedirs(spill_dir, exist_ok=True)
            with bars.byte_bar("import: read HF", read_total_bytes(reader, m), progress) as bar:
                state = _collect_state(reader, m, spec, padded, spill_dir, bar)
            _assign(model, state)
            _check_all_consumed(reader, m.tie_embeddings)
            reader.close()
            # "config": its model section is what a training run's model is compared with before loading
            # (checkpoint/architecture.py).
            sd = {"model": model.sharded_state_dict(), "config": to_dict(cfg),
                  "layout": {"tp": 1, "pp": 1, "vp": None, "cp": 1, "dp": 1, "world": 1},
                  "hf_import": {"source": os.path.abspath(hf_dir), "spec": spec}}
            _own_storage_views(sd["model"])
            need = state_bytes(sd["model"])  # one process: every tensor is a main replica
            warning = space_warning(f"--out {os.path.dirname(iter_dir)}", need, free_bytes(iter_dir),
                                    "free space there or import to another --out")
            if warning:
                _log.warning("%s", warning)
            with bars.byte_bar("import: write", need, progress) as bar, bars.watch_dir_bytes(bar, iter_dir), \
                    explain_failed_save(iter_dir, need):
                dist_checkpointing.save(sd, iter_dir)
        finally:  # mapped spill files stay readable after their unlinking until the tensors go
            if spill_dir:
                shutil.rmtree(spill_dir, ignore_errors=True)
    return spec


def _check_hf_dir(hf_dir: str) -> None:
    """``--hf`` as an existing directory, or an error naming what it is instead (else "<hf>/config.json does not
    exist" for a mistyped path, "config.json/config.json" for the file itself)."""
    if os.path.isdir(hf_dir):
        return
    where = "" if os.path.isabs(hf_dir) else f" (relative paths are taken from {os.getcwd()})"
    if not os.path.exists(hf_dir):
        raise FileNotFoundError(f"--hf {hf_dir}: no such directory{where}; give the HF model's directory (the one "
                                "holding config.json and the *.safetensors files)")
    example = f", e.g. --hf {os.path.dirname(hf_dir) or '.'}" if os.path.basename(hf_dir) == "config.json" else ""
    raise FileNotFoundError(f"--hf {hf_dir} is a file; give the HF model's directory (the one holding config.json "
                            f"and the *.safetensors files{example})")


def import_hf(hf_dir: str, out_dir: str, low_memory: bool = False, progress: bool = False) -> str:
    """Convert ``hf_dir`` into a dist checkpoint run directory ``out_dir``; returns the iter_ path.

    ``out_dir`` must not hold a checkpoint (``latest`` or an ``iter_`` directory) already.
    ``low_memory``: spill each layer's transformed tensors (QKV, fc1; the rest are already file-backed
    maps of the safetensors files) to ``out_dir/.import_spill`` and memory-map them back, so resident host
    memory stays about one layer instead of those tensors of the whole model (~65% of it), at the cost of
    their size in temporary disk space (removed at the end) and one extra write and read of them.
    ``progress``: byte-counting bars on stderr (:mod:`.progress`) for reading the HF tensors and writing the
    checkpoint.
    """
    _refuse_existing(out_dir)
    _check_hf_dir(hf_dir)
    m = model_config_from_hf_dir(hf_dir)
    cfg = Config(model=m)
    cfg.train = dataclasses.replace(cfg.train, bf16=False)  # keep the source dtype; no Float16 wrapping
    iter_dir = os.path.join(out_dir, pointer.iter_dirname(0))
    os.makedirs(iter_dir)
    spill_dir = os.path.join(out_dir, SPILL_SUBDIR) if low_memory else None
    try:
        spec = _save_import(hf_dir, iter_dir, cfg, spill_dir, progress)
    except BaseException:  # ours (makedirs refuses an existing one): a failed import leaves nothing that blocks a retry
        shutil.rmtree(iter_dir, ignore_errors=True)
        raise
    pointer.write_latest(out_dir, 0)
    copied = copy_side_files(hf_dir, os.path.join(out_dir, HF_SUBDIR), with_config=True)
    _log.info("imported %s -> %s (%s spec, %d layers; copied %s)", hf_dir, iter_dir, spec, m.num_layers, copied)
    return iter_dir
