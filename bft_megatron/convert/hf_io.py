"""Streaming Hugging Face safetensors I/O: read one tensor at a time, write bounded shards.

:class:`HFReader` never loads a checkpoint whole: it reads ``model.safetensors.index.json`` (or the
single ``model.safetensors``) and fetches each tensor on demand with ``safe_open``, so host memory
holds only the tensors the caller keeps. :class:`ShardWriter` buffers tensors up to
``max_shard_bytes`` and then writes one shard file; :func:`finalize_shards` gives the shards of
one or several writers (e.g. one per pipeline stage) the standard ``model-0000k-of-0000N`` names
and writes the index.
"""

from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from bft_megatron.utils.files import default_file_mode, not_a_directory
from bft_megatron.utils.logging import get_logger

__all__ = ["HFReader", "ShardWriter", "finalize_shards", "stale_weights_error", "copy_side_files", "SIDE_FILES",
           "DEFAULT_SHARD_BYTES", "staging_path", "begin_staging", "publish_staging"]

_log = get_logger(__name__)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# HF's default max_shard_size "5GB", decimal as transformers (and --max-shard-size) read it
DEFAULT_SHARD_BYTES = 5 * 10**9
SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
              "chat_template.json")


class HFReader:
    """Lazy access to the tensors of an HF checkpoint directory."""

    def __init__(self, hf_dir: str) -> None:
        self.dir = hf_dir
        index_path = os.path.join(hf_dir, INDEX)
        if os.path.isfile(index_path):
            with open(index_path, encoding="utf-8") as fh:
                self.weight_map: dict[str, str] = json.load(fh)["weight_map"]
        elif os.path.isfile(os.path.join(hf_dir, SINGLE)):
            with safe_open(os.path.join(hf_dir, SINGLE), framework="pt") as fh:
                self.weight_map = {name: SINGLE for name in fh.keys()}
        else:
            raise FileNotFoundError(f"{hf_dir}: neither {INDEX} nor {SINGLE} found (only safetensors is supported)")
        self._handles: dict[str, object] = {}
        self._headers: dict[str, dict] = {}
        self.consumed: set[str] = set()
        self.bytes_read = 0  # of the tensors returned by get(): what the import's progress bar counts

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def names(self) -> list[str]:
        return list(self.weight_map)

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor: a copy-on-write map of the safetensors file (file-backed until written)."""
        if name not in self.weight_map:
            raise KeyError(f"{self.dir}: tensor {name!r} not found in the checkpoint")
        fname = self.weight_map[name]
        try:
            if fname not in self._handles:
                self._handles[fname] = safe_open(os.path.join(self.dir, fname), framework="pt")
            tensor = self._handles[fname].get_tensor(name)
        except (SafetensorError, OSError) as exc:  # safetensors names neither the file nor the tensor
            raise ValueError(f"{os.path.join(self.dir, fname)}: cannot read tensor {name!r} ({exc}): the file is "
                             "damaged or cut short (an interrupted download or copy?), or the index maps the "
                             "tensor to a file that does not hold it") from None
        self.consumed.add(name)
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor

    def nbytes(self, name: str) -> int:
        """Size of tensor ``name`` from its file's header, without reading it (safetensors: an 8-byte
        little-endian header length, then a JSON header giving each tensor's ``data_offsets``)."""
        fname = self.weight_map[name]
        path = os.path.join(self.dir, fname)
        if fname not in self._headers:
            with open(path, "rb") as fh:
                try:
                    self._headers[fname] = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
                except (ValueError, UnicodeDecodeError) as exc:  # json's own message names no file
                    raise ValueError(f"{path}: unreadable safetensors header ({exc}): the file is damaged or cut "
                                     "short (an interrupted download or copy?)") from None
        if name not in self._headers[fname]:
            raise ValueError(f"{self.dir}: the index maps tensor {name!r} to {fname}, which does not hold it")
        start, end = self._headers[fname][name]["data_offsets"]
        return end - start

    def close(self) -> None:
        self._handles.clear()


def stale_weights_error(out_dir: str) -> str | None:
    """An error message if ``out_dir`` already holds HF weights (stale shards would sit beside a new index), or is
    a file (else a NotADirectoryError when the finished export is published)."""
    problem = not_a_directory(out_dir)
    if problem:
        return f"{problem}; export into a new directory"
    if not os.path.isdir(out_dir):
        return None
    # A checkpoint directory (a run's, an import's, or one iter_ directory) is never an export's target: the HF
    # files would be mixed into it (`--out` given the `--ckpt` path), as `convert import` refuses the reverse.
    from bft_megatron.checkpoint.pointer import existing_checkpoint

    held = existing_checkpoint(out_dir) or (
        "a dist checkpoint (.metadata)" if os.path.isfile(os.path.join(out_dir, ".metadata")) else None)
    if held:
        return f"{out_dir} holds a bft-megatron checkpoint ({held}); export into a new directory"
    stale = [f for f in os.listdir(out_dir) if f in (INDEX, SINGLE) or
             (f.startswith("model-") and f.endswith(".safetensors"))]
    return f"{out_dir} already holds HF weights ({stale[0]}, ...); export into a new directory" if stale else None


def staging_path(out_dir: str) -> str:
    """Where an export into ``out_dir`` is written before it is published: a hidden sibling directory."""
    out_dir = os.path.normpath(out_dir)
    return os.path.join(os.path.dirname(out_dir), f".{os.path.basename(out_dir)}.partial")


