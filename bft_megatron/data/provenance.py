"""What a prepared split was made from, and whether a config still asks for the same data.

A split's ``index.json`` records the settings it was prepared with (``seq_length``, ``packed``,
``template``, ``supervise``, ``reasoning_format``, ``truncation``, ``seed``, ``on_error``, the tokenizer's
fingerprint, the version of the record-to-token rules, :data:`RULES_VERSION`, compared in both modes) and,
in ``sources``, each source's path, weight, hub split and subset, format and columns, and each of its files' name, size,
mtime and sha256. :func:`compare` lists every difference between that record and a ``DataConfig``:

* ``strict`` (the config lists the split's sources: it says how the data is prepared): every recorded
  setting must equal the configured one, and the sources must be the same ones, in order, compared by
  content: a file is unchanged when its size and mtime are, or else when its sha256 is (a copied or
  moved identical file is the same source; only then is a file read, and its record in the index dict
  takes the file's current mtime, for the caller to publish so the next check need not hash it again).
  ``on_error: raise`` differs from a split that skipped records. A hub dataset is compared by name and
  split only.
* not strict (only ``data.output_dir``: the prepared split defines the data): only settings the config
  sets to a non-default value (an unset setting cannot be told from a default) and a configured
  tokenizer are compared; ``seed`` never (it also seeds the trainer's epoch shuffle), and ``seq_length``
  only as a bound (rows must not be longer).

What an older index does not record is returned as unchecked, not as a difference.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from bft_megatron.config.base import ConfigError, format_value
from bft_megatron.config.data import DataConfig, SourceConfig
from bft_megatron.data.errors import DataError
from bft_megatron.data.readers import list_files
from bft_megatron.data import storage
from bft_megatron.data.storage import PackedDataset, sha256_file
from bft_megatron.data.tokenizer import FINGERPRINT_VERSION, tokenizer_fingerprint
from bft_megatron.utils.logging import get_logger

__all__ = ["PreparedDataMismatch", "RULES_VERSION", "source_record", "compare", "mismatch_message",
           "unchecked_message", "splits_disagree", "record_new_mtimes", "rebuild_reason"]

_log = get_logger(__name__)
MTIMES = "the new mtimes of sources touched since preparation (contents unchanged)"

# The rules that turn records into tokens and masks, recorded in index.json: bumped when the same sources and
# settings would now give other tokens or masks, so that data prepared by an older version is not reused unnoticed.
# 2 (2026-12-02): a top-level 'system' next to 'messages' is the system turn (was dropped); with template: tokenizer
# an answer's leading whitespace is supervised where the template keeps it (Qwen); a .json {"data": [...]} yields
# its records; strings Arrow read as dates stay strings; turns after a chat's last answer are dropped.
# 3 (2026-12-04): with template: tokenizer an answer is the occurrence of its text that covers the point where the
# chat with a stand-in answer departs (the search from the previous answer's end or the prompt's could supervise
# the answer's words in a system or user message, or text the template writes before the answer, e.g. Qwen3's
# empty think block); an end-of-turn marker past the turn's own rendering, or written only between turns
# (Qwen1.5), closes the answer; a UTF-8 byte-order mark is not part of line 1.
# 4 (2026-12-04): reasoning in its own field (alpaca/prompt_response 'reasoning', the last answer's
# 'reasoning_content' or 'reasoning') is trained, as '<think>\n...\n</think>\n\n' before the answer (was ignored).
# 5 (2026-12-05): template plain labels each answer 'Assistant: ' (was: each question, so two questions in a row
# or an answer first were mislabelled); an assistant message with tool_calls/function_call is an invalid record (the
# call was dropped); a field whose type differs between records keeps its strings as written (datasets decoded them
# as JSON: '"Yes"' -> Yes).
RULES_VERSION = 5

SETTINGS = {"seq_length": "seq_length", "packing": "packed", "template": "template", "supervise": "supervise",
            "reasoning_format": "reasoning_format", "truncation": "truncation", "seed": "seed"}  # field -> index key


class PreparedDataMismatch(ConfigError):
    """A prepared split that is not what the config describes (the message lists each difference); a
    ConfigError (so a ValueError), raised alike on every rank."""


def _file_name(path: Path, source: str) -> str:
    """A source file's name: its path inside a directory source (a saved DatasetDict has a state.json per split)."""
    return path.relative_to(source).as_posix() if os.path.isdir(source) else path.name


def _file_record(path: Path, source: str) -> dict[str, Any]:
    st = path.stat()
    return {"name": _file_name(path, source), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "sha256": sha256_file(path)}


