"""Read raw records through ``datasets`` (local json/jsonl/parquet, gzip-compressed json/jsonl, a ``save_to_disk``
folder, or a hub dataset name).

A path that exists is local. One that does not is a hub dataset id only if it looks like one (``name``
or ``owner/name``, no data-file suffix) and, for ``owner/name``, no local directory ``owner/`` exists;
otherwise it is reported as a missing local path, and a failed hub load says both.

``.jsonl`` files are read with the standard library (``json_text``), line by line: records arrive as written and
an error (or the counted skip) names the exact file and line. ``.json`` documents go through ``datasets``, whose
Arrow reader reports a parse error without a line number, fails outright on records whose types disagree, and
misreads some files it accepts (strings as dates, fields of mixed types as JSON text, text not UTF-8); then the
file is re-read with the standard library too.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterator

from bft_megatron.data.errors import DataError, SkipLog
from bft_megatron.data.json_text import (JSON_SUFFIXES, RawRecord, first_char, is_gzip, is_utf8,
                                         read_json_stdlib, read_jsonl_stdlib)
from bft_megatron.data.saved_datasets import is_saved_dataset, read_saved, saved_dataset_files, split_problem
from bft_megatron.utils.logging import get_logger

log = get_logger(__name__)

__all__ = ["RawRecord", "list_files", "local_source_problem", "read_records"]

LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
SUPPORTED = ".jsonl, .json, .parquet, .jsonl.gz, .json.gz, or a datasets save_to_disk folder"
# Files a directory may hold that look like data but are not read: named in an error, not skipped silently.
UNREAD_SUFFIXES = {".gz", ".bz2", ".xz", ".zst", ".zstd", ".lz4", ".zip", ".tar", ".tgz", ".7z", ".arrow", ".csv",
                   ".tsv", ".ndjson", ".feather", ".orc", ".avro"}
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")  # "name" or "owner/name"


def data_suffix(path: Path) -> str | None:
    """The reader ``path`` needs: ".jsonl", ".json" or ".parquet" (a ".jsonl.gz" / ".json.gz" file: the suffix
    inside), or None for a file that is not read."""
    if is_gzip(path):
        inner = path.with_suffix("").suffix
        return inner if inner in JSON_SUFFIXES else None
    return path.suffix if path.suffix in LOCAL_SUFFIXES else None


def _unread_data(files: list[Path]) -> list[str]:
    """Names of the files in a directory that look like data (compressed, Arrow, CSV, or a supported suffix in
    other letter case) but would not be read."""
    return [f.name for f in files
            if data_suffix(f) is None and (f.suffix.lower() in UNREAD_SUFFIXES or data_suffix(Path(f.name.lower())))]


def list_files(path: str) -> list[Path]:
    """A file, every supported file directly inside a directory (sorted, for determinism), or the files of a
    ``save_to_disk`` folder."""
    p = Path(path)
    if p.is_dir():
        if is_saved_dataset(p):
            return saved_dataset_files(p)
        entries = sorted(f for f in p.iterdir() if f.is_file())
        if unread := _unread_data(entries):
            raise DataError(path, f"files that would not be read: {', '.join(unread)} (supported: {SUPPORTED}); "
                                  "convert them, or move them out of the directory")
        files = [f for f in entries if data_suffix(f)]
        if not files:
            raise DataError(path, f"no data files in directory (supported: {SUPPORTED})")
        return files
    if data_suffix(p) is None:
        raise DataError(path, f"unsupported file type {''.join(p.suffixes[-2:]) if is_gzip(p) else p.suffix!r}; "
                              f"expected {SUPPORTED}")
    return [p]


def _load_with_datasets(path: Path, cache_dir: str | None) -> Any:
    import datasets

    datasets.disable_progress_bars()
    builder = LOCAL_SUFFIXES[data_suffix(path)]  # its json builder decompresses a .gz file itself
    # Its JSON builder logs a failure as "... in row 20" (0-based, and before the fallback below names the line,
    # "line 21"): silenced, the fallback's DataError is the one report.
    quiet = logging.getLogger("datasets.packaged_modules.json.json")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache_dir)
    finally:
        quiet.setLevel(level)


def _is_date(t: Any) -> bool:
    import pyarrow as pa

    return pa.types.is_timestamp(t) or pa.types.is_date(t)


def _is_json_text(t: Any) -> bool:
    # getattr: only extension types have the attribute (an older pyarrow or datasets never produces this one)
    return getattr(t, "extension_name", None) == "arrow.json"


def _has_type(t: Any, predicate: Callable[[Any], bool]) -> bool:
    """Whether Arrow type ``t`` is, or nests (records of a {"data": [...]} file, turns of 'messages'), a type
    ``predicate`` accepts."""
    import pyarrow as pa

    if predicate(t):
        return True
    if pa.types.is_struct(t):
        return any(_has_type(t.field(i).type, predicate) for i in range(t.num_fields))
    if pa.types.is_map(t):
        return _has_type(t.key_type, predicate) or _has_type(t.item_type, predicate)
    value_type = getattr(t, "value_type", None)  # list, large list, fixed-size list, list view
    return value_type is not None and _has_type(value_type, predicate)


def _misread(ds: Any, path: Path) -> str | None:
    """Why Arrow's reading of the .json file ``path`` cannot be used, or None.

    Text that is not UTF-8: datasets decodes it as some other encoding. Strings like "2021-03-04" become
    timestamps (JSON has no such type, so they must reach the records unchanged). A field whose type differs
    between records (one list-of-parts 'content', one numeric 'output') becomes JSON text that datasets json.loads
    back: the string '"Yes"' would arrive as Yes, '0012' as 12."""
    if not is_utf8(path):
        return "text that is not UTF-8"
    schema = ds.data.schema
    if any(_has_type(f.type, _is_date) for f in schema):
        return "strings read as dates"
    if any(_has_type(f.type, _is_json_text) for f in schema):
        return "fields of mixed types read as JSON text"
    return None


def _read_local_file(path: Path, skips: SkipLog, cache_dir: str | None) -> Iterator[RawRecord]:
    kind = data_suffix(path)
    if kind == ".jsonl":
        # One record per line: the json module reads each as written (no type coercion, the exact line of a bad
        # one, text that is not UTF-8 as one bad line), ~4x faster than Arrow here, without Arrow's on-disk copy of
        # the source, and with memory that does not grow with the file (datasets re-reads a malformed one whole).
        yield from read_jsonl_stdlib(path, skips)
        return
    try:
        ds = _load_with_datasets(path, cache_dir)
        why = None if kind == ".parquet" else _misread(ds, path)  # parquet's types are its own: read as is
    except Exception as exc:  # noqa: BLE001 - any Arrow/datasets failure: fall back to locate the bad line
        if kind == ".parquet":
            raise DataError(str(path), f"cannot read parquet file: {exc}") from exc
        why = f"it failed ({type(exc).__name__})"
    if why is not None:
        log.warning("re-reading %s with the json module, as datasets cannot be used on it: %s", path, why)
        yield from read_json_stdlib(path, skips)
        return
    unit = "record" if kind == ".json" else "row"
    for i, rec in enumerate(_unwrap_data(ds, path) if kind == ".json" else ds):
        yield RawRecord(rec, f"{path}:{unit} {i}")


def _unwrap_data(ds: Any, path: Path) -> Any:
    """The records of a ``{"data": [...]}`` file: datasets reads that object as one row with a 'data' column
    (the stdlib reader unwraps it the same way), not as the list of records it holds. A list holding one record
    that has a 'data' list field reads the same: only a file that is an object is unwrapped."""
    if (len(ds) == 1 and "data" in ds.column_names and isinstance(ds[0]["data"], list)
            and first_char(path) == "{"):
        return ds[0]["data"]
    return ds


def local_source_problem(path: str, split: str | None = None) -> str | None:
    """Why source ``path`` cannot be read (a missing local path, an unsupported file, a directory without data
    files or with some that would not be read, a saved DatasetDict without ``split``), or None: it can be read, or
    it may be a hub dataset id (not checked offline). The trainer's pre-flight check
    (``bft_megatron.config.paths.check_paths``) asks this before any preparation."""
    if not os.path.exists(path):
        return _missing_local(path)
    try:
        list_files(path)
        return split_problem(Path(path), split) if is_saved_dataset(Path(path)) else None
    except DataError as err:
        return str(err) if err.where != path else err.message  # a bad metadata file: name it


def _missing_local(path: str) -> str | None:
    """Why a path that does not exist cannot be a hub dataset id, or None if it may be one."""
    parts = [p.strip() for p in path.split(",")]
    if len(parts) > 1 and any(os.path.exists(p) for p in parts):  # a list override without its brackets
        listed = f"[{','.join(parts)}]"
        return f"no such file or directory; several sources are a list: {listed} (an override: 'data.train={listed}')"
    if data_suffix(Path(path)) or not HUB_ID.fullmatch(path):
        return "no such file or directory (hub dataset ids look like owner/name)"
    parent = Path(path).parent
    if parent != Path(".") and parent.is_dir():
        return f"no such file or directory in {parent}/ (taken as a local path, not as the hub id owner/name)"
    return None


def _read_hub(name: str, split: str | None, subset: str | None) -> Iterator[RawRecord]:
    """A thin call; only its failure is exercised offline. Always the Hugging Face datasets cache (HF_HOME,
    HF_DATASETS_CACHE), never the caller's ``cache_dir``: ``prepare`` passes a temporary one for local files, in
    which a hub dataset would be downloaded again on every run and an offline node could not find its copy."""
    import datasets

    try:
        ds = datasets.load_dataset(*(name, subset) if subset else (name,), split=split or "train")
    except Exception as exc:  # noqa: BLE001 - offline, unknown id, gated...: one clear error for all
        raise DataError(name, f"not a local file or directory (no such path under {os.getcwd()}), and loading it "
                              f"as a hub dataset id (owner/name) failed: {type(exc).__name__}: {exc}") from exc
    where = f"hub:{name}{'/' + subset if subset else ''}[{split or 'train'}]"
    for i, rec in enumerate(ds):
        yield RawRecord(rec, f"{where}:row {i}")


def read_records(path: str, split: str | None, skips: SkipLog, cache_dir: str | None = None,
                 subset: str | None = None) -> Iterator[RawRecord]:
    """Every raw record of one source, in a deterministic order; ``cache_dir``: datasets' cache for local files.
    ``split``: of a hub dataset or a saved DatasetDict (default "train"); a file or a saved Dataset has one."""
    if os.path.exists(path) and subset:
        raise DataError(path, f"subset={subset!r} names a configuration of a hub dataset; this is a local path")
    if os.path.isdir(path) and is_saved_dataset(Path(path)):
        yield from read_saved(Path(path), split)
    elif os.path.exists(path):
        for file in list_files(path):
            yield from _read_local_file(file, skips, cache_dir)
    elif (why := _missing_local(path)) is not None:
        raise DataError(path, why + ("" if os.path.isabs(path) else f" (relative paths are taken from {os.getcwd()})"))
    else:
        yield from _read_hub(path, split, subset)
