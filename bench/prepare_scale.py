"""Data preparation and the trainer's loader at scale, on CPU (docs/benchmarks.md, "Data preparation at scale").

    python bench/prepare_scale.py --rows 200000 [--workers 2] [--tokenizer hf|sp|DIR] [--profile]

1. writes ``--rows`` synthetic biomedical-style chats (system prompt on half, 1-4 user/assistant turns, lognormal
   answer lengths, ~1% longer than 4096 tokens) to ``WORK/chats.jsonl`` (kept and reused for the same --rows/--seed);
2. ``hf`` (default): trains a 32k byte-level BPE tokenizer with the Llama-3 special tokens on a sample of those
   chats (``WORK/tok``); ``sp``: the bundled demo sentencepiece model; or any tokenizer directory / .model;
3. runs ``bft-megatron prepare`` (packing, ``--seq-length``) in a child process: wall time, records/s, peak RSS
   of the largest process (the parent or one worker), size of the prepared split; ``--profile``: the same
   preparation in-process under cProfile instead (one worker), the top functions by own time;
4. the trainer-side loader: for ``--dp`` data-parallel ranks, the time to open the prepared split and build
   each rank's sampler (done in this process rank after rank, as each rank does it once), the peak RSS of a
   child process that opens one rank and fetches ``--batches`` micro-batches, and the time per micro-batch.

Nothing is asserted; the numbers are printed. ``--check-identical DIR``: compare the prepared arrays and
index.json with another prepared split (byte for byte, timings excluded).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SYSTEMS = ["You are a biomedical assistant. Answer questions about human phenotypes, genes and diseases using "
           "the Human Phenotype Ontology (HPO).", "You are a careful clinical geneticist. Be precise and cite genes.",
           "Answer briefly."]
GENES = ["ASPM", "MCPH1", "CDK5RAP2", "FXN", "GJB1", "BRCA1", "TP53", "CFTR", "DMD", "SCN1A", "MECP2", "FBN1"]


def _emit(text: str) -> None:
    sys.stdout.write(text + "\n")


def _vocab(rng: np.random.Generator, n: int = 6000) -> list[str]:
    syll = ["an", "ce", "pha", "ly", "ge", "ne", "ti", "ca", "my", "o", "path", "neu", "ro", "card", "io", "hyp",
            "er", "pla", "sia", "dys", "tro", "phy", "ax", "ia", "mi", "cro", "lep", "sy", "ndr", "ome", "the", "and"]
    words = {"".join(rng.choice(syll, size=rng.integers(1, 5))) for _ in range(n * 2)}
    common = "the of and a in is with to are by for which associated gene phenotype disease patients".split()
    return common * 40 + sorted(words)[:n] + GENES * 5 + [f"HP:{i:07d}" for i in range(3000, 3400)]


def generate(path: Path, rows: int, seed: int) -> None:
    """Synthetic chats, one JSON object a line; deterministic in (rows, seed)."""
    rng = np.random.default_rng(seed)
    vocab = _vocab(rng)
    words = np.asarray(vocab, dtype=object)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for lo in range(0, rows, 10000):
            n = min(10000, rows - lo)
            turns = rng.integers(1, 5, size=n)
            q_len = rng.integers(5, 60, size=(n, 4))
            a_len = np.minimum(rng.lognormal(4.8, 0.9, size=(n, 4)).astype(int) + 3, 6000)
            a_len[rng.random(n) < 0.003, 0] = 4000  # a few over seq_length 4096
            sys_pick = rng.integers(-3, 3, size=n)
            stream = words[rng.integers(0, len(words), size=int(q_len.sum() + a_len.sum()))].tolist()
            pos = 0
            for i in range(n):
                msgs = [{"role": "system", "content": SYSTEMS[sys_pick[i]]}] if sys_pick[i] >= 0 else []
                for t in range(turns[i]):
                    q = " ".join(stream[pos: pos + q_len[i, t]])
                    pos += q_len[i, t]
                    a = " ".join(stream[pos: pos + a_len[i, t]])
                    pos += a_len[i, t]
                    msgs += [{"role": "user", "content": f"Q{lo + i}.{t}: {q}?"},
                             {"role": "assistant", "content": a.capitalize() + "."}]
                fh.write(json.dumps({"messages": msgs}) + "\n")
    tmp.rename(path)


def build_tokenizer(out: Path, corpus: Path, vocab_size: int = 32000) -> str:
    """A byte-level BPE with the Llama-3 special tokens (llama3 template), trained on the first 20k chats."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if (out / "tokenizer.json").is_file():
        return str(out)
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    texts = []
    with corpus.open(encoding="utf-8") as fh:
        for _, line in zip(range(20000), fh):
            texts += [m["content"] for m in json.loads(line)["messages"]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                            eos_token="<|eot_id|>").save_pretrained(str(out))
    return str(out)


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def prepare(args: argparse.Namespace, src: Path, tok: str, out: Path) -> None:
    template = "llama3" if Path(tok).is_dir() else "chatml"
    cmd = [sys.executable, "-m", "bft_megatron.cli", "prepare", "--input", str(src), "--tokenizer", tok,
           "--template", template, "--seq-length", str(args.seq_length), "--packing", "true",
           "--output", str(out), "--num-workers", str(args.workers), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"prepare failed:\n{proc.stderr[-3000:]}")
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # the prepare process and its workers
    peak, cpu = usage.ru_maxrss / 2**20, usage.ru_utime + usage.ru_stime
    _emit(proc.stdout.strip())
    index = json.loads((out / "train" / "index.json").read_text())
    _emit(f"prepare: {args.rows} records in {wall:.1f} s wall = {args.rows / wall:.0f} rec/s, "
          f"{index['num_tokens'] / wall:.0f} tok/s; CPU {cpu:.1f} s = {cpu / args.rows * 1e3:.2f} ms/record; "
          f"{index['num_rows']} rows, {index['num_samples']} samples, "
          f"{index['num_tokens']} tokens; peak RSS (largest process) {peak:.2f} GiB; "
          f"output {_du(out / 'train') / 2**20:.0f} MiB (source {src.stat().st_size / 2**20:.0f} MiB); "
          f"workers={args.workers}, tokenizer={'hf' if template == 'llama3' else 'sp'}")