def source_record(src: SourceConfig) -> dict[str, Any]:
    """What identifies a source's data: its settings and, when local, its files (hub: name and split)."""
    rec: dict[str, Any] = {"path": src.path, "weight": src.weight, "split": src.split, "subset": src.subset,
                           "format": src.format, "columns": dict(src.columns)}
    if os.path.exists(src.path):
        rec["files"] = [_file_record(f, src.path) for f in list_files(src.path)]
    return rec


def _line(name: str, prepared: Any, configured: Any) -> str:
    return f"{name}: prepared {format_value(prepared)}, configured {format_value(configured)}"


def _file_change(rec: dict[str, Any], path: Path) -> str | None:
    """What changed in a file since ``rec`` was taken (None: nothing). A file whose mtime changed but whose
    contents did not (touched, copied) gets its new mtime in ``rec``."""
    st = path.stat()
    if st.st_size != rec["size"]:
        return f"{rec['size']} bytes when prepared, {st.st_size} now"
    if st.st_mtime_ns == rec["mtime_ns"]:
        return None
    if sha256_file(path) == rec["sha256"]:
        rec["mtime_ns"] = st.st_mtime_ns
        return None
    return "same size but other contents than when prepared"


def _local_problems(where: str, rec: dict[str, Any], src: SourceConfig) -> list[str]:
    if not os.path.exists(src.path):
        return [f"{where}: {src.path} does not exist (prepared from {rec['path']})"]
    try:
        files = list_files(src.path)
    except DataError as err:
        return [f"{where}: {err}"]
    before, now = [f["name"] for f in rec["files"]], [_file_name(f, src.path) for f in files]
    if len(before) != len(now) or (Path(src.path).is_dir() and before != now):  # a single file may be renamed
        return [f"{where} ({src.path}): files {before} when prepared, {now} now"]
    changes = ((f, _file_change(r, f)) for r, f in zip(rec["files"], files))
    return [f"{where} ({f}): {change}" for f, change in changes if change]


def _source_problems(where: str, rec: dict[str, Any], src: SourceConfig) -> list[str]:
    out = [_line(f"{where}.{k}", rec[k], getattr(src, k)) for k in ("weight", "split", "subset", "format", "columns")
           if k in rec and rec[k] != getattr(src, k)]
    if "files" in rec:
        return out + _local_problems(where, rec, src)
    if os.path.normpath(rec["path"]) != os.path.normpath(src.path):  # hub id, or an index without files
        out.append(_line(f"{where}.path", rec["path"], src.path))
    return out


def _sources_problems(split: str, index: dict[str, Any], sources: list[SourceConfig]) -> tuple[list[str], list[str]]:
    recs, unchecked = index.get("sources"), []
    if recs is None:  # older index: paths and weights survive in the stats
        recs = [{"path": s["path"], "weight": s["weight"]} for s in index.get("stats", {}).get("per_source", [])]
        if not recs:
            return [], [f"the {split} sources"]
        unchecked.append(f"the {split} sources' contents, hub split and format (only paths and weights)")
    if len(recs) != len(sources):
        return [f"data.{split}: prepared from {len(recs)} source(s) {[r['path'] for r in recs]}, configured "
                f"{len(sources)} {[s.path for s in sources]}"], unchecked
    problems = []
    for i, (rec, src) in enumerate(zip(recs, sources)):
        problems += _source_problems(f"data.{split}[{i}]", rec, src)
    return problems, unchecked


def _tokenizer_problems(rec: dict[str, Any], configured: str) -> tuple[list[str], list[str]]:
    if not configured:
        return [], []
    try:
        fingerprint = tokenizer_fingerprint(configured)
    except ValueError as err:
        return [f"data.tokenizer: prepared with {rec.get('path')}, configured: {err}"], []
    # a sentencepiece file's fingerprint is the same in every version; a directory's changed in version 2
    if "fingerprint" in rec and (rec.get("fingerprint_version") == FINGERPRINT_VERSION
                                 or not Path(configured).is_dir()):
        if fingerprint == rec["fingerprint"]:
            return [], []
        return [f"data.tokenizer: prepared with {rec.get('path')} (fingerprint {rec['fingerprint']}), configured "
                f"{configured} (fingerprint {fingerprint})"], []
    same_path = os.path.normpath(str(rec.get("path", ""))) == os.path.normpath(configured)
    return ([] if same_path else [f"data.tokenizer: prepared with {rec.get('path')}, configured {configured}"],
            ["the tokenizer's files (only its path)"])


