"""``bft-megatron prepare``: tokenize, mask and pack chat data once, into a memory-mapped directory.

Usage::

    bft-megatron prepare --config configs/data_demo.yaml [--output DIR] [--num-workers N]
    bft-megatron prepare --input a.jsonl [--input b.jsonl:2.0] --tokenizer tok.model --output DIR
    bft-megatron prepare --valid held_out.jsonl --tokenizer tok.model --output DIR   # valid/ alone (--eval-only)

The YAML's top-level ``data:`` section is a DataConfig; flags given on the command line override it. A split
already prepared in the output directory from the same sources (by content), tokenizer and settings is kept
(``up to date``); ``--force`` rebuilds it.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from typing import Any

from bft_megatron.config.data import TEMPLATES, DataConfig, SourceConfig, data_config_from_dict
from bft_megatron.data.errors import DataError
from bft_megatron.data.pipeline import available_cores, prepare_all
from bft_megatron.data.split_stats import SplitStats
from bft_megatron.utils.cli_text import plain
from bft_megatron.utils.logging import get_logger

log = get_logger(__name__)

NOTABLE_SHARE = 0.05  # a larger share of samples truncated, dropped or skipped is warned about
SLOW_SECONDS = 120.0  # a split that took longer on one worker gets a data.num_workers hint
_LENGTH_HINTS = {
    "truncated": "longer than data.seq_length={L} and truncated (data.truncation=truncate): raise data.seq_length "
                 "to keep them whole, or set data.truncation=drop to leave them out",
    "dropped_too_long": "longer than data.seq_length={L} and dropped (data.truncation=drop): raise data.seq_length "
                        "to keep them, or set data.truncation=truncate",
    "dropped_no_supervision": "dropped because truncation to data.seq_length={L} left no supervised token: raise "
                              "data.seq_length",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bft-megatron prepare", description=plain(__doc__.split("\n\n")[0]))
    d = DataConfig()  # the defaults a flag (or --config key) left out takes
    p.add_argument("--config", help="YAML file whose top-level 'data:' section is a DataConfig")
    p.add_argument("--input", action="append", help="training source: path[:weight] (repeatable; none, in the flags "
                                                     "and --config: only the validation split is prepared)")
    p.add_argument("--valid", action="append", help="validation source: path[:weight] (repeatable; alone, for "
                                                     "`bft-megatron train --eval-only`)")
    p.add_argument("--tokenizer", help="HF tokenizer directory or sentencepiece .model")
    p.add_argument("--output", help="output directory")
    p.add_argument("--template", choices=TEMPLATES, help=f"chat template (default {d.template}; docs/data.md)")
    p.add_argument("--seq-length", type=int, help=f"tokens per row (default {d.seq_length})")
    p.add_argument("--packing", choices=("true", "false"), help=f"pack samples into rows (default "
                                                               f"{str(d.packing).lower()})")
    p.add_argument("--truncation", choices=("truncate", "drop"), help=f"samples longer than a row (default "
                                                                     f"{d.truncation})")
    p.add_argument("--on-error", choices=("raise", "skip"), help=f"an invalid record (default {d.on_error})")
    p.add_argument("--supervise", choices=("all", "last"), help=f"which answers are trained (default {d.supervise})")
    p.add_argument("--reasoning-format", help="how a reasoning field joins its answer, with {reasoning} and {answer} "
                                              "(default: '<think>\\n{reasoning}\\n</think>\\n\\n{answer}'; in bash "
                                              "write newlines as $'...\\n...')")
    p.add_argument("--seed", type=int, help=f"subsampling and packing order (default {d.seed})")
    p.add_argument("--num-workers", type=int, help=f"tokenization processes (default {d.num_workers})")
    p.add_argument("--force", action="store_true", help="rebuild a split even when the one prepared in the output "
                                                         "directory is up to date (same sources, tokenizer, settings)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar (or, when stderr is not a "
                                                                  "terminal, the progress log lines)")
    return p


def load_config(path: str | None) -> DataConfig:
    if not path:
        return DataConfig()
    from bft_megatron.config.base import load_yaml

    raw = load_yaml(path)  # a missing file or bad YAML syntax: ConfigError naming the file and line
    if "data" not in raw:
        raise ValueError(f"{path}: expected a top-level 'data:' section")
    return data_config_from_dict(raw["data"] or {})


# DataConfig field -> the flag that sets it (argparse dest = the flag without dashes, '-' as '_')
FLAGS = {"train": "--input", "valid": "--valid", "tokenizer": "--tokenizer", "output_dir": "--output",
         "template": "--template", "seq_length": "--seq-length", "packing": "--packing", "truncation": "--truncation",
         "on_error": "--on-error", "supervise": "--supervise", "reasoning_format": "--reasoning-format",
         "seed": "--seed", "num_workers": "--num-workers"}


def _apply_flags(cfg: DataConfig, args: argparse.Namespace) -> DataConfig:
    for attr, flag in FLAGS.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is None:
            continue
        if attr in ("train", "valid"):  # append actions: a non-empty list
            value = [SourceConfig.from_str(s) for s in value]
        elif attr == "packing":
            value = value == "true"
        setattr(cfg, attr, value)
    return cfg


def format_summary(cfg: DataConfig, results: dict[str, SplitStats]) -> str:
    done = "up to date:" if all(st.reused for st in results.values()) else "prepared"
    lines = [f"{done} {cfg.output_dir} (seq_length={cfg.seq_length}, packing={cfg.packing}, "
             f"template={cfg.template}, supervise={cfg.supervise})"]
    for split, st in results.items():
        rate = st.encoded_tokens / st.seconds if st.seconds > 0 else 0.0
        skipped = ", ".join(f"{k}={v}" for k, v in sorted(st.skips.counts.items())) or "0"
        lines += [
            f"[{split}] records={st.records} samples={st.samples} rows={st.rows} tokens={st.tokens} "
            f"supervised_tokens={st.supervised_tokens}",
            f"[{split}] packing_efficiency={st.packing_efficiency:.2%} truncated={st.length['truncated']} "
            f"dropped_too_long={st.length['dropped_too_long']} "
            f"dropped_no_supervision={st.length['dropped_no_supervision']} skipped={skipped}",
            f"[{split}] up to date: kept as prepared before from the same sources, tokenizer and settings "
            "(--force rebuilds it)" if st.reused else
            f"[{split}] tokenized {st.records} records in {st.seconds:.2f}s "
            f"({st.records / max(st.seconds, 1e-9):.0f} rec/s, {rate:.0f} tok/s, workers={cfg.num_workers})",
        ]
        lines += [f"[{split}]   skipped: {e}" for e in st.skips.examples]
    return "\n".join(lines) + "\n"


def preparation_warnings(cfg: DataConfig, results: dict[str, SplitStats]) -> list[str]:
    """One line per notable loss: samples truncated or dropped by the length policy, records skipped."""
    out = []
    cores = available_cores()
    for split, st in results.items():
        total = sum(st.length.values())  # samples that reached the length policy
        for key, hint in _LENGTH_HINTS.items():
            n = st.length[key]
            if n and n >= NOTABLE_SHARE * total:
                out.append(f"[{split}] {n} of {total} samples ({n / total:.1%}) were {hint.format(L=cfg.seq_length)}")
        skipped = st.skips.total
        if skipped and skipped >= NOTABLE_SHARE * st.records:
            where = ("the split was kept, and its index.json records only their counts: --force rebuilds it "
                     "naming the first ones" if st.reused else "the summary names the first ones")
            out.append(f"[{split}] {skipped} of {st.records} records ({skipped / st.records:.1%}) were skipped as "
                       f"unusable (data.on_error=skip); {where}")
        if st.special_text:
            out.append(_special_text_warning(split, st))
        if cfg.num_workers == 1 and st.seconds >= SLOW_SECONDS and cores > 1:
            out.append(f"[{split}] preparing {st.records} records took {st.seconds:.0f} s in one process: "
                       f"data.num_workers={min(cores, 16)} tokenizes on {min(cores, 16)} of this machine's {cores} "
                       "cores (the output is byte-identical)")
    return out


def _special_text_warning(split: str, st: SplitStats) -> str:
    first = f" (first: {'; '.join(st.special_examples)})" if st.special_examples else ""
    return (f"[{split}] {st.special_text} of {sum(st.length.values())} samples hold the tokenizer's control-token "
            f"text in a message{first}; it is encoded as that control token, as "
            "the chat template would: inside an answer the model learns to stop there, inside a question it forges a "
            "turn. Remove it from the data unless it is meant as markup")


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    cfg, start = None, time.time()
    try:
        cfg = _apply_flags(load_config(args.config), args)
        # The config's own messages would name data.* fields ("train=[]: needs at least one source"), not the flags.
        if not (cfg.train or cfg.valid):
            raise ValueError("no data: pass --input PATH[:WEIGHT] for the training split and/or --valid PATH[:WEIGHT] "
                             "for the validation split (alone: valid/ only, for bft-megatron train --eval-only), or "
                             "list data.train in --config or data.valid in --config")
        if not cfg.tokenizer:
            raise ValueError("no tokenizer: pass --tokenizer (an HF tokenizer directory or a sentencepiece .model; "
                             "or set data.tokenizer in --config)")
        if not cfg.output_dir:
            raise ValueError("no output directory: pass --output DIR (or set data.output_dir in --config)")
        cfg.validate()
        results = prepare_all(cfg, progress=not args.no_progress, reuse=not args.force)
    except (DataError, ValueError, FileNotFoundError) as err:
        # the data layer's hints name config keys ("raise data.seq_length"); this command's own errors name both
        log.error("prepare failed: %s", as_flags(str(err)))
        return 2
    except KeyboardInterrupt:  # staging and scratch are removed on the way out; a published split is kept
        log.error("prepare interrupted: %s", _published_since(cfg.output_dir if cfg else "", start))
        return 130
    sys.stdout.write(format_summary(cfg, results))
    for warning in preparation_warnings(cfg, results) + _stale_split_warnings(cfg, results):
        log.warning("%s", as_flags(warning))
    return 0


def _published_since(output_dir: str, start: float) -> str:
    """Which splits this run published before it was interrupted (train is done before valid begins)."""
    from bft_megatron.data.storage import INDEX

    # by its arrays' age: a kept split's index.json may have been rewritten (the new mtimes or paths it records)
    done = [split for split in ("train", "valid") if os.path.isfile(os.path.join(output_dir, split, INDEX))
            and os.path.isfile(tokens := os.path.join(output_dir, split, "tokens.npy"))
            and os.stat(tokens).st_mtime >= start]
    if not done:
        return "no split was published (one prepared before is kept as it was)"
    return f"{' and '.join(done)} {'was' if len(done) == 1 else 'were'} published before it; the rest was not"


def as_flags(text: str) -> str:
    """The shared warnings name config keys (``data.truncation=drop``, the trainer's spelling); this command's
    user passes flags (``--truncation drop``), which override --config's keys as well. Not inside a path or file
    name (``runs/data.seed.yaml``), not where the key is meant (``set data.tokenizer in --config``), and not an
    indexed source (``data.train[0]``, a YAML path: ``--input[0]`` is no flag)."""
    text = re.sub(r"(?<![\w./-])data\.(\w+)=(\S+?)(?=[,):]|\s|$)",
                  lambda m: f"{FLAGS[m[1]]} {m[2]}" if m[1] in FLAGS else m[0], text)
    return re.sub(r"(?<![\w./-])data\.(\w+)(?![.\w\[])(?! in --config)", lambda m: FLAGS.get(m[1], m[0]), text)


def _stale_split_warnings(cfg: DataConfig, results: dict[str, SplitStats]) -> list[str]:
    """A split this run did not write (no --valid, or --valid alone) but an earlier one left in the output directory:
    the trainer reads it beside the new one, and refuses it if it was prepared otherwise (provenance.splits_disagree;
    an evaluation of data.valid alone opens valid/ only)."""
    from bft_megatron.data.provenance import splits_disagree
    from bft_megatron.data.storage import is_prepared, read_index

    train, valid = os.path.join(cfg.output_dir, "train"), os.path.join(cfg.output_dir, "valid")
    if "valid" in results and "train" not in results and is_prepared(train):
        problem = splits_disagree(cfg.output_dir, read_index(train), read_index(valid))
        return [f"{problem}\nTraining refuses this directory until then (train --eval-only with data.valid alone "
                "evaluates on valid/)."] if problem else []
    if "train" not in results or "valid" in results or not is_prepared(valid):
        return []
    problem = splits_disagree(cfg.output_dir, read_index(train), read_index(valid))
    if problem:  # names both values and the way out; the trainer raises with the same text
        return [f"{problem}\nThe trainer refuses this directory until then."]
    beside = "the kept" if results["train"].reused else "the new"
    return [f"{valid} was kept from an earlier preparation (same template, supervise, reasoning format and "
            f"tokenizer): the trainer validates on it beside {beside} train/ split; pass --valid to rebuild it too, "
            f"or delete it to train without validation"]


def run(cfg: DataConfig, progress: bool | str = False, splits: list[str] | None = None) -> dict[str, Any]:
    """Library entry point (trainer, tests, notebooks): validate and prepare (only ``splits`` when
    given), return per-split stats."""
    cfg.validate()
    return prepare_all(cfg, progress=progress, splits=splits)
