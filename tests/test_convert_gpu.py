"""Transformer Engine layer spec on a GPU: the import (local-spec skeleton) loads into TE models, their logits
equal HF's, and ``export_to_hf`` maps TE's in-memory names back bit for bit.

Skipped without CUDA. On the device machine (no pytest needed): ``python -m tests.test_convert_gpu``.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

from tests.convert_models import make_model, megatron_logits, read_safetensors_dir
from tests.dist_harness import run_distributed

# windows narrower than the rows (TE's windowed attention) and YaRN (TE's fused RoPE with our frequencies and the
# attention factor in the softmax scale) as well as the plain families
NAMES = ["llama31_untied", "qwen2_tied", "qwen3_untied", "qwen3_tied_wide", "mistral_untied", "phi3_untied",
         "gemma3_tied", "gemma3_narrow", "mistral_window", "phi3_window", "qwen2_yarn", "qwen3_yarn",
         "phi3_longrope", "phi3_partial", "phi3_partial_longrope"]
ATOL = 2e-3  # fp32 on GPU: TE's GEMMs and attention kernels sum in another order than HF on CPU


def _te_worker(rank: int, world: int, root: str, tokens: torch.Tensor) -> dict:
    import dataclasses

    from bft_megatron.config.schema import Config
    from bft_megatron.convert import export_to_hf, import_hf, load_weights
    from bft_megatron.convert.importer import model_config_from_hf_dir
    from bft_megatron.convert.mapping import detect_spec
    from bft_megatron.model import build_model_chunks
    from bft_megatron.parallel.bootstrap import initialize

    out = {}
    for name in NAMES:
        hf = os.path.join(root, "hf", name)
        import_hf(hf, os.path.join(root, "ckpt", name))
        groups = initialize(tp=1, pp=1)
        m = model_config_from_hf_dir(hf)
        cfg = Config(model=m)
        cfg.train = dataclasses.replace(cfg.train, bf16=False)
        chunks, _ = build_model_chunks(cfg, groups)
        spec = detect_spec([n for n, _ in chunks[0].named_parameters()])
        load_weights(chunks, os.path.join(root, "ckpt", name))
        logits = megatron_logits(chunks, tokens.cuda(), groups, m.vocab_size)
        export_to_hf(chunks, m, os.path.join(root, "live", name), groups)
        out[name] = (spec, logits.float().cpu())
    return out


def check_te_spec(root: str) -> dict[str, float]:
    torch.manual_seed(1)
    tokens = torch.randint(3, 250, (2, 11))
    refs = {}
    for name in NAMES:
        model = make_model(name, os.path.join(root, "hf", name))
        with torch.no_grad():
            refs[name] = model(tokens).logits
    # TE's fp32 GEMMs use TF32 tensor cores unless told otherwise (measured: 7e-3 logit error on H100);
    # this compares fp32 math, so cuBLAS/cuDNN must run true fp32 in the spawned worker.
    os.environ["NVIDIA_TF32_OVERRIDE"] = "0"
    (result,) = run_distributed(_te_worker, 1, root, tokens)
    diffs = {}
    for name in NAMES:
        spec, logits = result[name]
        assert spec == "te", f"{name}: the model was built with the {spec} spec (is TE importable?)"
        diffs[name] = (logits - refs[name]).abs().max().item()
        assert diffs[name] <= ATOL, f"{name}: TE logits differ from HF by {diffs[name]:.3g}"
        src = read_safetensors_dir(os.path.join(root, "hf", name))
        live = read_safetensors_dir(os.path.join(root, "live", name))
        assert sorted(src) == sorted(live)
        assert all(torch.equal(src[k], live[k]) for k in src), name
    return diffs


@pytest.mark.gpu
def test_te_spec_import_logits_and_live_export(tmp_path):
    check_te_spec(str(tmp_path))


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        print("max |logits diff| vs HF:", check_te_spec(tmp))  # noqa: T201 - script output
