"""Local JSON files read with the standard library, byte line by byte line, so that every problem names its file
and line: how ``.jsonl`` files are read, and what the reader falls back to when ``datasets`` (Arrow) refuses or
misreads a ``.json`` document.

Files ending ``.gz`` are gzip-compressed (``datasets`` decompresses them too). Lines are split at ``\\n`` only, as
Arrow and JSON lines do: ``str.splitlines`` would also split at U+2028 and other separators that JSON strings may
hold raw. Each line is decoded on its own, so text that is not UTF-8 is one bad line, not a failed file.
"""

from __future__ import annotations

import codecs
import gzip
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterator

from bft_megatron.data.errors import DataError, SkipLog

JSON_SUFFIXES = (".jsonl", ".json")
# Skip reasons of records that never became one (they count as records read, not as parsed ones)
UNPARSED_REASONS = ("malformed_json", "not_utf8")


@dataclass(frozen=True)
class RawRecord:
    data: Any
    where: str  # "path:line N" (jsonl), "path:record N" (json array), "path:row N" (parquet/hub/saved dataset)


def is_gzip(path: Path) -> bool:
    return path.suffix == ".gz"


def open_bytes(path: Path) -> IO[bytes]:
    """``path``'s bytes, decompressed when it is a ``.gz`` file."""
    return gzip.open(path, "rb") if is_gzip(path) else path.open("rb")


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based number, bytes) of each line, the UTF-8 byte-order mark (Windows editors) cut from line 1. A
    corrupt or cut-short gzip file is a DataError naming the line it reached."""
    lineno = 0
    try:
        with open_bytes(path) as fh:
            for lineno, line in enumerate(fh, 1):
                yield lineno, (line[len(codecs.BOM_UTF8):] if lineno == 1 and line.startswith(codecs.BOM_UTF8)
                               else line)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}:line {lineno + 1}", f"{_cannot(path)} ({exc})") from exc


def _cannot(path: Path) -> str:
    return "cannot decompress the gzip file" if is_gzip(path) else "cannot read the file"


def is_utf8(path: Path) -> bool:
    """Whether all of ``path`` (decompressed) is UTF-8 text."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with open_bytes(path) as fh:
            while chunk := fh.read(1 << 20):
                decoder.decode(chunk)
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(str(path), f"{_cannot(path)} ({exc})") from exc
    return True


def count_nonblank_lines(path: Path) -> int:
    """The records of a JSON lines file, as :func:`read_jsonl_stdlib` reads them (a DataError as it raises)."""
    return sum(1 for _, line in _lines(path) if line.strip())


def first_char(path: Path) -> str:
    """The first character of ``path`` that is not whitespace ("" for none)."""
    for _, line in _lines(path):
        if line.strip():
            return line.lstrip().decode("utf-8", "replace")[0]
    return ""


def _not_utf8(raw: bytes, start: int) -> str:
    """Why line ``raw``, whose first bad byte is at ``start``, cannot be read."""
    column = len(raw[:start].decode("utf-8", "replace")) + 1  # in characters, as the json module counts
    return f"not UTF-8 text (byte 0x{raw[start]:02x} at column {column}): save the file as UTF-8"


def read_jsonl_stdlib(path: Path, skips: SkipLog) -> Iterator[RawRecord]:
    """One record per non-blank line; a line that is not UTF-8 or not JSON is a DataError or, under skip, counted
    ("not_utf8", "malformed_json")."""
    for lineno, raw in _lines(path):
        if not raw.strip():
            continue
        where = f"{path}:line {lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            skips.handle(DataError(where, _not_utf8(raw, exc.start)), "not_utf8")
            continue
        try:
            # Without its newline: else a line cut short fails at "line 2, column 1", past the newline.
            yield RawRecord(json.loads(line.rstrip("\r\n")), where)
        except json.JSONDecodeError as exc:
            snippet = line.strip()[:80]
            skips.handle(DataError(where, f"malformed JSON ({exc.msg} at column {exc.colno}): {snippet!r}"),
                         "malformed_json")


def first_line_is_object(data: bytes) -> bool:
    """Whether the first non-blank line of ``data`` is a JSON object on its own (JSON lines in a .json file)."""
    line = next((ln for ln in data.split(b"\n") if ln.strip()), b"")
    try:
        return isinstance(json.loads(line.decode("utf-8", "replace")), dict)
    except json.JSONDecodeError:
        return False


def _read_document(path: Path) -> bytes:
    """The file's bytes, decompressed, without a UTF-8 byte-order mark."""
    try:
        with open_bytes(path) as fh:
            data = fh.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(str(path), f"{_cannot(path)} ({exc})") from exc
    return data[len(codecs.BOM_UTF8):] if data.startswith(codecs.BOM_UTF8) else data


def read_json_stdlib(path: Path, skips: SkipLog) -> Iterator[RawRecord]:
    """A list of records, ``{"data": [...]}``, or JSON lines. A document that is not UTF-8 or not JSON names the
    line of its first problem; under skip the whole file is the counted skip."""
    data = _read_document(path)
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        if first_line_is_object(data):  # JSON lines in a .json file (datasets reads them): name the bad line
            yield from read_jsonl_stdlib(path, skips)
            return
        # one JSON document: under on_error=skip the whole file is the counted skip
        skips.handle(_document_error(path, data, exc), "not_utf8" if isinstance(exc, UnicodeDecodeError)
                     else "malformed_json")
        return
    if isinstance(doc, dict) and isinstance(doc.get("data"), list):
        doc = doc["data"]  # the {"data": [...]} wrapper that datasets' json builder also accepts
    if not isinstance(doc, list):
        raise DataError(str(path), f"a .json file must hold a list of records, got {type(doc).__name__}")
    for i, rec in enumerate(doc):
        yield RawRecord(rec, f"{path}:record {i}")


def _document_error(path: Path, data: bytes, exc: ValueError) -> DataError:
    """A JSON document's first problem, at its line."""
    if isinstance(exc, json.JSONDecodeError):
        return DataError(f"{path}:line {exc.lineno}", f"malformed JSON ({exc.msg} at column {exc.colno}); the whole "
                                                      "file is unreadable")
    bad = exc.start if isinstance(exc, UnicodeDecodeError) else 0
    line_start = data.rfind(b"\n", 0, bad) + 1
    lineno = data.count(b"\n", 0, bad) + 1
    return DataError(f"{path}:line {lineno}", f"{_not_utf8(data[line_start:], bad - line_start)}; the whole file is "
                                              "unreadable")
