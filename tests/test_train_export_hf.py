"""`checkpoint.export_hf: true`: the trainer writes HF safetensors after its last step, loadable by transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from bft_megatron.parallel.bootstrap import free_port
from tests.launch import ROOT, TINY


DEMO_TOKENIZER = "bft_megatron/data/assets/hpo_sp.model"  # relative, as the demo recipe writes it


def _env() -> dict:
    """A single-process run binds MASTER_PORT (default 29500): a free one, so concurrent test runs do not collide."""
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, PYTHONWARNINGS="ignore",
                MASTER_PORT=str(free_port()))


CHATS = [[{"role": "user", "content": f"Which genes are associated with HP:{i:07d}?"},
          {"role": "assistant", "content": f"{i % 7 + 1} genes are associated with it."}] for i in range(24)]


def _check_complete_hf_folder(out) -> None:
    """What a user of the export relies on: AutoTokenizer / chat template / ids as in training, generation stops."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bft_megatron.data.records import Conversation, Message
    from bft_megatron.data.tokenize import encode
    from bft_megatron.data.tokenizer import load_tokenizer

    ours = load_tokenizer(os.path.join(ROOT, DEMO_TOKENIZER))
    end_of_turn = ours.token_to_id("<|im_end|>")
    config = json.loads((out / "config.json").read_text())
    generation = json.loads((out / "generation_config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (ours.bos_id, ours.eos_id,
                                                                                         ours.pad_id) == (2, 3, 0)
    assert generation["eos_token_id"] == [ours.eos_id, end_of_turn] and generation["bos_token_id"] == ours.bos_id
    tok = AutoTokenizer.from_pretrained(out)
    chat = CHATS[5]
    ids = tok.apply_chat_template(chat, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    conv = Conversation(tuple(Message(**m) for m in chat), "test")
    assert ids == encode(conv, "chatml", ours).tokens.tolist()
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert model.get_input_embeddings().weight.shape[0] == 3000          # vocabulary padding stripped
    assert model.generation_config.eos_token_id == [ours.eos_id, end_of_turn]
    prompt = tok.apply_chat_template(chat[:1], add_generation_prompt=True, return_tensors="pt")
    prompt = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
    generated = model.generate(prompt, max_new_tokens=4, do_sample=False)
    assert prompt.shape[1] < generated.shape[1] <= prompt.shape[1] + 4


@pytest.mark.slow
def test_demo_tokenizer_run_exports_a_complete_hf_folder(tmp_path):
    """A run trained on the bundled sentencepiece tokenizer without model.from_hf: the in-job export and the
    offline one carry its tokenizer, chat template and ids; a mismatched --hf fails before writing anything
    and the retry succeeds (from another working directory: the relative data.tokenizer still resolves)."""
    from tests.convert_models import make_model

    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHATS))
    save = tmp_path / "run"
    cmd = [sys.executable, "-m", "bft_megatron.train", *TINY, "model.vocab_size=3000", "train.train_iters=2",
           f"data.train={data}", f"data.tokenizer={DEMO_TOKENIZER}", "data.template=chatml",
           f"data.output_dir={tmp_path / 'prepared'}", f"checkpoint.save={save}", "checkpoint.export_hf=true"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_complete_hf_folder(save / "hf_iter_0000002")

    wrong, out = tmp_path / "other_model", tmp_path / "offline"
    make_model("llama32_tied", str(wrong))
    export = [sys.executable, "-m", "bft_megatron.cli", "convert", "export", "--ckpt", str(save), "--out", str(out)]
    proc = subprocess.run(export + ["--hf", str(wrong)], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "does not describe the exported model" in proc.stderr, proc.stderr[-3000:]
    assert not out.exists() and not any(p.name.startswith(".offline") for p in tmp_path.iterdir())
    proc = subprocess.run(export, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_complete_hf_folder(out)


def test_export_hf_needs_a_save_dir():
    from bft_megatron.config import ConfigError, load_config, validate

    cfg = load_config(None, TINY + ["checkpoint.export_hf=true"])
    with pytest.raises(ConfigError, match="checkpoint.export_hf"):
        validate(cfg, 1)


@pytest.mark.slow
def test_rerunning_a_finished_run_keeps_its_checkpoint(tmp_path):
    save = tmp_path / "run"
    cmd = [sys.executable, "-m", "bft_megatron.train", *TINY, "train.train_iters=2", f"checkpoint.save={save}"]
    env = _env()
    first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "randomly initialised model (nothing was loaded)" in first.stderr  # BFT from scratch, no warm-up
    sentinel = save / "iter_0000002" / "sentinel"
    sentinel.write_text("the committed checkpoint must not be deleted and rewritten")
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "randomly initialised" not in again.stderr  # it loaded its own checkpoint
    assert sentinel.is_file()
    assert (save / "latest").read_text().strip() == "iter_0000002"


@pytest.mark.slow
def test_context_parallel_run_exports_what_its_checkpoint_holds(tmp_path):
    """CP2 x TP2 (4 gloo ranks): the in-job export (written by CP rank 0 of each TP group) equals the offline
    export of the same run's final checkpoint, tensor for tensor, bit for bit."""
    from tests.convert_models import read_safetensors_dir

    save = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=4", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", "-m", "bft_megatron.train", *TINY, "parallel.cp=2", "parallel.tp=2",
           "train.train_iters=2", f"checkpoint.save={save}", "checkpoint.export_hf=true"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "NO TOKENIZER" in proc.stderr and "set data.tokenizer" in proc.stderr  # synthetic data: none to ship
    offline = tmp_path / "offline"
    cli = [sys.executable, "-m", "bft_megatron.cli", "convert", "export", "--ckpt", str(save), "--out", str(offline)]
    proc = subprocess.run(cli, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "NO TOKENIZER" in proc.stderr and "--tokenizer PATH" in proc.stderr
    assert json.loads((offline / "config.json").read_text())["eos_token_id"] is None  # not LlamaConfig's 2
    live, ref = read_safetensors_dir(str(save / "hf_iter_0000002")), read_safetensors_dir(str(offline))
    assert live.keys() == ref.keys() and len(live) > 10
    for name, tensor in ref.items():
        assert torch.equal(live[name], tensor), name
