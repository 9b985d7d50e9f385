"""Configuration of the data layer: which sources to read, how to tokenize, mask and pack them.

Plain dataclasses of simple types, built by the generic loader (:mod:`bft_megatron.config.base`:
unknown-key rejection, dotted overrides; a source may be written as a bare path, and a single source
without a list). ``validate()`` names the offending field and value.
"""

from __future__ import annotations

import math
import os
import string
from dataclasses import dataclass, field

FORMATS = ("auto", "messages", "sharegpt", "alpaca", "prompt_response")
TEMPLATES = ("llama3", "chatml", "plain", "tokenizer", "tokenizer_generation")
TRUNCATION = ("truncate", "drop")
ON_ERROR = ("raise", "skip")
SUPERVISE = ("all", "last")
# The record fields each shape reads (data/records.py), which a source's ``columns`` may map onto its own names.
FIELDS_READ = {"messages": ("messages", "system"), "sharegpt": ("conversations", "system"),
               "alpaca": ("instruction", "input", "output", "system", "reasoning"),
               "prompt_response": ("prompt", "response", "system", "reasoning")}
REASONING_FORMAT = "<think>\n{reasoning}\n</think>\n\n{answer}"  # reasoning models' form (data/reasoning.py)
COLUMN_FIELDS = tuple(dict.fromkeys(f for fields in FIELDS_READ.values() for f in fields))


def _fail(name: str, value: object, why: str) -> None:
    raise ValueError(f"data config: {name}={value!r}: {why}")


@dataclass
class SourceConfig:
    """One input: a local json/jsonl/parquet file (or directory of them, or a save_to_disk folder) or a hub dataset
    name."""

    path: str = ""
    weight: float = 1.0  # passes over this source per epoch; a fraction takes a seeded subsample
    split: str | None = None  # of a hub dataset or a save_to_disk DatasetDict folder (default "train")
    subset: str | None = None  # hub datasets only: the configuration, load_dataset's name ("en")
    format: str = "auto"  # record shape; auto-detected per record when "auto"
    columns: dict = field(default_factory=dict)  # record field -> this source's column ({prompt: Question})

    @classmethod
    def from_str(cls, spec: str) -> "SourceConfig":
        """Shorthand, the same in YAML, in ``data.train=[...]`` overrides and in ``prepare --input``:
        ``a.jsonl`` means ``{path: a.jsonl}``, and ``b.jsonl:0.5`` (a number after the last colon)
        means ``{path: b.jsonl, weight: 0.5}``. In the mapping form ``path`` is taken literally."""
        head, sep, tail = spec.rpartition(":")
        if sep and head:
            try:
                return cls(path=head, weight=float(tail))
            except ValueError:
                pass
        return cls(path=spec)

    def validate(self, where: str) -> None:
        if not self.path:
            _fail(f"{where}.path", self.path, "must name a file, directory or hub dataset")
        if not (self.weight > 0) or not math.isfinite(self.weight):
            _fail(f"{where}.weight", self.weight, "must be a finite number > 0")
        if self.format not in FORMATS:
            _fail(f"{where}.format", self.format, f"must be one of {FORMATS}")
        if self.subset is not None and (not isinstance(self.subset, str) or not self.subset):
            _fail(f"{where}.subset", self.subset, "must name a configuration of the hub dataset, or be left unset")
        if self.subset is not None and os.path.exists(self.path):
            _fail(f"{where}.subset", self.subset, f"names a configuration of a hub dataset, but {self.path} is a local "
                                                  "path")
        self._validate_columns(where)

    def _validate_columns(self, where: str) -> None:
        if not isinstance(self.columns, dict):
            _fail(f"{where}.columns", self.columns, "must map record fields to column names ({prompt: Question})")
        read = FIELDS_READ.get(self.format, COLUMN_FIELDS)
        seen: dict[str, str] = {}
        for name, column in self.columns.items():
            if name not in read:
                kind = "record" if self.format == "auto" else f"{self.format} record"
                _fail(f"{where}.columns.{name}", column, f"{name!r} is not a {kind} field: one of {read}")
            if not isinstance(column, str) or not column:
                _fail(f"{where}.columns.{name}", column, "must be the source's column name")
            if column in seen:
                _fail(f"{where}.columns.{name}", column, f"the same column as columns.{seen[column]}")
            seen[column] = name


