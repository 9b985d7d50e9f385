"""Progress bars of ``convert import|export``: each bar's total is the bytes the stage actually processes, and the
bar reaches it; the file-polling bar of the checkpoint write. The CLI's ``--no-progress`` is in test_convert_cli."""

from __future__ import annotations

import io
import json
import math
import os
import threading
import time

import pytest
import torch
from tqdm import tqdm

from bft_megatron.convert import progress
from bft_megatron.convert.hf_io import HFReader
from tests.convert_models import make_model, read_safetensors_dir


def _quiet_bar(total: int) -> tqdm:
    return tqdm(total=total, file=io.StringIO(), unit="B")


def _wait_for(bar: tqdm, n: int) -> int:
    """``bar.n`` once it reached ``n`` (the poller's thread advances it), or after 5 s."""
    for _ in range(500):
        if bar.n >= n:
            break
        time.sleep(0.01)
    return bar.n


def test_watch_dir_bytes_follows_the_files_and_completes(tmp_path):
    bar = _quiet_bar(1000)
    with progress.watch_dir_bytes(bar, str(tmp_path / "out"), interval=0.01):
        os.makedirs(tmp_path / "out")  # not there when the watch starts
        (tmp_path / "out" / "a").write_bytes(b"x" * 300)
        assert _wait_for(bar, 300) == 300
        (tmp_path / "out" / "b").write_bytes(b"x" * 5000)  # framing beyond the tensor bytes: capped at the total
        assert _wait_for(bar, 1000) == 1000
    assert bar.n == 1000


def test_watch_dir_bytes_leaves_an_unfinished_write_unfinished(tmp_path):
    bar = _quiet_bar(1000)
    with pytest.raises(RuntimeError), progress.watch_dir_bytes(bar, str(tmp_path), interval=0.01):
        raise RuntimeError("writer failed")
    assert bar.n == 0
    off = progress.byte_bar("x", 10, enabled=False)
    with progress.watch_dir_bytes(off, str(tmp_path)):  # disabled: no thread, nothing counted
        assert not any(t.name == "convert-progress" for t in threading.enumerate())
    assert off.n == 0


def test_dir_bytes_counts_the_files_directly_under_it(tmp_path, monkeypatch):
    """Not subdirectories, 0 for a directory not there yet, and a file gone while it is looked at counts 0."""
    import contextlib

    assert progress._dir_bytes(str(tmp_path / "missing")) == 0
    (tmp_path / "a").write_bytes(b"x" * 300)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b").write_bytes(b"x" * 50)
    assert progress._dir_bytes(str(tmp_path)) == 300

    class Gone:
        def is_file(self, follow_symlinks=True):
            return True

        def stat(self, follow_symlinks=True):
            raise FileNotFoundError("renamed meanwhile")

    entries = [Gone(), *os.scandir(tmp_path)]
    monkeypatch.setattr(progress.os, "scandir", lambda directory: contextlib.nullcontext(entries))
    assert progress._dir_bytes(str(tmp_path)) == 300


def test_watch_dir_bytes_waits_for_the_directory_and_never_goes_back(tmp_path):
    bar = _quiet_bar(1000)
    with progress.watch_dir_bytes(bar, str(tmp_path / "out"), interval=0.01):
        time.sleep(0.1)  # several polls before the directory exists
        os.makedirs(tmp_path / "out")
        (tmp_path / "out" / "a").write_bytes(b"x" * 500)
        assert _wait_for(bar, 500) == 500
        (tmp_path / "out" / "a").unlink()  # e.g. a temporary file renamed away
        (tmp_path / "out" / "b").write_bytes(b"x" * 100)
        time.sleep(0.1)
        assert bar.n == 500
    assert bar.n == 1000


def test_reader_nbytes_reads_only_headers(tmp_path):
    make_model("qwen2_untied_bf16", str(tmp_path), max_shard_size="60KB")
    reader = HFReader(str(tmp_path))
    for name, tensor in read_safetensors_dir(str(tmp_path)).items():
        assert reader.nbytes(name) == tensor.numel() * tensor.element_size(), name
    assert reader.bytes_read == 0 and not reader.consumed


@pytest.fixture
def recorded_bars(monkeypatch):
    """Every bar the converters open, enabled and writing to a buffer, by description."""
    bars: dict[str, list[tqdm]] = {}

    def byte_bar(desc: str, total: int, enabled: bool) -> tqdm:
        assert enabled
        bar = tqdm(total=total, desc=desc, file=io.StringIO(), unit="B", unit_scale=True)
        bars.setdefault(desc, []).append(bar)
        return bar

    monkeypatch.setattr(progress, "byte_bar", byte_bar)
    return bars


def _checkpoint_tensor_bytes(iter_dir: str) -> int:
    from megatron.core import dist_checkpointing

    from bft_megatron.convert.runtime import process_group

    with process_group():
        metadata = dist_checkpointing.load_tensors_metadata(iter_dir)
    return sum(math.prod(md.global_shape) * md.dtype.itemsize for md in metadata.values())


@pytest.mark.slow
@pytest.mark.parametrize("low_memory", [False, True], ids=["import", "import_low_memory"])
# Phi3: the fused qkv_proj / gate_up_proj; Gemma3: four norms per layer, two of them inside linear_proj / fc2
@pytest.mark.parametrize("case", ["qwen2_untied_bf16", "phi3_untied", "gemma3_1b_bf16"])
def test_bar_totals_are_the_bytes_processed(tmp_path, recorded_bars, low_memory, case):
    from bft_megatron.convert.exporter import export_checkpoint
    from bft_megatron.convert.importer import import_hf

    hf, ckpt = str(tmp_path / "hf"), str(tmp_path / "ckpt")
    make_model(case, hf, max_shard_size="60KB")  # untied, no inv_freq: every HF tensor is read
    src = read_safetensors_dir(hf)
    iter_dir = import_hf(hf, ckpt, low_memory=low_memory, progress=True)
    (read,), (write,) = recorded_bars["import: read HF"], recorded_bars["import: write"]
    assert read.total == read.n == sum(t.numel() * t.element_size() for t in src.values())
    assert write.total == write.n == _checkpoint_tensor_bytes(iter_dir)  # megatron's tensors, padded vocab
    for dtype, suffix in ((None, "same"), (torch.float32, "fp32")):
        out = str(tmp_path / f"out_{suffix}")
        export_checkpoint(ckpt, out, max_shard_bytes=50_000, dtype=dtype, progress=True)
        bar = recorded_bars["export"][-1]
        with open(os.path.join(out, "model.safetensors.index.json"), encoding="utf-8") as fh:
            written = json.load(fh)["metadata"]["total_size"]
        assert bar.total == bar.n == written == sum(t.numel() * t.element_size()
                                                    for t in read_safetensors_dir(out).values())
    assert written == read.total * 4 // next(iter(src.values())).element_size()  # the fp32 export