def _rules_problems(index: dict[str, Any]) -> tuple[list[str], list[str]]:
    version = index.get("rules_version")
    if version is None:
        return [], [f"the version of the record-to-token rules (this one prepares with version {RULES_VERSION}; "
                    "before version 2 a 'system' field next to 'messages' was dropped)"]
    if version != RULES_VERSION:
        return [f"data preparation rules: prepared with version {version}, this version prepares with "
                f"{RULES_VERSION} (the same records give other tokens or masks; bft_megatron/data/provenance.py)"], []
    return [], []


def _settings_problems(index: dict[str, Any], cfg: DataConfig, strict: bool) -> tuple[list[str], list[str]]:
    defaults, problems, unchecked = DataConfig(), [], []
    for name, key in SETTINGS.items():
        value = getattr(cfg, name)
        if key not in index:
            unchecked.append(f"data.{name}")
        elif name == "seq_length" and not strict:
            if index[key] > value:
                problems.append(f"data.seq_length: prepared rows are up to {index[key]} tokens, configured {value}")
        elif (strict or (name != "seed" and value != getattr(defaults, name))) and index[key] != value:
            problems.append(_line(f"data.{name}", index[key], value))
    skipped = sum(index.get("stats", {}).get("skipped", {}).values())
    if strict and cfg.on_error == "raise" and skipped:
        problems.append(f"data.on_error: prepared with skip ({skipped} records skipped), configured raise")
    return problems, unchecked


def compare(index: dict[str, Any], cfg: DataConfig, split: str, sources: list[SourceConfig] | None,
            strict: bool) -> tuple[list[str], list[str]]:
    """(differences, what the index cannot tell) between a prepared split's index and ``cfg``.

    Updates the mtime recorded in ``index`` of a file found unchanged by its sha256 (see the module doc).

    ``sources``: the split's configured sources (None: not compared, e.g. an unconfigured valid split)."""
    problems, unchecked = _settings_problems(index, cfg, strict)
    for more, unknown in (_rules_problems(index), _tokenizer_problems(index.get("tokenizer", {}), cfg.tokenizer),
                          _sources_problems(split, index, sources) if sources else ([], [])):
        problems += more
        unchecked += unknown
    return problems, unchecked


def splits_disagree(directory: str | os.PathLike[str], train: dict[str, Any], valid: dict[str, Any]) -> str | None:
    """Why ``valid/`` cannot validate a model trained on ``train/`` of the same ``directory`` (None: it can).

    With only ``data.output_dir`` the config leaves most settings unset, so each split is compared with the
    config only loosely; a ``bft-megatron prepare`` that later rewrote ``train/`` alone (no ``--valid``) leaves an
    older ``valid/`` beside it, and validation would then score text rendered or tokenized otherwise. The splits
    must agree on what turns records into tokens and masks (template, supervised turns, reasoning format,
    tokenizer, rules)."""
    lines = [f"{name}: train/ {format_value(train[key])}, valid/ {format_value(valid[key])}"
             for name, key in (("data.template", "template"), ("data.supervise", "supervise"),
                               ("data.reasoning_format", "reasoning_format"),
                               ("preparation rules version", "rules_version"))
             if key in train and key in valid and train[key] != valid[key]]
    tok_t, tok_v = train.get("tokenizer", {}), valid.get("tokenizer", {})
    if ("fingerprint" in tok_t and "fingerprint" in tok_v and tok_t.get("fingerprint_version")
            == tok_v.get("fingerprint_version") and tok_t["fingerprint"] != tok_v["fingerprint"]):
        lines.append(f"data.tokenizer: train/ {tok_t.get('path')} (fingerprint {tok_t['fingerprint']}), valid/ "
                     f"{tok_v.get('path')} (fingerprint {tok_v['fingerprint']})")
    if not lines:
        return None
    return (f"{directory}: its valid/ split was prepared otherwise than its train/ split (e.g. `bft-megatron prepare` "
            "run again without --valid rewrote train/ only), so validation would score other tokens:\n  "
            + "\n  ".join(lines) + f"\nPrepare both splits again into {directory} (bft-megatron prepare --input ... "
            f"--valid ...), or delete {os.path.join(directory, 'valid')} to train without validation.")


def mismatch_message(problems: dict[str, list[str]], strict: bool) -> str:
    """``problems``: the differences per prepared split directory."""
    lines = [f"{directory} was prepared from other data or settings than the config asks for:\n  " + "\n  ".join(p)
             for directory, p in problems.items()]
    where = " and ".join(problems)
    if strict:
        fix = (f"Prepared data is never rebuilt silently. Use a new data.output_dir, or delete {where} (the trainer "
               "prepares a missing split on first use), or rebuild with `bft-megatron prepare`.")
    else:
        fix = ("With only data.output_dir the prepared data is used as is: set these data.* values to the prepared "
               f"ones (or leave them unset), or rebuild {where} as configured with `bft-megatron prepare` (or by "
               "listing data.train sources, prepared on first use).")
    return "\n".join(lines + [fix])


