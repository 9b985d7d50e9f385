"""Where an HF export takes its config.json template and its tokenizer from.

The tokenizer is the one the training data was tokenized with, so the exported folder encodes (and
chat-templates) as training did. In order:

1. ``--tokenizer PATH`` (offline export only; an HF tokenizer directory or a sentencepiece ``.model``);
2. the checkpoint's own copy, ``<iter dir>/hf/`` (``stored``): the tokenizer files and rendered chat template
   the trainer wrote into the checkpoint when it saved it (:mod:`bft_megatron.checkpoint.hf_files`), copied
   as they are; it outlives a moved or deleted ``data.tokenizer``;
3. the training run's ``data.tokenizer`` (stored with the checkpoint's config), or, when the run read
   an already prepared ``data.output_dir``, the tokenizer recorded in that data's ``train/index.json``;
4. the HF directories that may also hold one: ``--hf DIR``, the checkpoint's ``hf/`` (2), the run's own
   ``hf/`` (an import run directory), the ``hf/`` of the checkpoint the run was started from
   (``checkpoint.load``: an import's, or a trainer checkpoint's of 2), ``model.from_hf``.

config.json comes from the first of the directories in 4 that has one (else it is synthesised from the
stored model section); one that does not describe the weights is an error when given with ``--hf``,
else a warning and a synthesised config.json. With ``--tokenizer`` the checkpoint's ``hf/`` is not used at
all (its config.json carries its own tokenizer's ids). Relative paths are tried from the working directory,
then from the directory that holds the ``bft_megatron`` package (the bundled demo tokenizer's path is
relative to it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from bft_megatron.checkpoint.pointer import HF_SUBDIR, read_latest
from bft_megatron.data.tokenizer import has_tokenizer_files
from bft_megatron.utils.logging import get_logger

__all__ = ["TokenizerSource", "ExportSources", "find_sources", "is_tokenizer", "resolve_path", "stored_hf_dir",
           "training_tokenizer", "CLI_HINT", "TRAINER_HINT"]

_log = get_logger(__name__)
_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CLI_HINT = ("pass --tokenizer PATH (the HF tokenizer directory or sentencepiece .model the data was tokenized with) "
            "or --hf DIR (an HF model directory with config.json and tokenizer files)")
TRAINER_HINT = ("set data.tokenizer (the HF tokenizer directory or sentencepiece .model the data was tokenized with) "
                "or model.from_hf=DIR, or export the saved checkpoint with `bft-megatron convert export --ckpt RUN "
                "--out DIR --tokenizer PATH`")


@dataclass
class TokenizerSource:
    """A tokenizer to export: ``path`` (HF directory or ``.model``), where it was found, the training template."""

    path: str
    origin: str
    template: str | None = None  # data.template the training data was rendered with (None: no training record)
    record: dict | None = None  # the prepared data's tokenizer record: bos_id, eos_id, pad_id, vocab_size, path
    stored: bool = False  # a checkpoint's hf/: files already written for this run's export, copied as they are
    training: str | None = None  # with stored: the training tokenizer's path where it still exists (its class)


@dataclass
class ExportSources:
    template_dir: str | None
    tokenizer: TokenizerSource | None
    looked_at: list[str] = field(default_factory=list)  # where a tokenizer was looked for (for the warning)
    hint: str = CLI_HINT  # the option that supplies a missing tokenizer, for this caller
    template_explicit: bool = False  # template_dir was given (--hf): a mismatch is an error, not a fallback


def resolve_path(path: str | None) -> str | None:
    """``path`` if it exists (absolute or from the working directory), else from the package's parent."""
    if not path:
        return None
    for candidate in (path, None if os.path.isabs(path) else os.path.join(_PACKAGE_PARENT, path)):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


def is_tokenizer(path: str | None) -> bool:
    if not path:
        return False
    if os.path.isfile(path):
        return path.endswith(".model")
    return has_tokenizer_files(path)  # the data layer's rule: a directory the trainer tokenizes with exports too


def stored_hf_dir(ckpt_dir: str | None) -> str | None:
    """``ckpt_dir/hf`` when that checkpoint carries the tokenizer files its trainer stored, else None."""
    if not ckpt_dir:
        return None
    path = os.path.join(ckpt_dir, HF_SUBDIR)
    return path if is_tokenizer(path) else None


def _prepared_record(data: dict) -> tuple[dict | None, str | None]:
    """(tokenizer record, template) of ``data.output_dir/train/index.json``, if that was prepared."""
    out = resolve_path(data.get("output_dir"))
    if not out:
        return None, None
    from bft_megatron.data.storage import is_prepared, read_index

    train = os.path.join(out, "train")
    if not is_prepared(train):
        return None, None
    try:
        index = read_index(train)
    except (ValueError, OSError) as exc:
        _log.warning("cannot read the prepared data's index (%s): no tokenizer record from it", exc)
        return None, None
    return index.get("tokenizer"), index.get("template")


