"""Print one field of a config after overrides: ``python -m bft_megatron.config.show CONFIG FIELD [overrides]``.

Used by launch scripts (e.g. to find ``checkpoint.save``) so that they read the same config the trainer reads.
Values print as YAML spells them (``true``, a section or a list as a YAML block); an unset one as an empty line.
"""

from __future__ import annotations

import dataclasses
import difflib
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
            names = [f.name for f in dataclasses.fields(value)] if dataclasses.is_dataclass(value) else []
            close = difflib.get_close_matches(part, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            sys.stderr.write(f"config has no field {args[1]!r} (no {part!r}{hint})\n")
            return 2
        value = getattr(value, part)
    sys.stdout.write(render(value) + "\n")
    return 0


def render(value) -> str:
    """A field as YAML spells it: ``true``/``false``; a section or list as a YAML block; unset (None) as an
    empty string, which launch scripts test for."""
    import yaml

    from bft_megatron.config.base import format_value

    if value is None or isinstance(value, bool):
        return "" if value is None else format_value(value)
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    elif isinstance(value, list):  # data.train / data.valid: lists of SourceConfig
        value = [dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for v in value]
    if isinstance(value, (list, dict)):
        return yaml.safe_dump(value, sort_keys=False).rstrip("\n")
    return str(value)


if __name__ == "__main__":
    sys.exit(main())