def unchecked_message(directory: str | os.PathLike[str], unchecked: list[str]) -> str:
    return (f"{directory} was prepared by an older version whose index.json does not record "
            f"{'; '.join(unchecked)}: these cannot be checked against the config. Delete the directory to "
            "prepare it again with a complete record.")


def record_new_mtimes(directory: str | os.PathLike[str], index: dict[str, Any], recorded: str,
                      what: str = MTIMES) -> None:
    """Sources touched but unchanged (sha256) since preparation (``compare`` updated ``index``): keep their new
    mtimes in ``index.json``, so the next check compares stat() results instead of hashing them again. Best effort
    (read-only data), and only if ``index.json`` is still what was read (``recorded``, its sorted JSON): another job
    may have rebuilt the split meanwhile (a rebuild moves a new directory into place; a rebuild finishing between
    this check and the write would get the old index, which the next checks then refuse as not describing its
    arrays or sources). ``what``: what ``index`` records anew, for the log (a kept split's paths, too)."""
    try:
        if json.dumps(storage.read_index(directory), sort_keys=True) != recorded:
            _log.info("%s: index.json changed since it was read; not recording %s", directory, what)
            return
        storage.publish_index(Path(directory), index)
    except (OSError, ValueError) as err:
        hashed = " (sources touched since preparation are hashed on every check)" if what == MTIMES else ""
        _log.info("%s: could not record %s%s (%s)", directory, "their new mtimes" if what == MTIMES else what,
                  hashed, err)
        return
    _log.info("%s: recorded %s", directory, what)


def _record_paths(index: dict[str, Any], cfg: DataConfig, sources: list[SourceConfig]) -> list[str]:
    """Give a kept split's ``index`` the tokenizer and source paths a rebuild would record (the same tokenizer and
    files, found by content, may have moved): the exporter and the checkpoint's ``hf/`` copy find the tokenizer of
    data prepared into ``data.output_dir`` by its recorded path. Returns what changed."""
    changed = []
    tok = index.get("tokenizer", {})
    if tok.get("path") != cfg.tokenizer:
        changed.append(f"the tokenizer's path {cfg.tokenizer} (was {tok.get('path')})")
        tok["path"] = cfg.tokenizer
    per_source = index.get("stats", {}).get("per_source", [])
    for i, (rec, src) in enumerate(zip(index["sources"], sources)):
        if rec["path"] != src.path:
            changed.append(f"data.{index.get('split')}[{i}]'s path {src.path} (was {rec['path']})")
            rec["path"] = src.path
            if not os.path.isdir(src.path) and len(rec.get("files", [])) == 1:  # a single file, maybe renamed
                rec["files"][0]["name"] = Path(src.path).name
        if i < len(per_source):
            per_source[i]["path"] = src.path
    return changed


def rebuild_reason(directory: str | os.PathLike[str], cfg: DataConfig, split: str,
                   sources: list[SourceConfig]) -> str | None:
    """Why ``bft-megatron prepare`` must rebuild the split in ``directory``, or None when it holds exactly what
    ``cfg`` would prepare from ``sources`` now: readable arrays, and the strict comparison the trainer makes (same
    settings, rules, tokenizer fingerprint, and sources unchanged by content) with nothing the index cannot tell.
    A hub dataset is always rebuilt: only its name and split are recorded, not which revision was read."""
    try:
        index = PackedDataset(directory).index
    except (OSError, ValueError) as err:
        return f"it cannot be read ({err})"
    recorded = json.dumps(index, sort_keys=True)
    differences, unchecked = compare(index, cfg, split, sources, strict=True)
    if differences:
        return "; ".join(differences)
    if unchecked:
        return f"its index.json does not record {'; '.join(unchecked)}"
    hub = [src.path for src, rec in zip(sources, index["sources"]) if "files" not in rec]
    if hub:
        return f"{', '.join(hub)}: a hub dataset's revision is not recorded, so it is read again"
    touched = json.dumps(index, sort_keys=True) != recorded  # compare() took the new mtimes of unchanged files
    moved = _record_paths(index, cfg, sources)
    if touched or moved:
        what = ([MTIMES] if touched else []) + moved
        record_new_mtimes(directory, index, recorded, what="; ".join(what))
    return None
