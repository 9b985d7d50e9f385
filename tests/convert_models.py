"""Tiny random HF models (Llama-3.1/3.2-, Qwen2-, Qwen3-, Mistral-, Phi-3/phi-4- and Gemma-3-like) and a tiny
tokenizer for the convert tests.

Weights are re-drawn with a large spread (not the 0.02 init) so that logits are O(1) and a wrong
layout (e.g. QKV not interleaved per group) changes them far beyond the comparison tolerance.
"""

from __future__ import annotations

import copy
import os

import torch

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               # small so that the tiny head_dim has frequencies in all three llama3 bands
               "original_max_position_embeddings": 64}

GEMMA3_ROPE = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
               "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}

# longrope factors (Phi-3.5-mini's short ones rise from 1.0 to ~2.7 over 48 frequencies, the long ones to ~60)
PHI3_SHORT = [1.0, 1.25, 1.5, 1.9, 2.3, 2.6, 3.0, 3.5]
PHI3_LONG = [1.1, 2.0, 3.5, 6.0, 10.0, 17.0, 30.0, 55.0]

# name -> (family, config overrides, dtype). vocab 300 pads to 384 at TP1 but 512 at TP2.
CASES = {
    "llama31_untied": ("llama", dict(vocab_size=300, num_attention_heads=8, num_key_value_heads=2,
                                     tie_word_embeddings=False, rope_scaling=LLAMA3_ROPE, rope_theta=500000.0),
                       torch.float32),
    "llama32_tied": ("llama", dict(vocab_size=256, num_attention_heads=4, num_key_value_heads=4,
                                   tie_word_embeddings=True, rope_scaling=LLAMA3_ROPE, rope_theta=500000.0),
                     torch.float32),
    "qwen2_tied": ("qwen2", dict(vocab_size=300, num_attention_heads=4, num_key_value_heads=2,
                                 tie_word_embeddings=True, rope_theta=1000000.0), torch.float32),
    "qwen2_untied_bf16": ("qwen2", dict(vocab_size=272, num_attention_heads=8, num_key_value_heads=4,
                                        tie_word_embeddings=False), torch.bfloat16),
    # query/key head norms; head_dim 32 with hidden 64 and 4 heads: queries 128 wide (Qwen3-32B: 64 x 128 > 5120)
    "qwen3_untied": ("qwen3", dict(vocab_size=300, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                   tie_word_embeddings=False, rope_theta=1000000.0), torch.float32),
    # review: tied (0.6B-4B), 8 heads x 8 = hidden (head_dim equal to hidden/heads: read as null), GQA 4:1
    "qwen3_tied": ("qwen3", dict(vocab_size=300, num_attention_heads=8, num_key_value_heads=2, head_dim=8,
                                 tie_word_embeddings=True, rope_theta=1000000.0), torch.float32),
    # review: tied, like Qwen3-0.6B (16 x 128 over 1024): queries twice the hidden width, kv 2
    "qwen3_tied_wide": ("qwen3", dict(vocab_size=300, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                      tie_word_embeddings=True, rope_theta=1000000.0), torch.float32),
    # Mistral (BioMistral's v0.1 base: a 4096-token window; here 64, longer than the test's rows, so that attention
    # is global there as in the trainer); head_dim 24 over hidden 64 and 4 heads, like Mistral-Nemo's 128 over 5120/32
    "mistral_untied": ("mistral", dict(vocab_size=300, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                                       sliding_window=64, tie_word_embeddings=False), torch.float32),
    # Phi3ForCausalLM: fused qkv_proj [q; k; v] and gate_up_proj [gate; up]. phi-4-like: GQA 4:1 (phi-4: 40 heads,
    # 10 kv), untied, no window, theta 250000. pad_token_id: Phi3Config's 32000 is outside the tiny vocabulary.
    "phi3_untied": ("phi3", dict(vocab_size=300, num_attention_heads=8, num_key_value_heads=2, sliding_window=None,
                                 tie_word_embeddings=False, rope_theta=250000.0, pad_token_id=None), torch.float32),
    # Phi-3-mini-4k-like: MHA, tied (review: a tied Phi3), a window (2047 there; 64 > the test's rows here)
    "phi3_tied": ("phi3", dict(vocab_size=256, num_attention_heads=4, num_key_value_heads=4, sliding_window=64,
                               tie_word_embeddings=True, pad_token_id=None), torch.float32),
    # YaRN (Qwen2.5 / Qwen3 long context: factor 4 over 32768; here 4 x 64 = max_position_embeddings 256, as
    # transformers expects): a short original length so that the tiny head_dim has interpolated, ramped and kept
    # frequencies; the attention factor 0.1 ln 4 + 1 scales the scores
    "qwen2_yarn": ("qwen2", dict(vocab_size=300, num_attention_heads=4, num_key_value_heads=2,
                                 tie_word_embeddings=True, rope_theta=10000.0,
                                 rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                               "original_max_position_embeddings": 64}), torch.float32),
    # YaRN with every optional key: beta bounds, an mscale ratio (DeepSeek-style attention factor), no truncation
    "qwen3_yarn": ("qwen3", dict(vocab_size=300, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                 tie_word_embeddings=False, rope_theta=1000000.0,
                                 rope_scaling={"rope_type": "yarn", "factor": 8.0,
                                               "original_max_position_embeddings": 32, "beta_fast": 16.0,
                                               "beta_slow": 2.0, "mscale": 1.5, "mscale_all_dim": 0.5,
                                               "truncate": False}), torch.float32),
    # Windows narrower than the test's rows (4 < 9-11 tokens): the trainer applies them in every layer (BioMistral's
    # 4096 and Phi-3-mini-4k's 2047 at longer data.seq_length)
    "mistral_window": ("mistral", dict(vocab_size=300, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                                       sliding_window=4, tie_word_embeddings=False), torch.float32),
    "phi3_window": ("phi3", dict(vocab_size=256, num_attention_heads=4, num_key_value_heads=4, sliding_window=3,
                                 tie_word_embeddings=True, pad_token_id=None), torch.float32),
        # Phi3 longrope (Phi-3.5-mini / Phi-3-*-128k: MHA, whole heads rotated, 4096 -> 131072): original length 64 ->
    # max_position_embeddings 256 (factor 4, attention factor sqrt(1 + ln 4 / ln 64) folded into the softmax scale),
    # non-trivial short factors (the test's rows are shorter than 64: transformers uses them), other long ones
    "phi3_longrope": ("phi3", dict(vocab_size=300, num_attention_heads=4, num_key_value_heads=4, sliding_window=None,
                                   tie_word_embeddings=False, pad_token_id=None, original_max_position_embeddings=64,
                                   rope_scaling={"type": "longrope", "short_factor": PHI3_SHORT[:8],
                                                 "long_factor": PHI3_LONG[:8]}), torch.float32),
    # Phi-4-mini-like partial rotary without scaling: 0.75 of each 16-wide head rotated (12 channels), GQA 2:1, tied
    "phi3_partial": ("phi3", dict(vocab_size=256, num_attention_heads=4, num_key_value_heads=2, sliding_window=None,
                                  tie_word_embeddings=True, pad_token_id=None, partial_rotary_factor=0.75),
                     torch.float32),
    # Phi-4-mini-like (partial 0.75, GQA 3:1 there, tied, longrope): partial rotary *with* an attention factor != 1,
    # which scales only the rotated channels (model/rotary_scale.py); 6 factor pairs, GQA 2:1 (one group per TP2 rank)
    "phi3_partial_longrope": ("phi3", dict(vocab_size=256, num_attention_heads=4, num_key_value_heads=2,
                                           sliding_window=None, tie_word_embeddings=True, pad_token_id=None,
                                           partial_rotary_factor=0.75, original_max_position_embeddings=64,
                                           rope_scaling={"rope_type": "longrope", "short_factor": PHI3_SHORT[:6],
                                                         "long_factor": PHI3_LONG[:6]}), torch.float32),
    # Gemma3ForCausalLM, MedGemma-27B-text-like: tied, GQA 2:1, head_dim 24 over hidden 64 / 4 heads and a softmax
    # scale of its own (27B: head_dim 128, query_pre_attn_scalar 168 = 5376/32), linear RoPE scaling 8 on the global
    # layer, theta 1e4 on the sliding one. Window 4 (27B: 1024) under the test's 9-11 token rows and 32-token packed
    # rows, so the window cuts; layer_types [sliding, full]: both kinds, one per stage at PP2.
    "gemma3_tied": ("gemma3", dict(vocab_size=300, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                                   query_pre_attn_scalar=20, sliding_window=4, tie_word_embeddings=True,
                                   layer_types=["sliding_attention", "full_attention"],
                                   rope_parameters=GEMMA3_ROPE, pad_token_id=0), torch.float32),
    # MedGemma-27B's other proportion: queries narrower than the model (27B: 32 x 128 = 4096 < 5376) and the softmax
    # scale from hidden/heads (168 = 5376/32, here 16 = 64/4), untied (review: the output layer's own table)
    "gemma3_narrow": ("gemma3", dict(vocab_size=300, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                                     query_pre_attn_scalar=16, sliding_window=3, tie_word_embeddings=False,
                                     layer_types=["sliding_attention", "full_attention"],
                                     rope_parameters=GEMMA3_ROPE, pad_token_id=0), torch.float32),
    # gemma-3-1b-like in bf16: one kv head (1B: 4 heads, 1 kv, head_dim 256), no rope scaling (bit-identical export)
    "gemma3_1b_bf16": ("gemma3", dict(vocab_size=272, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                                      query_pre_attn_scalar=32, sliding_window=4, tie_word_embeddings=True,
                                      layer_types=["sliding_attention", "full_attention"],
                                      rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                                       "sliding_attention": {"rope_type": "default",
                                                                             "rope_theta": 1e4}},
                                      pad_token_id=0), torch.bfloat16),
}


