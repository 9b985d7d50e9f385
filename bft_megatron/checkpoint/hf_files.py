"""The Hugging Face files a trainer checkpoint carries: ``<iter dir>/hf/``.

Every checkpoint gets the non-weight files its HF export would write (config.json, generation_config.json,
the tokenizer files and the rendered Jinja chat template), made by the export's own code
(:func:`bft_megatron.convert.hf_config.write_hf_metadata` with the sources the in-job export finds), so that
an export or a generation later uses exactly the tokenizer and template this run trained with, even after the
directory ``data.tokenizer`` names is moved or deleted (the export prefers this copy:
:func:`bft_megatron.convert.sources.find_sources`). The subdirectory has the name an import's run-level copy
has (``pointer.HF_SUBDIR``), but lives in the ``iter_`` directory: it is part of that checkpoint
(written before ``latest`` names it, pruned with it).

A full resume takes them from the resumed checkpoint's ``hf/`` (:meth:`CheckpointHF.resume`), as an export
would: the run's tokenizer directory may be gone by then (prepared data needs none to train), and new checkpoints
rendered from its recorded path would carry no ``hf/``, and, once ``keep_last`` pruned the old ones, no export of
the run would have its tokenizer. Where the training tokenizer is still there, a resume renders them from the
config instead, so a changed ``data.template`` or ``data.tokenizer`` reaches the new checkpoints.

Global rank 0 renders the files once, at the first save (the tokenizer does not change during a run), keeps
them in memory (a few MB) and writes them into every checkpoint through a hidden staging directory renamed to
``hf/`` when complete, so a checkpoint never holds half of them. A run without a tokenizer (synthetic data)
stores nothing and says so once; a failure is a warning (once), never an abort: the weights are what makes a
checkpoint complete, and ``latest`` moves as it would without these files.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from bft_megatron.checkpoint.pointer import HF_SUBDIR
from bft_megatron.utils.logging import get_logger

__all__ = ["CheckpointHF"]

_log = get_logger(__name__)

_STAGE = ".hf.partial"


class CheckpointHF:
    """Writes ``<iter dir>/hf/`` for one run; call :meth:`write` on global rank 0 only."""

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self._files: dict[str, bytes] | None = None  # name -> content, rendered at the first save
        self._no_tokenizer = False  # nothing to store (logged once)
        self._warned = False
        self.resumed: str | None = None  # a full resume's checkpoint, whose hf/ is carried on: :meth:`resume`

    def resume(self, path: str, saved: dict) -> None:
        """A full resume of ``path`` (``saved``: the config it was written with). Where the config's training
        tokenizer is still there, new checkpoints render the files from the config: the resumed checkpoint's copy
        predates any change of ``data.template`` or ``data.tokenizer``, and carried on it would give every later
        checkpoint and export the old chat template and stop ids. Where it is gone, they carry that copy on."""
        from bft_megatron.config.base import to_dict
        from bft_megatron.convert.sources import training_tokenizer

        if training_tokenizer(to_dict(self.cfg)) is not None:
            return
        self.resumed = path
        before = (saved.get("data") or {}).get("template")
        if before is not None and before != self.cfg.data.template:
            _log.warning("resuming %s with data.template=%s (the checkpoint's: %s) and without the training "
                         "tokenizer: this run's checkpoints carry the resumed checkpoint's %s/ files, rendered with "
                         "%s; set data.tokenizer to store the new template", path, self.cfg.data.template, before,
                         HF_SUBDIR, before)

    def write(self, iter_dir: str, dtype) -> bool:
        """Write the files into ``iter_dir/hf``; False (nothing written) when there is no tokenizer or it
        failed. ``dtype``: the model parameters' (config.json's ``dtype``, as the in-job export writes it)."""
        if self._no_tokenizer:
            return False
        stage = os.path.join(iter_dir, _STAGE)
        try:
            files = self._render(dtype)
            if files is None:
                return False
            shutil.rmtree(stage, ignore_errors=True)
            os.makedirs(stage)
            for name, content in files.items():
                with open(os.path.join(stage, name), "wb") as fh:
                    fh.write(content)
            os.replace(stage, os.path.join(iter_dir, HF_SUBDIR))
            return True
        except Exception as exc:  # noqa: BLE001 - training goes on; the checkpoint's weights are complete
            shutil.rmtree(stage, ignore_errors=True)
            if self._warned:
                _log.debug("checkpoint %s: no %s/ files (%s)", iter_dir, HF_SUBDIR, exc)
            else:
                self._warned = True
                _log.warning("checkpoint %s: could not store the tokenizer, chat template and HF config (%s: %s); "
                             "training goes on and the weights are saved, but an export of this run's checkpoints "
                             "must find the tokenizer itself (data.tokenizer, or --tokenizer PATH)",
                             iter_dir, type(exc).__name__, exc)
            return False

    def _render(self, dtype) -> dict[str, bytes] | None:
        if self._files is not None:
            return self._files
        from bft_megatron.config.base import to_dict
        from bft_megatron.convert.hf_config import write_hf_metadata
        from bft_megatron.convert.sources import TRAINER_HINT, find_sources, stored_hf_dir

        sources = find_sources(to_dict(self.cfg), hint=TRAINER_HINT, stored=stored_hf_dir(self.resumed))
        if sources.tokenizer is None:
            # Synthetic data: no tokenizer to store, and none for the export either (it warns there).
            self._no_tokenizer = True
            _log.info("no tokenizer (looked at: %s): checkpoints carry no %s/ files", "; ".join(sources.looked_at),
                      HF_SUBDIR)
            return None
        with tempfile.TemporaryDirectory(prefix="bft_ckpt_hf_") as tmp:
            write_hf_metadata(tmp, self.cfg.model, dtype, sources)
            files = {}
            for name in sorted(n for n in os.listdir(tmp) if os.path.isfile(os.path.join(tmp, n))):
                with open(os.path.join(tmp, name), "rb") as fh:
                    files[name] = fh.read()
        self._files = files
        return files