def profile(args: argparse.Namespace, src: Path, tok: str, out: Path) -> None:
    sys.path.insert(0, str(REPO))
    from bft_megatron.config.data import DataConfig, SourceConfig
    from bft_megatron.data.prepare import run

    cfg = DataConfig(train=[SourceConfig(path=str(src))], tokenizer=tok, seq_length=args.seq_length,
                     template="llama3" if Path(tok).is_dir() else "chatml", output_dir=str(out), num_workers=1)
    prof = cProfile.Profile()
    start = time.perf_counter()
    prof.runcall(run, cfg)
    _emit(f"profiled prepare: {time.perf_counter() - start:.1f} s (under cProfile)")
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
    _emit(text.getvalue())


LOADER_CHILD = """
import os, resource, sys, time
from bft_megatron.data.loader import BatchLoader
def disk_read():
    with open("/proc/self/io") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("read_bytes"))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
directory, gbs, dp, rank, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
for name in os.listdir(directory):  # a cold page cache for the split (clean pages can be dropped)
    fd = os.open(os.path.join(directory, name), os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
read0 = disk_read()
t0 = time.perf_counter()
loader = BatchLoader(directory, global_batch_size=gbs, micro_batch_size=1, dp_rank=rank, dp_size=dp, seed=1)
it = iter(loader)
next(it)
t1 = time.perf_counter()
for _ in range(n):
    next(it)
t2 = time.perf_counter()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
rows = (n + 1) * loader.sampler.mbs
row_mib = rows * loader.dataset.seq_length * 5 / 2**20  # int32 tokens + uint8 mask
sys.stdout.write(f"{t1 - t0:.4f} {(t2 - t1) / n * 1e3:.3f} {base / 2**10:.0f} {peak / 2**10:.0f} "
                 f"{(disk_read() - read0) / 2**20:.1f} {row_mib:.1f}\\n")
"""


