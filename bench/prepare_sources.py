"""Preparation time of a many-source mix (pool start-up per split vs per source).

    python bench/prepare_sources.py [--sources 8] [--chats 200] [--workers 2] [--tokenizer sp|hf] [--repo DIR]

``--repo DIR`` runs another checkout's bft_megatron (e.g. a ``git worktree`` of an older commit) for a side-by-side
figure; the arrays it writes can be compared with ``cmp``. Prints the wall time of ``prepare.run`` and the output
directory.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sources", type=int, default=8)
    ap.add_argument("--chats", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--tokenizer", choices=("sp", "hf"), default="hf")
    ap.add_argument("--repo", default=ROOT)
    args = ap.parse_args()
    sys.path.insert(0, os.path.abspath(args.repo))
    from bft_megatron.config.data import DataConfig, SourceConfig
    from bft_megatron.data.prepare import run
    from tests.data_fixtures import DEMO_SP, hf_tokenizer, synthetic_chats, write_jsonl

    work = tempfile.mkdtemp(prefix="bft-prepare-sources-")
    sources = [SourceConfig(str(write_jsonl(Path(work, f"{i}.jsonl"), synthetic_chats(args.chats, seed=i))))
               for i in range(args.sources)]
    tok, template = (hf_tokenizer("llama31"), "llama3") if args.tokenizer == "hf" else (DEMO_SP, "chatml")
    out = os.path.join(work, "out")
    start = time.perf_counter()
    run(DataConfig(train=sources, tokenizer=tok, template=template, seq_length=1024, output_dir=out,
                   num_workers=args.workers))
    sys.stdout.write(f"{args.repo}: {args.sources} sources x {args.chats} chats, {args.tokenizer} tokenizer, "
                     f"{args.workers} workers: {time.perf_counter() - start:.2f} s -> {out}/train\n")


if __name__ == "__main__":
    main()