def make_tokenizer(out_dir: str, vocab_size: int) -> None:
    """A word-level fast tokenizer over ``vocab_size`` made-up words (no network)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(out_dir)


def make_model(name: str, out_dir: str, seed: int = 0, num_layers: int = 2, max_shard_size: str | None = None):
    """Build, randomise and ``save_pretrained`` one case; returns the HF model (fp32 copy for references).

    ``max_shard_size`` (e.g. ``"100KB"``) saves several safetensors files plus an index.
    """
    import transformers

    family, overrides, dtype = CASES[name]
    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=num_layers, max_position_embeddings=256,
                  rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)
    prefix = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "mistral": "Mistral", "phi3": "Phi3",
              "gemma3": "Gemma3Text"}[family]
    config_cls = getattr(transformers, f"{prefix}Config")
    model_cls = getattr(transformers, f"{prefix.removesuffix('Text')}ForCausalLM")
    if family == "gemma3":  # one layer type per layer; a copy: transformers fills rope_parameters in place
        types = [overrides["layer_types"][i % 2] for i in range(num_layers)]
        overrides = dict(copy.deepcopy(overrides), layer_types=types)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**common, **overrides)).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):  # Gemma 3's are zero-centred: x/rms * (1 + w)
                p.copy_((0.0 if family == "gemma3" else 1.0) + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
    model.to(dtype).save_pretrained(out_dir, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    make_tokenizer(out_dir, overrides["vocab_size"])
    return model.float()


def read_safetensors_dir(path: str) -> dict[str, torch.Tensor]:
    """All tensors of an HF directory (index or single file)."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for fname in sorted(os.listdir(path)):
        if fname.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, fname)))
    return out


