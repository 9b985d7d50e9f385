"""A trainer checkpoint carries its HF files (``iter_N/hf/``: config, tokenizer, the rendered chat template), and
exports prefer them over the recorded ``data.tokenizer`` path; ``checkpoint.export_hf`` on a finished run."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest

from bft_megatron.checkpoint import pointer
from bft_megatron.config import to_dict
from tests.launch import ROOT, TINY
from tests.test_train_export_hf import CHATS, DEMO_TOKENIZER, _env

TOKENIZER_RUN = [*TINY, "model.vocab_size=3000", "train.train_iters=2", "checkpoint.save_interval=1",
                 "data.template=chatml"]


def _side_files(folder) -> dict[str, bytes]:
    """An export's non-weight files (config, generation config, tokenizer, chat template), by name."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())
            if p.is_file() and not p.name.startswith("model")}


def _train(overrides: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "bft_megatron.train", *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)


def _check_renders_training_text(hf_dir, tokenizer_path: str) -> None:
    from transformers import AutoTokenizer

    from bft_megatron.convert.chat_templates import BUILTIN_JINJA
    from bft_megatron.data.records import Conversation, Message
    from bft_megatron.data.templates import render
    from bft_megatron.data.tokenize import encode
    from bft_megatron.data.tokenizer import load_tokenizer

    ours = load_tokenizer(tokenizer_path)
    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    assert tok.chat_template == BUILTIN_JINJA["chatml"]
    for chat in CHATS[:3]:
        conv = Conversation(tuple(Message(**m) for m in chat), "test")
        assert tok.apply_chat_template(chat, tokenize=False) == render(conv, "chatml", ours).text
        ids = tok.apply_chat_template(chat, tokenize=True)
        assert list(ids["input_ids"] if hasattr(ids, "keys") else ids) == encode(conv, "chatml", ours).tokens.tolist()
    config = json.loads((hf_dir / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (2, 3, 0)


@pytest.mark.slow
def test_checkpoints_carry_the_tokenizer_and_exports_outlive_its_directory(tmp_path, log_records):
    """(a) every checkpoint holds hf/ with the tokenizer and the chat template that renders the training text;
    (b) with the tokenizer directory moved away, the offline export writes the same files as with it present
    (and as a fresh render from it with --tokenizer, and as the in-job export), without the fallback warning."""
    from bft_megatron.convert.exporter import export_checkpoint

    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    shutil.copy(os.path.join(ROOT, DEMO_TOKENIZER), tok_dir / "sp.model")
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHATS))
    save = tmp_path / "run"
    proc = _train(TOKENIZER_RUN + [f"data.train={data}", f"data.tokenizer={tok_dir / 'sp.model'}",
                                   f"data.output_dir={tmp_path / 'prepared'}", f"checkpoint.save={save}",
                                   "checkpoint.export_hf=true"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    for it in (1, 2):
        iter_dir = save / pointer.iter_dirname(it)
        assert sorted(p.name for p in iter_dir.iterdir() if p.name.startswith(".hf")) == []  # no staging left
        _check_renders_training_text(iter_dir / "hf", str(tok_dir / "sp.model"))

    present, fresh, moved = tmp_path / "present", tmp_path / "fresh", tmp_path / "moved"
    export_checkpoint(str(save), str(present))
    export_checkpoint(str(save), str(fresh), tokenizer=str(tok_dir / "sp.model"))  # rendered anew, not copied
    tok_dir.rename(tmp_path / "elsewhere")
    log_records.clear()
    export_checkpoint(str(save), str(moved))
    assert not [r.getMessage() for r in log_records if r.levelno >= logging.WARNING]
    expected = _side_files(fresh)
    assert {"tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json"} <= expected.keys()
    assert _side_files(moved) == expected == _side_files(present) == _side_files(save / "hf_iter_0000002")
    assert expected == _side_files(save / "iter_0000002" / "hf")


@pytest.mark.slow
def test_synthetic_run_stores_no_hf_files_and_a_rerun_keeps_its_export(tmp_path):
    """(c) no tokenizer: checkpoints carry no hf/, said once for the run (not per save); a finished run started
    again with checkpoint.export_hf=true leaves its complete hf_iter_N as it is (it raised FileExistsError)."""
    save = tmp_path / "run"
    cmd = [*TINY, "train.train_iters=2", "checkpoint.save_interval=1", f"checkpoint.save={save}",
           "checkpoint.export_hf=true"]
    first = _train(cmd)
    assert first.returncode == 0, first.stderr[-3000:]
    assert pointer.list_iterations(str(save)) == [1, 2]
    assert not any((save / pointer.iter_dirname(it) / "hf").exists() for it in (1, 2))
    assert first.stderr.count("checkpoints carry no hf/ files") == 1
    export = save / "hf_iter_0000002"
    sentinel = export / "sentinel"
    sentinel.write_text("a complete export is left as it is")
    index_mtime = (export / "model.safetensors.index.json").stat().st_mtime_ns
    again = _train(cmd)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already holds the HF export of step 2" in again.stderr
    assert sentinel.is_file() and (export / "model.safetensors.index.json").stat().st_mtime_ns == index_mtime


def test_a_tokenizer_that_fails_warns_once_and_the_checkpoint_still_commits(tmp_path, log_records):
    """The files cannot be made (a corrupt .model): one warning for the run, no hf/ nor staging left, and
    `latest` still moves to the checkpoint, whose weights are complete."""
    import torch

    from bft_megatron.checkpoint.manager import Checkpointer
    from bft_megatron.config import load_config
    from bft_megatron.convert.runtime import process_group

    broken = tmp_path / "broken.model"
    broken.write_bytes(b"not a sentencepiece model")
    save = tmp_path / "run"
    cfg = load_config(None, TINY + [f"data.tokenizer={broken}", f"checkpoint.save={save}"])
    ckpt = Checkpointer(cfg, SimpleNamespace(rank=0))
    ckpt._model_dtype = torch.float32
    with process_group():
        for it in (1, 2):
            (save / pointer.iter_dirname(it)).mkdir(parents=True)  # as if every rank had written its shards
            ckpt._commit(it)
            assert pointer.latest_iteration(str(save)) == it
            assert os.listdir(save / pointer.iter_dirname(it)) == []
    warnings = [r.getMessage() for r in log_records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "could not store the tokenizer" in warnings[0], warnings


@pytest.mark.slow
def test_a_resumed_run_carries_the_resumed_checkpoints_hf_files_on(tmp_path):
    """A run resumed after its tokenizer directory moved (prepared data: the tokenizer is not needed to train)
    stores the hf/ of the checkpoint it resumed from in its new checkpoints, not nothing: before, rank 0 rendered
    them from the recorded tokenizer path again, found none and saved no hf/, so once keep_last pruned the old
    checkpoints no export of the run had its tokenizer."""
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    shutil.copy(os.path.join(ROOT, DEMO_TOKENIZER), tok_dir / "sp.model")
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHATS))
    save, prepared = tmp_path / "run", tmp_path / "prepared"
    common = [f"data.output_dir={prepared}", f"checkpoint.save={save}", "train.decay_iters=2"]
    first = _train(TOKENIZER_RUN + common + [f"data.train={data}", f"data.tokenizer={tok_dir / 'sp.model'}"])
    assert first.returncode == 0, first.stderr[-3000:]
    stored = _side_files(save / "iter_0000002" / "hf")
    tok_dir.rename(tmp_path / "elsewhere")
    again = _train(TOKENIZER_RUN + common + ["train.train_iters=3", "checkpoint.keep_last=1"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert pointer.list_iterations(str(save)) == [3]
    assert (save / "iter_0000003" / "hf").is_dir(), again.stderr[-3000:]
    assert _side_files(save / "iter_0000003" / "hf") == stored
    assert "not there" not in again.stderr and "could not store" not in again.stderr


def _hf_writer(overrides: list[str]):
    from bft_megatron.checkpoint.hf_files import CheckpointHF
    from bft_megatron.config import load_config

    return CheckpointHF(load_config(None, TINY + ["model.vocab_size=3000", "data.template=chatml", *overrides]))


def test_hf_files_are_rendered_once_staged_and_cleaned_up(tmp_path, log_records, monkeypatch):
    """Rank 0 renders the files at the first write and reuses them (the tokenizer may go away later); a stale
    staging directory does not stop a write; a failed write leaves no staging directory and warns once."""
    import torch

    from bft_megatron.checkpoint import hf_files

    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    shutil.copy(os.path.join(ROOT, DEMO_TOKENIZER), tok_dir / "sp.model")
    writer = _hf_writer([f"data.tokenizer={tok_dir / 'sp.model'}"])
    dirs = [tmp_path / pointer.iter_dirname(it) for it in range(4)]
    for d in dirs:
        d.mkdir()
    assert writer.write(str(dirs[0]), torch.bfloat16)
    first = _side_files(dirs[0] / "hf")
    assert {"config.json", "tokenizer.json"} <= first.keys()
    shutil.rmtree(tok_dir)  # rendered already: the copy in memory is written
    (dirs[1] / ".hf.partial").mkdir()  # a stale stage, e.g. of a write killed mid-way
    (dirs[1] / ".hf.partial" / "junk").write_text("x")
    assert writer.write(str(dirs[1]), torch.bfloat16)
    assert sorted(os.listdir(dirs[1])) == ["hf"] and _side_files(dirs[1] / "hf") == first

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(hf_files.os, "replace", failing_replace)
    assert not writer.write(str(dirs[2]), torch.bfloat16)
    assert not writer.write(str(dirs[3]), torch.bfloat16)
    assert os.listdir(dirs[2]) == [] and os.listdir(dirs[3]) == []
    warnings = [r.getMessage() for r in log_records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "could not store the tokenizer" in warnings[0] and "disk full" in warnings[0]


def test_hf_files_without_a_tokenizer_and_after_a_resume(tmp_path, log_records):
    """No tokenizer (synthetic data): nothing written, said once; a resumed run writes the resumed checkpoint's
    hf/ although the config's tokenizer path is gone."""
    import torch

    writer = _hf_writer([])
    for it in (1, 2):
        (tmp_path / pointer.iter_dirname(it)).mkdir()
        assert not writer.write(str(tmp_path / pointer.iter_dirname(it)), torch.float32)
        assert os.listdir(tmp_path / pointer.iter_dirname(it)) == []
    assert sum("checkpoints carry no hf/ files" in r.getMessage() for r in log_records) == 1

    old, new = tmp_path / "old", tmp_path / "new"
    (tmp_path / "tok").mkdir()
    shutil.copy(os.path.join(ROOT, DEMO_TOKENIZER), tmp_path / "tok" / "sp.model")
    old.mkdir()
    new.mkdir()
    assert _hf_writer([f"data.tokenizer={tmp_path / 'tok' / 'sp.model'}"]).write(str(old), torch.float32)
    shutil.rmtree(tmp_path / "tok")
    resumed = _hf_writer([f"data.tokenizer={tmp_path / 'tok' / 'sp.model'}"])
    resumed.resume(str(old), to_dict(resumed.cfg))
    assert resumed.write(str(new), torch.float32)
    assert _side_files(new / "hf") == _side_files(old / "hf")


def test_a_resume_with_another_template_stores_the_configs(tmp_path, log_records):
    """The resumed checkpoint's hf/ is carried on only while the training tokenizer is gone: resumed with another
    data.template (the data re-prepared), the new checkpoints carried the old chat template and eos ids, and so
    did their exports. Without the tokenizer the old files are all there is, and a warning says so."""
    import torch

    tok = tmp_path / "sp.model"
    shutil.copy(os.path.join(ROOT, DEMO_TOKENIZER), tok)
    old, new, gone = tmp_path / "old", tmp_path / "new", tmp_path / "gone"
    for d in (old, new, gone):
        d.mkdir()
    assert _hf_writer([f"data.tokenizer={tok}"]).write(str(old), torch.float32)  # chatml
    saved = to_dict(_hf_writer([f"data.tokenizer={tok}"]).cfg)
    resumed = _hf_writer([f"data.tokenizer={tok}", "data.template=llama3"])
    resumed.resume(str(old), saved)
    assert resumed.write(str(new), torch.float32)
    template = (new / "hf" / "chat_template.jinja").read_text()
    assert "start_header_id" in template and "im_start" not in template
    assert "im_start" in (old / "hf" / "chat_template.jinja").read_text()
    assert not [r for r in log_records if r.levelno >= logging.WARNING]
    tok.unlink()
    carried = _hf_writer([f"data.tokenizer={tok}", "data.template=llama3"])
    carried.resume(str(old), saved)
    assert carried.write(str(gone), torch.float32)
    assert _side_files(gone / "hf") == _side_files(old / "hf")
    warnings = [r.getMessage() for r in log_records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "data.template=llama3 (the checkpoint's: chatml)" in warnings[0], warnings
