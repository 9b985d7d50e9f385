"""Measure peak host memory (max RSS) of ``bft-megatron convert import/export`` on a random model.

    python -m tests.convert_memory WORK_DIR [--layers 4 --hidden 2048 --ffn 5632 --vocab 32000]

Writes a random bf16 Llama-shaped HF checkpoint (two safetensors shards + index) without building an
HF model, then runs each step under ``/usr/bin/time -v`` in a fresh process and prints a table of its
max RSS (the kernel's high-water mark) and of its anonymous resident memory, sampled every 10 ms.
The baseline is the same interpreter importing torch/megatron/transformers and starting a one-rank
gloo group. Caveats: only the main process is sampled (megatron's checkpoint writer forks worker
processes whose memory is not counted), and a peak shorter than the 10 ms sampling period can be missed.
Numbers go into docs/convert.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASELINE = ("import torch, transformers, megatron.core; from bft_megatron.convert.runtime import process_group; "
            "from bft_megatron.parallel.bootstrap import initialize\n"
            "with process_group(): initialize(1, 1)")


def write_random_llama(out: str, layers: int, hidden: int, ffn: int, vocab: int) -> int:
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    heads, kv = hidden // 128, max(1, hidden // 512)
    LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=False,
                architectures=["LlamaForCausalLM"]).save_pretrained(out)
    g = torch.Generator().manual_seed(0)
    rnd = lambda *shape: (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)  # noqa: E731
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
                       p + "self_attn.q_proj.weight": (hidden, hidden),
                       p + "self_attn.o_proj.weight": (hidden, hidden),
                       p + "self_attn.k_proj.weight": (kv * 128, hidden),
                       p + "self_attn.v_proj.weight": (kv * 128, hidden),
                       p + "mlp.gate_proj.weight": (ffn, hidden), p + "mlp.up_proj.weight": (ffn, hidden),
                       p + "mlp.down_proj.weight": (hidden, ffn)})
    names = list(shapes)
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map, total = {}, 0
    for k, part in enumerate(halves, start=1):
        fname = f"model-{k:05d}-of-00002.safetensors"
        tensors = {n: rnd(*shapes[n]) for n in part}
        total += sum(t.numel() * 2 for t in tensors.values())
        save_file(tensors, os.path.join(out, fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
        del tensors
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh)
    return total


def _anon_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as fh:
            m = re.search(r"RssAnon:\s+(\d+) kB", fh.read())
        return int(m.group(1)) / 1024 if m else 0.0
    except OSError:
        return 0.0


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(x) for x in fh.read().split()]
    except OSError:
        return []


def measure(cmd: list[str]) -> tuple[float, float]:
    """(max RSS, max anonymous RSS sampled every 10 ms) of ``cmd`` in MB.

    Max RSS (the kernel's high-water mark, from ``/usr/bin/time -v``) also counts resident *file* pages,
    e.g. memory-mapped tensors, which the kernel can drop under pressure; anonymous memory is what must
    fit in RAM.
    """
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(["/usr/bin/time", "-v", *cmd], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                stderr=err, text=True)
        peak_anon = 0.0
        while proc.poll() is None:
            peak_anon = max([peak_anon] + [_anon_mb(c) for c in _children(proc.pid)])
            time.sleep(0.01)
        err.seek(0)
        log = err.read()
    if proc.returncode:
        raise RuntimeError(f"{cmd} failed:\n{log[-3000:]}")
    return int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", log).group(1)) / 1024, peak_anon


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("work")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    a = ap.parse_args()
    hf, ck = os.path.join(a.work, "hf"), os.path.join(a.work, "ckpt")
    size = write_random_llama(hf, a.layers, a.hidden, a.ffn, a.vocab)
    cli = [sys.executable, "-m", "bft_megatron.cli", "convert"]
    imp, exp = cli + ["import", "--no-progress"], cli + ["export", "--no-progress"]  # no bar thread in the numbers
    rows = [("baseline (imports + gloo group)", measure([sys.executable, "-c", BASELINE])),
            ("import", measure(imp + ["--hf", hf, "--out", ck])),
            ("import --low-memory", measure(imp + ["--hf", hf, "--out", ck + "_low", "--low-memory"])),
            ("export, --max-shard-size 5GB", measure(exp + ["--ckpt", ck, "--out", a.work + "/o1"])),
            ("export, --max-shard-size 100MB",
             measure(exp + ["--ckpt", ck, "--out", a.work + "/o2", "--max-shard-size", "100MB"]))]
    print(f"model: {size / 1e6:.0f} MB of bf16 weights ({a.layers} layers, hidden {a.hidden}, vocab {a.vocab})")
    print("| step | max RSS | max anonymous RSS (sampled) |")
    for label, (rss, anon) in rows:
        print(f"| {label} | {rss:.0f} MB | {anon:.0f} MB |")


if __name__ == "__main__":
    main()