def write_hub_style_config(hf_dir: str) -> None:
    """Rewrite config.json the way Hub checkpoints of Llama-3.1 / Qwen2.5 have it (transformers 4.x keys).

    transformers 5 saves ``rope_parameters``; published checkpoints carry top-level ``rope_theta``
    and ``rope_scaling``, which transformers 5 still reads.
    """
    import json

    path = os.path.join(hf_dir, "config.json")
    with open(path, encoding="utf-8") as fh:
        config = json.load(fh)
    rope = config.pop("rope_parameters", None) or {}
    if "full_attention" in rope:  # Gemma 3 (MedGemma-27B-text's file): per-type RoPE keys, a pattern, no layer_types
        full, local = rope["full_attention"], rope["sliding_attention"]
        types = config.pop("layer_types")
        config.update(rope_theta=full.pop("rope_theta"), rope_local_base_freq=local["rope_theta"],
                      sliding_window_pattern=types.index("full_attention") + 1,
                      rope_scaling=full if full.get("rope_type", "default") != "default" else None)
        rope = {}
    config["rope_theta"] = rope.pop("rope_theta", config.get("rope_theta", 10000.0))
    if "rope_local_base_freq" not in config:
        config["rope_scaling"] = rope if rope.get("rope_type", "default") != "default" else None
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2)


def megatron_logits(chunks: list, tokens: torch.Tensor, groups, vocab: int) -> torch.Tensor | None:
    """Full-vocabulary logits ``[b, s, vocab]`` of a megatron model at any TP/PP/VP (manual p2p, gloo).

    Virtual stages run in pipeline order: chunk v of rank r follows chunk v of rank r-1, and chunk v
    of rank 0 follows chunk v-1 of the last rank. Returned on the last stage's TP rank 0 (None
    elsewhere). ``chunks`` may be wrapped (DDP, Float16Module).
    """
    import torch.distributed as dist

    from bft_megatron.checkpoint.state import unwrap

    b, s = tokens.shape
    positions = torch.arange(s, device=tokens.device).unsqueeze(0).expand(b, s)
    prev = dist.get_global_rank(groups.pp, (groups.pp_rank - 1) % groups.pp_size)
    nxt = dist.get_global_rank(groups.pp, (groups.pp_rank + 1) % groups.pp_size)
    out = None
    for v, chunk in enumerate(chunks):
        model = unwrap(chunk)
        first = v == 0 and groups.is_first_pp_stage
        last = v == len(chunks) - 1 and groups.is_last_pp_stage
        if not first:
            hidden = torch.empty(s, b, model.config.hidden_size, device=tokens.device)
            dist.recv(hidden, src=prev)
            model.set_input_tensor(hidden)
        with torch.no_grad():
            out = model(tokens, positions, None)
        if not last:
            dist.send(out.contiguous(), dst=nxt)
    if not groups.is_last_pp_stage:
        return None
    shards = [torch.empty_like(out) for _ in range(groups.tp_size)]
    dist.all_gather(shards, out.contiguous(), group=groups.tp)
    return torch.cat(shards, dim=-1)[..., :vocab] if groups.tp_rank == 0 else None
