#!/usr/bin/env python3
"""Train the small sentencepiece tokenizer bundled for the CPU demo (deterministic, offline).

It is trained on the demo training split only, with identity normalisation (newlines and repeated
spaces survive, so chat templates round-trip), byte fallback (no unknown characters), and the
markers of the built-in chat templates as single user-defined pieces, so llama3, chatml and plain
all work with it. ids: pad=0, unk=1, bos=2 (<s>), eos=3 (</s>).

Usage: python tools/train_demo_tokenizer.py [--data bft_megatron/data/assets/hpo_train.jsonl]
                                             [--out bft_megatron/data/assets/hpo_sp.model] [--vocab 3000]
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import sentencepiece as spm

MARKERS = ["<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
           "<|eot_id|>", "\n"]


def sentences(path: Path) -> list[str]:
    """Every message content (one sentence each) plus the role words the templates write."""
    out = ["system", "user", "assistant", "User:", "Assistant:"] * 20
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            for m in json.loads(line)["messages"]:
                out.extend(s for s in m["content"].split("\n") if s.strip())
    return out


def train(data: Path, out: Path, vocab: int) -> None:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences(data)), model_writer=model, vocab_size=vocab, model_type="unigram",
        character_coverage=1.0, byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=False, allow_whitespace_only_pieces=True,
        user_defined_symbols=MARKERS, pad_id=0, unk_id=1, bos_id=2, eos_id=3, num_threads=1,
        input_sentence_size=0, shuffle_input_sentence=False, minloglevel=2)
    out.write_bytes(model.getvalue())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="bft_megatron/data/assets/hpo_train.jsonl")
    ap.add_argument("--out", default="bft_megatron/data/assets/hpo_sp.model")
    ap.add_argument("--vocab", type=int, default=3000)
    args = ap.parse_args()
    train(Path(args.data), Path(args.out), args.vocab)


if __name__ == "__main__":
    main()
