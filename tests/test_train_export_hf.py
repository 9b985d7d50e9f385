"""`checkpoint.export_hf: true`: the trainer writes HF safetensors after its last step, loadable by transformers."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.launch import ROOT, TINY, _free_port


@pytest.mark.slow
def test_train_exports_hf_weights_at_the_end(tmp_path):
    save = tmp_path / "run"
    cmd = [sys.executable, "-m", "bft_megatron.train", *TINY, "train.train_iters=2", f"checkpoint.save={save}",
           "checkpoint.export_hf=true"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = save / "hf_iter_0000002"
    assert (out / "config.json").is_file() and (out / "model.safetensors.index.json").is_file()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 4
    assert model.get_input_embeddings().weight.shape[0] == 128          # vocabulary padding stripped
    generated = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 7)


def test_export_hf_needs_a_save_dir():
    from bft_megatron.config import ConfigError, load_config, validate

    cfg = load_config(None, TINY + ["checkpoint.export_hf=true"])
    with pytest.raises(ConfigError, match="checkpoint.export_hf"):
        validate(cfg, 1)


@pytest.mark.slow
def test_rerunning_a_finished_run_keeps_its_checkpoint(tmp_path):
    save = tmp_path / "run"
    cmd = [sys.executable, "-m", "bft_megatron.train", *TINY, "train.train_iters=2", f"checkpoint.save={save}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    sentinel = save / "iter_0000002" / "sentinel"
    sentinel.write_text("the committed checkpoint must not be deleted and rewritten")
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
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
           f"--master-port={_free_port()}", "-m", "bft_megatron.train", *TINY, "parallel.cp=2", "parallel.tp=2",
           "train.train_iters=2", f"checkpoint.save={save}", "checkpoint.export_hf=true"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    offline = tmp_path / "offline"
    cli = [sys.executable, "-m", "bft_megatron.cli", "convert", "export", "--ckpt", str(save), "--out", str(offline)]
    proc = subprocess.run(cli, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    live, ref = read_safetensors_dir(str(save / "hf_iter_0000002")), read_safetensors_dir(str(offline))
    assert live.keys() == ref.keys() and len(live) > 10
    for name, tensor in ref.items():
        assert torch.equal(live[name], tensor), name
