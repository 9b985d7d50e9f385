"""``bft-megatron convert import|export``: HF safetensors <-> megatron dist checkpoints.

    bft-megatron convert import --hf HF_DIR --out CKPT [--low-memory] [--no-progress]
    bft-megatron convert export --ckpt CKPT --out HF_DIR [--tokenizer TOK] [--hf SRC_HF_DIR] [--max-shard-size 5GB]
                                [--dtype bf16] [--no-progress]

Both run as a single process (no torchrun needed) and show progress bars on stderr counted in bytes of tensors
(as ``bft-megatron prepare``, also when stderr is not a terminal; ``--no-progress`` hides them).
See docs/convert.md.
"""

from __future__ import annotations

import argparse
import re

import torch
from torch.distributed.checkpoint.api import CheckpointException

from bft_megatron.utils.cli_text import plain
from bft_megatron.utils.logging import get_logger

__all__ = ["main", "parse_size"]

_log = get_logger(__name__)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}


def parse_size(text: str) -> int:
    """``"5GB"`` / ``"500MiB"`` / ``"1000000"`` -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"bad size {text!r}; use e.g. 5GB, 500MiB or a byte count")
    size = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if size < 1:  # the exporter would refuse it only after finding the tokenizer, naming max_shard_bytes
        raise argparse.ArgumentTypeError(f"bad size {text!r}: a shard must hold at least 1 byte; use e.g. 5GB")
    return size


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bft-megatron convert", description=plain(__doc__.split("\n\n")[0]))
    sub = parser.add_subparsers(dest="direction", required=True, metavar="{import,export}")
    imp = sub.add_parser("import", help="HF safetensors directory -> megatron dist checkpoint (run directory)",
                         description="Import an HF model (Llama-3.x, Qwen2.x, Qwen3, Mistral, Phi3) as a megatron "
                         "dist checkpoint that trains at any TP/PP (docs/convert.md).")
    imp.add_argument("--hf", required=True, help="HF model directory (config.json + safetensors)")
    imp.add_argument("--out", required=True, help="output run directory (gets latest, iter_0000000/, hf/)")
    imp.add_argument("--low-memory", action="store_true",
                     help="spill each layer's transformed tensors (QKV, fc1) to OUT/.import_spill and memory-map them: "
                          "about one layer of resident host memory, for ~65%% of the model's size in temporary disk")
    imp.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    exp = sub.add_parser("export", help="megatron dist checkpoint -> HF safetensors directory",
                         description="Export a checkpoint (any TP/PP) as an HF model folder: safetensors, config.json, "
                         "the training tokenizer and chat template, generation_config.json (docs/convert.md).")
    exp.add_argument("--ckpt", required=True, help="run directory (uses 'latest'), iter_ directory or dist checkpoint")
    exp.add_argument("--out", required=True, help="output HF directory")
    exp.add_argument("--tokenizer", default=None,
                     help="HF tokenizer directory or sentencepiece .model to ship (default: the checkpoint's own "
                          "iter_N/hf/ copy, else the run's data.tokenizer, else --hf, the import's hf/ or "
                          "model.from_hf; docs/convert.md)")
    exp.add_argument("--hf", default=None, help="HF model directory for config.json (and the tokenizer if none "
                                                "is found otherwise)")
    exp.add_argument("--max-shard-size", type=parse_size, default="5GB", help="per-file size limit (default 5GB)")
    exp.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="cast weights (default: keep)")
    exp.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv: list[str]) -> int:
    """Exit code 0 on success, 2 on a bad input (message logged, no traceback)."""
    args = _parser().parse_args(argv)
    from bft_megatron.utils.logging import quiet_known_warnings

    quiet_known_warnings()
    from megatron.core.dist_checkpointing.core import CheckpointingException

    try:
        if args.direction == "import":
            from bft_megatron.convert.importer import import_hf

            import_hf(args.hf, args.out, low_memory=args.low_memory, progress=not args.no_progress)
        else:
            from bft_megatron.convert.exporter import export_checkpoint

            export_checkpoint(args.ckpt, args.out, hf_dir=args.hf, max_shard_bytes=args.max_shard_size,
                              dtype=_DTYPES[args.dtype] if args.dtype else None, tokenizer=args.tokenizer,
                              progress=not args.no_progress)
    except (ValueError, KeyError, FileNotFoundError, FileExistsError) as exc:  # ConfigError is a ValueError
        _log.error("convert %s failed: %s", args.direction, exc)
        return 2
    except (CheckpointException, CheckpointingException) as exc:  # torch's is a BaseException: it escaped (exit 1)
        _log.error("convert %s failed: %s cannot be read (%s): a file of the checkpoint is missing or damaged (an "
                   "interrupted copy, or a save that was not complete?)", args.direction, args.ckpt, _cause(exc))
        return 2
    return 0


def _cause(exc: BaseException) -> str:
    """The first rank's error inside torch's CheckpointException (whose own text is every rank's traceback), or
    megatron's CheckpointingException's message."""
    wrapped = next(iter((getattr(exc, "failures", None) or {}).values()), None)
    if wrapped is None:
        return f"{type(exc).__name__}: {exc}"
    error = wrapped[0] if isinstance(wrapped, tuple) else wrapped
    return f"{type(error).__name__}: {error}"
