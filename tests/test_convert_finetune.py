"""Fine-tune an imported tiny model with the trainer's own loop, export it, load it with transformers.

Flow (spawned gloo processes): import (1 process) -> ``bft_megatron.training`` build/finetune-load/fit for
3 steps at TP2 and PP2 (Qwen2, tied, QKV bias), PP2 and PP2 x VP2 (Llama-3.1, untied, rope scaling), TP2
(Qwen3: head norms, head_dim 32 over hidden 64), PP2 (Mistral: a 64-token window over 32-token rows), TP2 (Phi3:
fused qkv_proj / gate_up_proj, written from TP-sharded fc1 and QKV) and TP2 (Gemma 3: post-attention/post-MLP norms,
scaled tied embedding, a real 4-token window), then
``export_to_hf`` from the in-memory chunks, with the trainer's final checkpoint saved too ->
offline export of that checkpoint (1 process). Checks: both exports are bit-identical, the weights
moved, transformers' logits of the export equal the trained megatron model's (fp32, <= 1e-4), and
``generate`` runs.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.convert_models import make_model, megatron_logits, read_safetensors_dir, write_hub_style_config
from tests.dist_harness import run_distributed

pytestmark = pytest.mark.slow

ATOL = 1e-4
# run -> (model case, layers, layout overrides, save a checkpoint). Every run saves its final checkpoint,
# the interleaved (VP) one included, and its offline export must equal the live one.
RUNS = {"qwen2_tp2": ("qwen2_tied", 2, ["parallel.tp=2"], True),
        "qwen2_pp2": ("qwen2_tied", 2, ["parallel.pp=2"], True),  # tied embedding split over stages
        "llama31_pp2": ("llama31_untied", 2, ["parallel.pp=2"], True),
        "llama31_pp2_vp2": ("llama31_untied", 4, ["parallel.pp=2", "parallel.vp=2"], True),
        # head norms replicated over TP (gathered from rank 0's copy on export); Mistral's window over the rows
        "qwen3_tp2": ("qwen3_untied", 2, ["parallel.tp=2"], True),
        "mistral_pp2": ("mistral_untied", 2, ["parallel.pp=2"], True),
        "phi3_tp2": ("phi3_untied", 2, ["parallel.tp=2"], True),
        # Gemma 3: four norms per layer (post-norms in the row-parallel linears), scaled tied embedding, a 4-token
        # window in the sliding layer over 32-token packed rows, config.json in the Hub's 4.x spelling
        "gemma3_tp2": ("gemma3_tied", 2, ["parallel.tp=2"], True)}
SAVED = [r for r, spec in RUNS.items() if spec[3]]
TRAIN = ["data.seq_length=32", "data.packing=true", "train.bf16=false",
         "train.global_batch_size=4", "train.micro_batch_size=2", "train.lr=3e-3", "train.warmup_iters=0",
         "train.train_iters=3", "train.dropout=0.0", "loss.method=bft", "loss.group_size=2", "logging.log_interval=1"]


def _import_worker(rank: int, world: int, root: str) -> None:
    from bft_megatron.convert.importer import import_hf

    for run in RUNS:
        import_hf(os.path.join(root, "hf", run), os.path.join(root, "init", run))


def _export_worker(rank: int, world: int, root: str) -> None:
    from bft_megatron.convert.exporter import export_checkpoint

    for run in SAVED:
        export_checkpoint(os.path.join(root, "run", run), os.path.join(root, "offline", run))


def _train_worker(rank: int, world: int, root: str, tokens: torch.Tensor) -> dict:
    from bft_megatron.checkpoint import Checkpointer
    from bft_megatron.config import load_config, validate
    from bft_megatron.convert.live_export import export_to_hf
    from bft_megatron.parallel import bootstrap
    from bft_megatron.training.build import build_trainer
    from bft_megatron.training.fit import fit

    logits = {}
    for run, (_, _, layout, save) in RUNS.items():
        cfg = load_config(None, TRAIN + layout + [
            f"model.from_hf={root}/hf/{run}", f"checkpoint.load={root}/init/{run}", "checkpoint.finetune=true"]
            + ([f"checkpoint.save={root}/run/{run}"] if save else []))
        p = cfg.parallel
        groups = bootstrap.initialize(p.tp, p.pp, p.vp, p.cp, seed=cfg.train.seed)
        trainer = build_trainer(cfg, validate(cfg, world), groups)
        checkpointer = Checkpointer(cfg, groups)
        assert checkpointer.load(trainer)
        fit(trainer, checkpointer if save else None)
        # config=cfg: config.json and tokenizer from checkpoint.load's hf/ (the import), as the trainer does
        export_to_hf(trainer.model, cfg.model, os.path.join(root, "live", run), groups, config=cfg)
        logits[run] = megatron_logits(trainer.model, tokens, groups, cfg.model.vocab_size)
        bootstrap.destroy(keep_process_group=True)
    return {k: v for k, v in logits.items() if v is not None}


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("finetune"))
    for run, (case, layers, _, _) in RUNS.items():
        make_model(case, os.path.join(root, "hf", run), seed=3, num_layers=layers)
        write_hub_style_config(os.path.join(root, "hf", run))
    torch.manual_seed(2)
    tokens = torch.randint(3, 250, (2, 9))
    run_distributed(_import_worker, 1, root)
    per_rank = run_distributed(_train_worker, 2, root, tokens)
    run_distributed(_export_worker, 1, root)
    return root, tokens, {k: v for r in per_rank for k, v in r.items()}


@pytest.mark.parametrize("name", SAVED)
def test_live_export_equals_offline_export(finetuned, name):
    root = finetuned[0]
    live = read_safetensors_dir(os.path.join(root, "live", name))
    offline = read_safetensors_dir(os.path.join(root, "offline", name))
    source = read_safetensors_dir(os.path.join(root, "hf", name))
    assert sorted(live) == sorted(offline) == sorted(source)
    for key in live:
        assert torch.equal(live[key], offline[key]), key
    moved = [k for k in source if not torch.equal(source[k], live[k])]
    assert len(moved) == len(source), f"weights the fine-tune did not change: {set(source) - set(moved)}"


@pytest.mark.parametrize("name", list(RUNS))
def test_finetuned_export_matches_megatron_and_generates(finetuned, name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, tokens, logits = finetuned
    out_dir = os.path.join(root, "live", name)
    assert sorted(read_safetensors_dir(out_dir)) == sorted(read_safetensors_dir(os.path.join(root, "hf", name)))
    model = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    with torch.no_grad():
        hf_logits = model(tokens).logits
    diff = (hf_logits - logits[name]).abs().max().item()
    assert diff <= ATOL, f"{name}: exported model's logits differ from the trained megatron model by {diff:.3g}"
    gen = model.generate(tokens[:1, :4], max_new_tokens=5, do_sample=False)
    assert gen.shape == (1, 9)
    AutoTokenizer.from_pretrained(out_dir)
