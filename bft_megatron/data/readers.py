"""Read raw records through ``datasets`` (local json/jsonl/parquet, or a hub dataset name).

A path that exists is local. One that does not is a hub dataset id only if it looks like one (``name``
or ``owner/name``, no data-file suffix) and, for ``owner/name``, no local directory ``owner/`` exists;
otherwise it is reported as a missing local path, and a failed hub load says both.

Arrow's JSON reader reports a parse error without a line number, and fails outright on records whose
types disagree. When ``datasets`` refuses a local JSON file we re-read it with the standard library,
line by line, so the error (or the counted skip) names the exact file and line.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from bft_megatron.data.errors import DataError, SkipLog
from bft_megatron.utils.logging import get_logger

log = get_logger(__name__)

LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")  # "name" or "owner/name"


@dataclass(frozen=True)
class RawRecord:
    data: Any
    where: str  # "path:line N" (jsonl), "path:record N" (json array), "path:row N" (parquet/hub)


def list_files(path: str) -> list[Path]:
    """A file, or every supported file directly inside a directory (sorted, for determinism)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix in LOCAL_SUFFIXES and f.is_file())
        if not files:
            raise DataError(path, f"no {sorted(LOCAL_SUFFIXES)} files in directory")
        return files
    if p.suffix not in LOCAL_SUFFIXES:
        raise DataError(path, f"unsupported file type {p.suffix!r}; expected one of {sorted(LOCAL_SUFFIXES)}")
    return [p]


def _nonblank_lines(path: Path) -> list[int]:
    """1-based numbers of the non-blank lines: Arrow skips blank lines, so row i lives on line[i]."""
    with path.open("rb") as fh:
        return [i for i, line in enumerate(fh, 1) if line.strip()]


def _load_with_datasets(path: Path, cache_dir: str | None) -> Any:
    import datasets

    datasets.disable_progress_bars()
    builder = LOCAL_SUFFIXES[path.suffix]
    # Its JSON builder logs a failure as "... in row 20" (0-based, and before the fallback below names the line,
    # "line 21"): silenced, the fallback's DataError is the one report.
    quiet = logging.getLogger("datasets.packaged_modules.json.json")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache_dir)
    finally:
        quiet.setLevel(level)


def _read_jsonl_stdlib(path: Path, skips: SkipLog) -> Iterator[RawRecord]:
    with path.open("r", encoding="utf-8-sig") as fh:  # -sig: a byte-order mark (Windows editors) is not line 1's
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:line {lineno}"
            try:
                # Without its newline: else a line cut short fails at "line 2, column 1", past the newline.
                yield RawRecord(json.loads(line.rstrip("\r\n")), where)
            except json.JSONDecodeError as exc:
                snippet = line.strip()[:80]
                skips.handle(DataError(where, f"malformed JSON ({exc.msg} at column {exc.colno}): {snippet!r}"),
                             "malformed_json")


def _first_line_is_object(text: str) -> bool:
    line = next((ln for ln in text.splitlines() if ln.strip()), "")
    try:
        return isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
        return False


def _read_json_stdlib(path: Path, skips: SkipLog) -> Iterator[RawRecord]:
    text = path.read_text(encoding="utf-8-sig")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if _first_line_is_object(text):  # JSON lines in a .json file (datasets reads them): name the bad line
            yield from _read_jsonl_stdlib(path, skips)
            return
        # one JSON document: under on_error=skip the whole file is the counted skip
        skips.handle(DataError(f"{path}:line {exc.lineno}", f"malformed JSON ({exc.msg} at column {exc.colno}); "
                                                            "the whole file is unreadable"), "malformed_json")
        return
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]  # the {"data": [...]} wrapper that datasets' json builder also accepts
    if not isinstance(data, list):
        raise DataError(str(path), f"a .json file must hold a list of records, got {type(data).__name__}")
    for i, rec in enumerate(data):
        yield RawRecord(rec, f"{path}:record {i}")


