"""Generic typed-config machinery: dataclasses <- YAML dicts, dotted CLI overrides, strict keys.

* :func:`from_dict` builds a (nested) dataclass from a mapping, rejecting unknown keys with an
  error naming the key and its section (``unknown key 'lrr' in section 'train'``).
* :func:`parse_override` / :func:`apply_overrides` turn ``a.b=c`` strings into nested dicts, the
  value parsed against the field's declared type (``train.lr=1e-4`` -> float, ``parallel.vp=null``
  -> None, ``train.bf16=false`` -> bool).
* :func:`to_dict` is the inverse (for logging and checkpoint metadata).

Supported field types: bool, int, float, str, ``Literal[...]``, ``X | None``, nested dataclasses,
``list[X]`` and ``dict``. No third-party schema library. Three shorthands: a single value where a list is
expected is a one-element list (``train: a.jsonl``; null is an empty list), a string where a dataclass
is expected goes to the dataclass's ``from_str`` if it has one (``SourceConfig.from_str(path)``), and null
where a (non-optional) dataclass is expected is that section with all defaults (``train:`` left empty; an
optional one, ``X | None``, stays None). A dotted override cannot reach inside a list (``data.train.path=x``
is an error: set ``data.train`` whole). :func:`non_finite_floats` lists inf/nan float fields (for validation).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Literal, Union

import yaml

__all__ = ["ConfigError", "unwrap_optional", "from_dict", "to_dict", "parse_override", "apply_overrides", "load_yaml",
           "non_finite_floats"]


class ConfigError(ValueError):
    """A config that cannot be loaded or is invalid; the message names the field and value."""


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def unwrap_optional(tp) -> tuple[Any, bool]:
    """(T, True) for ``T | None`` / ``Optional[T]``; (tp, False) otherwise."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert one value against a declared type; ``where`` is ``section.field`` for errors."""
    inner, optional = unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        if typing.get_origin(inner) is list or inner is list:
            return []  # `valid:` left empty in YAML
        if dataclasses.is_dataclass(inner):
            return from_dict(inner, {}, where)  # `train:` left empty in YAML: a section of defaults
        raise ConfigError(f"{where} must not be null")
    if dataclasses.is_dataclass(inner):
        if isinstance(value, inner):
            return value
        if isinstance(value, str) and hasattr(inner, "from_str"):
            return inner.from_str(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return from_dict(inner, value, where)
    if typing.get_origin(inner) is Literal:
        choices = typing.get_args(inner)
        if value not in choices:
            raise ConfigError(f"{where} must be one of {list(choices)}, got {value!r}")
        return value
    if inner is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if inner is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if inner is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where} must be a number, got {value!r}")
    if inner is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where} must be a string, got {value!r}")
    if typing.get_origin(inner) is list or inner is list:
        if not isinstance(value, list):
            value = [value]  # shorthand: one item (a scalar or one mapping)
        args = typing.get_args(inner)
        return [_coerce(v, args[0], f"{where}[{i}]") if args else v for i, v in enumerate(value)]
    if inner is dict or typing.get_origin(inner) is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ConfigError(f"{where} must be a mapping, got {value!r}")
    return value


