"""Print one field of a config after overrides: ``python -m bft_megatron.config.show CONFIG FIELD [overrides]``.

Used by launch scripts (e.g. to find ``checkpoint.save``) so that they read the same config the trainer reads.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2:
        sys.stderr.write("usage: python -m bft_megatron.config.show CONFIG FIELD [a.b=c ...]\n")
        return 2
    from bft_megatron.config.schema import load_config

    try:
        value = load_config(args[0], args[2:])
    except ValueError as exc:  # ConfigError: a missing file, bad YAML, an unknown key, a mistyped value
        sys.stderr.write(f"config error: {exc}\n")
        return 2
    for part in args[1].split("."):
        if not hasattr(value, part):
            sys.stderr.write(f"config has no field {args[1]!r} (no {part!r})\n")
            return 2
        value = getattr(value, part)
    sys.stdout.write(("" if value is None else str(value)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
