"""The peer: Hugging Face transformers training step with a straightforward BFT loss, same shapes.

Llama-3-8B layer shapes with 8 layers (untied), one 8192-token row per step, bf16 weights, SDPA attention,
torch fused AdamW, and the loss written as the authors' trainer does it (full fp32 log-softmax, detached
token probabilities as weights, per-sample minimum 256-token window mean). No DDP (one GPU).

    python bench/hf_peer_bench.py [--layers 8] [--seq 8192] [--steps 10] [--loss bft|ce]
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch


def straightforward_bft(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, group: int = 256):
    logp = torch.log_softmax(logits.float(), dim=-1)
    lp = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    losses = []
    for b in range(lp.shape[0]):
        a = lp[b][mask[b] > 0]
        ad = a.detach()
        p = ad.unfold(0, group, 1).mean(-1).min().exp() if a.numel() >= group else ad.mean().exp()
        losses.append((1 - p) * (-(ad.exp() * a)).mean())
    return torch.stack(losses).mean()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--loss", choices=["bft", "ce"], default="bft")
    args = ap.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=args.layers,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                      max_position_embeddings=args.seq, rope_theta=500000.0, tie_word_embeddings=False,
                      attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(device="cuda", dtype=torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    tokens = torch.randint(0, cfg.vocab_size, (1, args.seq + 1), device="cuda")
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    mask = (torch.arange(args.seq, device="cuda") >= args.seq // 5).float().unsqueeze(0)
    times = []
    for i in range(args.warmup + args.steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        logits = model(input_ids=inputs).logits
        if args.loss == "bft":
            loss = straightforward_bft(logits, labels, mask)
        else:
            loss = torch.nn.functional.cross_entropy(logits.float().view(-1, cfg.vocab_size), labels.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        end.record()
        torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(start.elapsed_time(end))
    ms = statistics.median(times)
    sys.stdout.write(f"hf peer ({args.loss}): {ms:.1f} ms/step, {args.seq / ms * 1000:.0f} tok/s, "
                     f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB\n")


if __name__ == "__main__":
    main()