def begin_staging(out_dir: str) -> str:
    """Refuse an ``out_dir`` holding weights; create an empty staging directory (an earlier failed export's is
    removed). Returns its path."""
    stale = stale_weights_error(out_dir)
    if stale:
        raise FileExistsError(stale)
    stage = staging_path(out_dir)
    if os.path.exists(stage):
        _log.info("removing %s, left by an export that did not finish", stage)
        shutil.rmtree(stage)
    os.makedirs(stage)
    return stage


def publish_staging(stage: str, out_dir: str) -> None:
    """Move a complete export from ``stage`` to ``out_dir``: a rename, or file by file (the index last) into an
    existing ``out_dir`` that holds other files, whose tokenizer files this export does not have are removed."""
    if os.path.isdir(out_dir) and not os.listdir(out_dir):
        os.rmdir(out_dir)
    if not os.path.exists(out_dir):
        os.replace(stage, out_dir)
        return
    from bft_megatron.convert.hf_tokenizer import TOKENIZER_FILES

    names = sorted(os.listdir(stage), key=lambda n: n == INDEX)
    removed = sorted(n for n in set(TOKENIZER_FILES) - set(names) if os.path.isfile(os.path.join(out_dir, n)))
    replaced = sorted(n for n in names if os.path.isfile(os.path.join(out_dir, n)))
    if removed or replaced:  # files of the user's in an existing folder: say what happens to them
        _log.warning("%s already held files: replaced %s; removed %s (tokenizer files this export does not "
                     "write would be mixed with its own)", out_dir, replaced or "none", removed or "none")
    for name in removed:  # an older export's tokenizer or template file (a chat_template.jinja would override
        os.remove(os.path.join(out_dir, name))  # the one written now)
    for name in names:
        os.replace(os.path.join(stage, name), os.path.join(out_dir, name))
    os.rmdir(stage)


class ShardWriter:
    """Accumulate tensors; write a shard whenever the buffer would exceed ``max_shard_bytes``.

    Shards get provisional names ``.part-<tag>-<k>.safetensors``; :func:`finalize_shards` renames
    them. ``manifest`` maps each provisional file to the tensor names it holds.
    """

    def __init__(self, out_dir: str, max_shard_bytes: int = DEFAULT_SHARD_BYTES, tag: str = "0") -> None:
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be > 0, got {max_shard_bytes}")
        os.makedirs(out_dir, exist_ok=True)
        stale = stale_weights_error(out_dir)
        if stale:
            raise FileExistsError(stale)
        self.out_dir, self.max_bytes, self.tag = out_dir, max_shard_bytes, tag
        self._buffer: dict[str, torch.Tensor] = {}
        self._bytes = 0
        self.manifest: dict[str, list[str]] = {}
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._buffer and self._bytes + nbytes > self.max_bytes:
            self.flush()
        # safetensors wants contiguous, non-shared storage: clone views (e.g. split QKV parts).
        self._buffer[name] = tensor.detach().contiguous().clone() if tensor._base is not None else tensor.detach()
        self._bytes += nbytes
        self.total_bytes += nbytes

    def flush(self) -> None:
        if not self._buffer:
            return
        fname = f".part-{self.tag}-{len(self.manifest):05d}.safetensors"
        save_file(self._buffer, os.path.join(self.out_dir, fname), metadata={"format": "pt"})
        self.manifest[fname] = list(self._buffer)
        self._buffer, self._bytes = {}, 0


def finalize_shards(out_dir: str, manifests: list[dict[str, list[str]]], total_bytes: int) -> str:
    """Rename provisional shards (in ``manifests`` order) to ``model-0000k-of-0000N`` and write the index."""
    parts = [(fname, names) for manifest in manifests for fname, names in sorted(manifest.items())]
    weight_map: dict[str, str] = {}
    mode = default_file_mode()
    for k, (fname, names) in enumerate(parts, start=1):
        final = f"model-{k:05d}-of-{len(parts):05d}.safetensors"
        os.replace(os.path.join(out_dir, fname), os.path.join(out_dir, final))
        # safetensors writes its files 0600; give them the mode of every other exported file, so serving
        # jobs and other accounts on a shared file system can read the weights (best effort: some mounts
        # refuse chmod, and the weights are written by then).
        try:
            os.chmod(os.path.join(out_dir, final), mode)
        except OSError as exc:
            _log.warning("could not make %s readable like the other files (%s): check its permissions", final, exc)
        for name in names:
            if name in weight_map:
                raise ValueError(f"tensor {name!r} written twice ({weight_map[name]} and {final})")
            weight_map[name] = final
    index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
    path = os.path.join(out_dir, INDEX)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(index, fh, indent=2)
    _log.info("wrote %d shard(s), %.1f MB, and %s", len(parts), total_bytes / 1e6, INDEX)
    return path


def copy_side_files(src_dir: str | None, dst_dir: str, with_config: bool = False) -> list[str]:
    """Copy tokenizer files and generation_config.json (and config.json if asked) that exist in ``src_dir``."""
    if not src_dir:
        return []
    os.makedirs(dst_dir, exist_ok=True)
    names = SIDE_FILES + (("config.json",) if with_config else ())
    copied = []
    for name in names:
        src = os.path.join(src_dir, name)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(dst_dir, name))
            copied.append(name)
    return copied