def _training_tokenizer(config: dict) -> tuple[str | None, str, str | None, dict | None]:
    """(recorded path, description, template, prepared-data record) of the tokenizer the training data used."""
    data = config.get("data") or {}
    record, prepared_template = _prepared_record(data)
    # The template the rows were rendered with: the prepared split's record wins (a run that only names
    # data.output_dir trains on the data as prepared, whatever its data.template default says).
    template = prepared_template or data.get("template")
    if data.get("tokenizer"):
        return data["tokenizer"], f"data.tokenizer={data['tokenizer']}", template, record
    if record and record.get("path"):
        return record["path"], f"{data.get('output_dir')}'s tokenizer {record['path']}", prepared_template, record
    return None, "data.tokenizer (not set)", None, None


def training_tokenizer(config: dict) -> str | None:
    """Where the tokenizer the training data was tokenized with is (``data.tokenizer``, else the prepared data's
    record), or None when it is gone or not known."""
    found = resolve_path(_training_tokenizer(config)[0])
    return found if is_tokenizer(found) else None


def _import_hf_dir(load: str | None) -> str | None:
    """The ``hf/`` folder of what ``checkpoint.load`` names: an import's run directory (or its iter_ directory),
    or a trainer checkpoint's own copy (the iter_ directory named, or the one ``latest`` names)."""
    load = resolve_path(load)
    if not load:
        return None
    for base in (load, read_latest(load), os.path.dirname(os.path.normpath(load))):
        if not base:
            continue
        if os.path.isdir(os.path.join(base, HF_SUBDIR)):
            return os.path.join(base, HF_SUBDIR)
    return None


def _explicit_tokenizer(path: str, template: str | None, record: dict | None) -> TokenizerSource:
    found = resolve_path(path)
    if found is None:
        raise FileNotFoundError(f"--tokenizer {path}: no such file or directory (working directory {os.getcwd()})")
    if not is_tokenizer(found):
        raise FileNotFoundError(f"--tokenizer {path}: neither an HF tokenizer directory nor a sentencepiece .model")
    return TokenizerSource(found, "--tokenizer", template, record)


def find_sources(config: dict | None, hf_dir: str | None = None, tokenizer: str | None = None,
                 run_dir: str | None = None, hint: str = CLI_HINT, stored: str | None = None) -> ExportSources:
    """Template dir and tokenizer for an export; ``config`` is the training config as a dict (may be empty),
    ``stored`` the checkpoint's ``hf/`` (:func:`stored_hf_dir`), ignored when ``tokenizer`` is given."""
    config = config or {}
    if hf_dir and not (os.path.isfile(os.path.join(hf_dir, "config.json")) or is_tokenizer(hf_dir)):
        raise FileNotFoundError(f"--hf {hf_dir}: neither config.json nor tokenizer files there")
    stored = None if tokenizer else stored
    dirs = [("--hf", hf_dir), ("the checkpoint's hf/", stored),
            ("the run's hf/", os.path.join(run_dir, HF_SUBDIR) if run_dir else None),
            ("the hf/ of checkpoint.load", _import_hf_dir((config.get("checkpoint") or {}).get("load"))),
            ("model.from_hf", resolve_path((config.get("model") or {}).get("from_hf")))]
    template = next((d for _, d in dirs if d and os.path.isfile(os.path.join(d, "config.json"))), None)
    explicit = bool(hf_dir) and template == hf_dir
    recorded, described, template_name, record = _training_tokenizer(config)
    found = resolve_path(recorded)
    trained = TokenizerSource(found, described, template_name, record) if is_tokenizer(found) else None
    if tokenizer:
        return ExportSources(template, _explicit_tokenizer(tokenizer, template_name, record), hint=hint,
                             template_explicit=explicit)
    if is_tokenizer(stored):  # what this checkpoint's export wrote then: the recorded path no longer matters
        return ExportSources(template, TokenizerSource(stored, f"the checkpoint's copy {stored}", template_name,
                                                       record, stored=True, training=trained and trained.path),
                             hint=hint, template_explicit=explicit)
    if recorded and trained is None:
        _log.warning("the training tokenizer %s is not there (moved, or another machine): looking for one in the "
                     "HF directories; %s", described, hint)
    source = trained or next((TokenizerSource(d, f"{name} {d}", template_name, record)
                              for name, d in dirs if is_tokenizer(d)), None)
    looked = [described] + [f"{name} ({d or 'none'})" for name, d in dirs]
    return ExportSources(template, source, looked, hint, explicit)