def _has_timestamp(t: Any) -> bool:
    """Whether Arrow type ``t`` is, or nests (records of a {"data": [...]} file, turns of 'messages'), a timestamp."""
    import pyarrow as pa

    if pa.types.is_timestamp(t) or pa.types.is_date(t):
        return True
    if pa.types.is_struct(t):
        return any(_has_timestamp(t.field(i).type) for i in range(t.num_fields))
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return _has_timestamp(t.value_type)
    return False


def _infers_timestamps(ds: Any) -> bool:
    """Whether Arrow typed a JSON field as a timestamp (it does so for strings like "2021-03-04", at any depth):
    JSON has no such type, so the field held strings, which must reach the records unchanged."""
    return any(_has_timestamp(f.type) for f in ds.data.schema)


def _read_local_file(path: Path, skips: SkipLog, cache_dir: str | None) -> Iterator[RawRecord]:
    try:
        ds = _load_with_datasets(path, cache_dir)
        if path.suffix != ".parquet" and _infers_timestamps(ds):
            raise TypeError("strings read as timestamps")
    except Exception as exc:  # noqa: BLE001 - any Arrow/datasets failure: fall back to locate the bad line
        if path.suffix == ".parquet":
            raise DataError(str(path), f"cannot read parquet file: {exc}") from exc
        log.warning("datasets could not read %s (%s); re-reading with the json module", path, type(exc).__name__)
        reader = _read_jsonl_stdlib(path, skips) if path.suffix == ".jsonl" else _read_json_stdlib(path, skips)
        yield from reader
        return
    if path.suffix == ".jsonl":
        lines = _nonblank_lines(path)
        for i, rec in enumerate(ds):
            yield RawRecord(rec, f"{path}:line {lines[i]}")
    else:
        unit = "record" if path.suffix == ".json" else "row"
        for i, rec in enumerate(_unwrap_data(ds, path) if path.suffix == ".json" else ds):
            yield RawRecord(rec, f"{path}:{unit} {i}")


def _unwrap_data(ds: Any, path: Path) -> Any:
    """The records of a ``{"data": [...]}`` file: datasets reads that object as one row with a 'data' column
    (the stdlib reader unwraps it the same way), not as the list of records it holds. A list holding one record
    that has a 'data' list field reads the same: only a file that is an object is unwrapped."""
    if (len(ds) == 1 and "data" in ds.column_names and isinstance(ds[0]["data"], list)
            and _first_char(path) == "{"):
        return ds[0]["data"]
    return ds


def _first_char(path: Path) -> str:
    """The first character of ``path`` that is not whitespace ("" for none)."""
    with open(path, encoding="utf-8-sig") as fh:
        while chunk := fh.read(1 << 16):
            if chunk.strip():
                return chunk.lstrip()[0]
    return ""


def local_source_problem(path: str) -> str | None:
    """Why source ``path`` cannot be read (a missing local path, an unsupported file, a directory without data
    files), or None: it can be read, or it may be a hub dataset id (not checked offline). The trainer's pre-flight
    check (``bft_megatron.config.paths.check_paths``) asks this before any preparation."""
    if not os.path.exists(path):
        return _missing_local(path)
    try:
        list_files(path)
    except DataError as err:
        return err.message
    return None


def _missing_local(path: str) -> str | None:
    """Why a path that does not exist cannot be a hub dataset id, or None if it may be one."""
    parts = [p.strip() for p in path.split(",")]
    if len(parts) > 1 and any(os.path.exists(p) for p in parts):  # a list override without its brackets
        listed = f"[{','.join(parts)}]"
        return f"no such file or directory; several sources are a list: {listed} (an override: 'data.train={listed}')"
    if Path(path).suffix in LOCAL_SUFFIXES or not HUB_ID.fullmatch(path):
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
    """Every raw record of one source, in a deterministic order; ``cache_dir``: datasets' cache for local files."""
    if os.path.exists(path) and subset:
        raise DataError(path, f"subset={subset!r} names a configuration of a hub dataset; this is a local path")
    if os.path.exists(path):
        for file in list_files(path):
            yield from _read_local_file(file, skips, cache_dir)
    elif (why := _missing_local(path)) is not None:
        raise DataError(path, why)
    else:
        yield from _read_hub(path, split, subset)