def from_dict(cls, data: dict | None, section: str = ""):
    """Build dataclass ``cls`` from ``data``; unknown keys and bad types raise :class:`ConfigError`."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"section {section or cls.__name__!r} must be a mapping, got {data!r}")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in names:
            raise ConfigError(_unknown_key(key, section or "<top>", names, None if section else hints))
    kwargs = {k: _coerce(v, hints[k], f"{section}.{k}" if section else k) for k, v in data.items()}
    return cls(**kwargs)


def _field_names(tp) -> set[str]:
    """The fields of dataclass type ``tp`` (optional or not); none for other types."""
    inner, _ = unwrap_optional(tp)
    return {f.name for f in dataclasses.fields(inner)} if dataclasses.is_dataclass(inner) else set()


def _unknown_key(key: str, section: str, names: set[str], sections: dict | None = None) -> str:
    """``unknown key 'lrr' in section 'train' (did you mean 'lr'?); valid keys: ...``

    ``sections`` (the top level's type hints): a key given without its section (``lr=1e-4``) is pointed to the
    sections that have it (``did you mean 'train.lr'?``)."""
    qualified = [f"{name}.{key}" for name, tp in (sections or {}).items() if key in _field_names(tp)]
    close = qualified or difflib.get_close_matches(str(key), sorted(names), n=1)
    hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
    return f"unknown key {key!r} in section {section!r}{hint}; valid keys: {', '.join(sorted(names))}"


def format_value(value: Any) -> str:
    """A config value as YAML and the CLI spell it (true/false/null), for messages that name values."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    return str(value)


def to_dict(obj) -> dict:
    """Dataclass -> plain nested dict (YAML/JSON-serialisable)."""
    return dataclasses.asdict(obj)


def non_finite_floats(obj, where: str = "") -> list[tuple[str, float]]:
    """``(dotted name, value)`` of every inf/nan float in ``obj`` (dataclasses and lists, recursively).

    No float field has a meaning for inf or nan (null is how a field is switched off), and a range check such as
    ``lr > 0`` lets inf through; one check here covers every field, present and future."""
    if dataclasses.is_dataclass(obj):
        return [bad for f in dataclasses.fields(obj)
                for bad in non_finite_floats(getattr(obj, f.name), f"{where}.{f.name}" if where else f.name)]
    if isinstance(obj, list):
        return [bad for i, item in enumerate(obj) for bad in non_finite_floats(item, f"{where}[{i}]")]
    if isinstance(obj, float) and not math.isfinite(obj):
        return [(where, obj)]
    return []


def _field_type(cls, path: list[str]):
    """Declared type of the dotted ``path`` inside dataclass ``cls`` (None if unknown)."""
    tp = cls
    for i, name in enumerate(path):
        inner, _ = unwrap_optional(tp)
        if not dataclasses.is_dataclass(inner):
            if typing.get_origin(inner) is list or inner is list:
                whole = ".".join(path[:i])
                raise ConfigError(f"override {'.'.join(path)!r}: {whole} is a list; set it as a whole, e.g. "
                                  f"{whole}=[a.jsonl,b.jsonl]")
            return None
        hints = _hints(inner)
        if name not in hints:
            raise ConfigError(f"override {'.'.join(path)!r}: "
                              + _unknown_key(name, ".".join(path[:i]) or "<top>", set(hints), None if i else hints))
        tp = hints[name]
    return tp


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """One line for a YAML syntax error: what, where (1-based line and column), and where the construct began."""
    if not isinstance(exc, yaml.MarkedYAMLError) or exc.problem_mark is None:
        return " ".join(str(exc).split())
    mark, start = exc.problem_mark, exc.context_mark
    text = f"line {mark.line + 1}, column {mark.column + 1}: {exc.problem}"
    if exc.context:
        began = f" at line {start.line + 1}, column {start.column + 1}" if start is not None else ""
        text += f" ({exc.context}{began})"
    return text


def _parse_scalar(text: str, tp) -> Any:
    """Parse a CLI value: YAML scalar syntax, but keep strings for str fields (``name=1e3`` stays text)."""
    inner, optional = unwrap_optional(tp) if tp is not None else (None, False)
    if optional and text.lower() in ("null", "none", "~"):
        return None
    literal_str = typing.get_origin(inner) is Literal and all(isinstance(c, str) for c in typing.get_args(inner))
    if inner is str or literal_str:
        return text
    if inner is float:
        if text.lower() in ("null", "~"):  # as YAML reads it for the other types (not the text 'null')
            return None
        try:
            return float(text)
        except ValueError:
            return text
    return yaml.safe_load(text)


def parse_override(item: str, cls) -> tuple[list[str], Any]:
    """``"train.lr=1e-4"`` -> (["train", "lr"], 1e-4) typed against ``cls``."""
    if "=" not in item:
        hint = f" (a config file? pass it as --config {item})" if item.endswith((".yaml", ".yml")) else ""
        raise ConfigError(f"override {item!r} must look like section.key=value{hint}")
    key, text = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"override {item!r} has an empty key")
    tp = _field_type(cls, path)
    try:
        return path, _parse_scalar(text.strip(), tp)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({_yaml_problem(exc)}); close every "
                          f"bracket and quote, e.g. {key.strip()}=[a.jsonl,b.jsonl]") from None


def apply_overrides(data: dict, overrides: list[str], cls) -> dict:
    """Return a copy of ``data`` with every ``a.b=c`` override applied (later ones win)."""
    out = yaml.safe_load(yaml.safe_dump(data)) if data else {}
    for item in overrides:
        path, value = parse_override(item, cls)
        node = out
        for name in path[:-1]:
            if not isinstance(node.get(name), dict):
                node[name] = {}
            node = node[name]
        node[path[-1]] = value
    return out


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key, first: int, second: int) -> None:
        super().__init__(f"key {key!r} appears twice (lines {first} and {second})")


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key repeated in one mapping: PyYAML keeps the last silently, so a second
    ``train:`` section replaced the whole first one (its ``lr`` and ``train_iters`` back to their defaults) while
    a misspelt key is an error. Keys merged in with ``<<`` may still be overridden, as YAML means them to be."""

    def __init__(self, stream) -> None:
        super().__init__(stream)
        self._checked: set[int] = set()  # ids of the mapping nodes already checked

    def flatten_mapping(self, node) -> None:
        # Checked here, before PyYAML copies merged keys into the node (in place: a mapping that merges another is
        # flattened once, possibly as a deeper node's merge source, before its own construction).
        if id(node) not in self._checked:
            self._checked.add(id(node))
            self._refuse_duplicates(node)
        super().flatten_mapping(node)

    def _refuse_duplicates(self, node) -> None:
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise _DuplicateKey(key, seen[key], line)
            seen[key] = line


def load_yaml(path: str) -> dict:
    """A YAML file's top-level mapping; a missing or unreadable file, bad YAML syntax and a key given twice in one
    mapping raise :class:`ConfigError` naming the file (and the line)."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.load(fh, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as exc:
        raise ConfigError(f"config file {path}: {exc}; the second would silently replace the first, so merge "
                          "them into one") from None
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path}: invalid YAML at {_yaml_problem(exc)}; indent with spaces (no "
                          "tabs) and close every bracket and quote") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data
