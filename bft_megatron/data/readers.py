"""Read raw records through ``datasets`` (local json/jsonl/parquet, or a hub dataset name).

Arrow's JSON reader reports a parse error without a line number, and fails outright on records whose
types disagree. When ``datasets`` refuses a local JSON file we re-read it with the standard library,
line by line, so the error (or the counted skip) names the exact file and line.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from bft_megatron.data.errors import DataError, SkipLog
from bft_megatron.utils.logging import get_logger

log = get_logger(__name__)

LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


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
    return datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache_dir)


def _read_jsonl_stdlib(path: Path, skips: SkipLog) -> Iterator[RawRecord]:
    with path.open("r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:line {lineno}"
            try:
                yield RawRecord(json.loads(line), where)
            except json.JSONDecodeError as exc:
                snippet = line.strip()[:80]
                skips.handle(DataError(where, f"malformed JSON ({exc.msg} at column {exc.colno}): {snippet!r}"),
                             "malformed_json")


def _read_json_stdlib(path: Path, skips: SkipLog) -> Iterator[RawRecord]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
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


def _read_local_file(path: Path, skips: SkipLog, cache_dir: str | None) -> Iterator[RawRecord]:
    try:
        ds = _load_with_datasets(path, cache_dir)
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
        for i, rec in enumerate(ds):
            yield RawRecord(rec, f"{path}:{unit} {i}")


def _read_hub(name: str, split: str | None, cache_dir: str | None) -> Iterator[RawRecord]:
    """A thin call; cannot be exercised offline."""
    import datasets

    ds = datasets.load_dataset(name, split=split or "train", cache_dir=cache_dir)
    for i, rec in enumerate(ds):
        yield RawRecord(rec, f"hub:{name}[{split or 'train'}]:row {i}")


def read_records(path: str, split: str | None, skips: SkipLog,
                 cache_dir: str | None = None) -> Iterator[RawRecord]:
    """Every raw record of one source, in a deterministic order."""
    if os.path.exists(path):
        for file in list_files(path):
            yield from _read_local_file(file, skips, cache_dir)
    elif Path(path).suffix in LOCAL_SUFFIXES or path.startswith((".", "/")):
        raise DataError(path, "file not found")
    else:
        yield from _read_hub(path, split, cache_dir)