@dataclass
class DataConfig:
    train: list[SourceConfig] = field(default_factory=list)
    valid: list[SourceConfig] = field(default_factory=list)
    tokenizer: str = ""  # HF tokenizer directory or sentencepiece .model file
    template: str = "chatml"  # built-in wins by default; "tokenizer*" use the tokenizer's chat_template
    seq_length: int = 2048
    packing: bool = True
    truncation: str = "truncate"
    on_error: str = "raise"
    supervise: str = "all"  # all assistant turns, or only the last one
    reasoning_format: str = REASONING_FORMAT  # how a reasoning field joins its answer ({reasoning}, {answer})
    seed: int = 1234
    num_workers: int = 1
    output_dir: str = ""

    def validate(self) -> None:
        """Raise ValueError naming the field. ``valid`` alone (no ``train``) is a config that prepares the
        validation split only (``prepare``, ``train --eval-only``); the trainer refuses to train on it."""
        if not (self.train or self.valid):
            _fail("train", self.train, "needs at least one source (or valid sources alone, to prepare only the "
                                       "validation split)")
        for name in ("train", "valid"):
            for i, src in enumerate(getattr(self, name)):
                if not isinstance(src, SourceConfig):
                    _fail(f"{name}[{i}]", src, "must be a source mapping (path, weight, split, subset, format, "
                                                          "columns)")
                src.validate(f"{name}[{i}]")
        if not self.tokenizer:
            _fail("tokenizer", self.tokenizer, "must name an HF tokenizer directory or a .model file")
        if self.template not in TEMPLATES:
            _fail("template", self.template, f"must be one of {TEMPLATES}")
        if not isinstance(self.seq_length, int) or isinstance(self.seq_length, bool) or self.seq_length < 2:
            _fail("seq_length", self.seq_length, "must be an integer >= 2")
        if not isinstance(self.packing, bool):
            _fail("packing", self.packing, "must be true or false")
        if self.truncation not in TRUNCATION:
            _fail("truncation", self.truncation, f"must be one of {TRUNCATION}")
        if self.on_error not in ON_ERROR:
            _fail("on_error", self.on_error, f"must be one of {ON_ERROR}")
        if self.supervise not in SUPERVISE:
            _fail("supervise", self.supervise, f"must be one of {SUPERVISE}")
        _check_reasoning_format(self.reasoning_format)
        if self.template == "tokenizer_generation" and self.supervise != "last":
            _fail("supervise", self.supervise, "template 'tokenizer_generation' trains each record's last answer only "
                                               "(earlier ones are part of the prompt): set data.supervise=last")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            _fail("seed", self.seed, "must be a non-negative integer")
        if not isinstance(self.num_workers, int) or isinstance(self.num_workers, bool) or self.num_workers < 1:
            _fail("num_workers", self.num_workers, "must be an integer >= 1")
        if not self.output_dir:
            _fail("output_dir", self.output_dir, "must name the directory to write")


def _check_reasoning_format(value: object) -> None:
    """Exactly one ``{reasoning}`` and one ``{answer}``, no other fields (literal braces doubled, as str.format)."""
    fields = None
    if isinstance(value, str):
        try:
            parsed = list(string.Formatter().parse(value))
        except ValueError as exc:  # a single '{' or '}'
            _fail("reasoning_format", value, f"not a format string ({exc}); write literal braces as {{{{ and }}}}")
        # a conversion or format spec makes the field another name: '{reasoning!r}' is not '{reasoning}'
        fields = [f + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "")
                  for _, f, spec, conv in parsed if f is not None]
    if fields is None or sorted(fields) != ["answer", "reasoning"]:
        _fail("reasoning_format", value, "must hold {reasoning} and {answer} once each and no other {field}, e.g. "
                                         f"{REASONING_FORMAT!r}")
    if any(escape in value for escape in ("\\n", "\\t", "\\r")):
        _fail("reasoning_format", value, "holds a backslash escape as text, not a newline or tab: write it in a "
                                         "double-quoted YAML value, or in bash as $'...\\n...'")


def data_config_from_dict(raw: dict) -> DataConfig:
    """Build (not validate) a DataConfig from the ``data:`` mapping of a YAML file (``prepare --config``)."""
    from bft_megatron.config.base import from_dict

    return from_dict(DataConfig, raw, "data")
