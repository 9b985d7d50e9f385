"""The ``bft-megatron`` console entry point: one command, one subcommand per job.

Subcommands register themselves lazily (module path + function) so that ``bft-megatron --help``
does not import torch or megatron.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, function, one-line help). Each function takes the remaining argv list.
SUBCOMMANDS: dict[str, tuple[str, str, str]] = {}


def register(name: str, module: str, func: str, help_text: str) -> None:
    SUBCOMMANDS[name] = (module, func, help_text)


register("train", "bft_megatron.train", "main", "fine-tune a model (launch with torchrun)")
register("prepare", "bft_megatron.data.prepare", "main", "tokenize, mask and pack chat data to disk")
register("show-data", "bft_megatron.data.show", "main", "print prepared samples with the supervised tokens marked")
register("convert", "bft_megatron.convert.cli", "main", "import/export Hugging Face checkpoints")
register("plan", "bft_megatron.config.plan", "main", "estimate memory and throughput for a config")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="bft-megatron", description="Balanced Fine-Tuning on Megatron-core.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, _, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    if argv[0] not in SUBCOMMANDS:
        parser.error(f"unknown command {argv[0]!r}; choose from {', '.join(SUBCOMMANDS)}")
    module, func, _ = SUBCOMMANDS[argv[0]]
    try:
        entry = getattr(importlib.import_module(module), func)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("bft_megatron"):
            parser.error(f"command {argv[0]!r} is not available in this build ({exc.name} missing)")
        raise
    result = entry(argv[1:])
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