def loader(args: argparse.Namespace, directory: Path) -> None:
    sys.path.insert(0, str(REPO))
    from bft_megatron.data.loader import BatchLoader

    gbs = args.dp * 4
    opens = []
    for rank in range(args.dp):  # each rank's own work, one after another
        t0 = time.perf_counter()
        ld = BatchLoader(str(directory), global_batch_size=gbs, micro_batch_size=1, dp_rank=rank, dp_size=args.dp,
                         seed=1)
        next(iter(ld))
        opens.append(time.perf_counter() - t0)
    _emit(f"loader: DP={args.dp}, gbs={gbs}, mbs=1: open + sampler + first micro-batch per rank: median "
          f"{np.median(opens) * 1e3:.1f} ms, max {max(opens) * 1e3:.1f} ms (all {args.dp} ranks: {sum(opens):.2f} s)")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rank = min(7, args.dp - 1)
    res = subprocess.run([sys.executable, "-c", LOADER_CHILD, str(directory), str(gbs), str(args.dp), str(rank),
                          str(args.batches)], env=env, capture_output=True, text=True, check=True)
    first, per_batch, base, peak, read, rows = res.stdout.split()
    _emit(f"loader (one rank, fresh process): first micro-batch after {float(first) * 1e3:.1f} ms, then "
          f"{per_batch} ms per micro-batch ({args.batches} fetched); RSS {base} MiB after imports, peak {peak} MiB "
          f"(+{int(peak) - int(base)} MiB, memory-mapped pages included); from a cold page cache it read {read} MiB "
          f"from disk for at most {rows} MiB of rows")


def check_identical(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir() if p.suffix == ".npy")
    same = [(a / n).read_bytes() == (b / n).read_bytes() for n in names]
    ia, ib = (json.loads((d / "index.json").read_text()) for d in (a, b))
    for d in (ia, ib):
        for s in d["sources"]:
            for f in s.get("files", []):
                f.pop("mtime_ns")
        d["tokenizer"].pop("path")
    _emit(f"identical arrays: {dict(zip(names, same))}; index.json equal: {ia == ib}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=200000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--tokenizer", default="hf", help="hf (a trained 32k BPE), sp (the demo model), or a path")
    p.add_argument("--work", default="/tmp/bft-prepare-scale", help="where data, tokenizer and output go")
    p.add_argument("--output", help="prepared output directory (default WORK/prepared-ROWS)")
    p.add_argument("--profile", action="store_true", help="cProfile the preparation in-process instead")
    p.add_argument("--dp", type=int, default=64)
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--skip-prepare", action="store_true", help="measure the loader on an existing output")
    p.add_argument("--check-identical", help="a prepared train/ directory to compare the output with")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    src = work / f"chats-{args.rows}-{args.seed}.jsonl"
    if not src.is_file():
        t0 = time.perf_counter()
        generate(src, args.rows, args.seed)
        _emit(f"generated {src} ({src.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t0:.1f} s")
    tok = {"hf": lambda: build_tokenizer(work / "tok", _corpus(work)),
           "sp": lambda: str(REPO / "bft_megatron/data/assets/hpo_sp.model")}.get(args.tokenizer,
                                                                                 lambda: args.tokenizer)()
    out = Path(args.output or work / f"prepared-{args.rows}")
    if args.profile:
        profile(args, src, tok, out)
    elif not args.skip_prepare:
        prepare(args, src, tok, out)
    if args.check_identical:
        check_identical(out / "train", Path(args.check_identical))
    if not args.profile:
        loader(args, out / "train")


def _corpus(work: Path) -> Path:
    """The tokenizer's training text is always the same 20k chats, whatever --rows is."""
    src = work / "chats-20000-0.jsonl"
    if not src.is_file():
        generate(src, 20000, 0)
    return src


if __name__ == "__main__":
    main()
