"""Folders written by ``datasets``' ``save_to_disk``: a Dataset (``state.json`` beside its ``*.arrow`` files) or a
DatasetDict (``dataset_dict.json`` and one such folder per split). Read with ``datasets.load_from_disk`` (their
Arrow files memory-mapped in place); a DatasetDict's split is the source's ``split`` (default "train").

Read as a directory of data files instead, such a folder yielded its ``state.json`` and ``dataset_info.json`` as
records ("unrecognised record shape (keys ['citation', ...])").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from bft_megatron.data.errors import DataError
from bft_megatron.data.json_text import RawRecord


def is_saved_dataset(path: Path) -> bool:
    """Whether directory ``path`` is a ``save_to_disk`` folder (Dataset or DatasetDict)."""
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and any(path.glob("*.arrow")))


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(str(path), f"cannot read this save_to_disk metadata file ({exc})") from exc


def splits(path: Path) -> list[str] | None:
    """A DatasetDict folder's split names, or None for a Dataset folder."""
    if not (path / "dataset_dict.json").is_file():
        return None
    names = _json(path / "dataset_dict.json").get("splits")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise DataError(str(path / "dataset_dict.json"), "no list of split names under 'splits'")
    return names


def saved_dataset_files(path: Path) -> list[Path]:
    """The files that hold a saved dataset's data (for the provenance of prepared data): its metadata and the
    Arrow files ``state.json`` lists, every split's for a DatasetDict; not other files of the folder."""
    names = splits(path)
    if names is not None:
        return [path / "dataset_dict.json"] + [f for name in names for f in saved_dataset_files(path / name)]
    state = _json(path / "state.json")
    data = state.get("_data_files") if isinstance(state, dict) else None
    if not isinstance(data, list) or not all(isinstance(d, dict) and "filename" in d for d in data):
        raise DataError(str(path / "state.json"), "no list of Arrow files under '_data_files'")
    info = [path / "dataset_info.json"] if (path / "dataset_info.json").is_file() else []
    return [path / "state.json", *info, *(path / d["filename"] for d in data)]


def split_problem(path: Path, split: str | None) -> str | None:
    """Why ``split`` cannot be read from saved dataset ``path`` (None: it can)."""
    names = splits(path)
    if names is not None and (split or "train") not in names:
        return (f"no split {split or 'train'!r} in this saved DatasetDict (splits: {', '.join(names)}); set the "
                "source's split")
    return None


def read_saved(path: Path, split: str | None) -> Iterator[RawRecord]:
    """Every row of a saved Dataset, or of the ``split`` of a saved DatasetDict: ``path:row N`` /
    ``path[split]:row N``."""
    import datasets

    if (why := split_problem(path, split)) is not None:
        raise DataError(str(path), why)
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001 - missing Arrow file, version mismatch...: one error naming the folder
        raise DataError(str(path), f"cannot load this save_to_disk folder: {type(exc).__name__}: {exc}") from exc
    where = str(path)
    if isinstance(ds, datasets.DatasetDict):
        ds, where = ds[split or "train"], f"{path}[{split or 'train'}]"
    for i, rec in enumerate(ds):
        yield RawRecord(rec, f"{where}:row {i}")
