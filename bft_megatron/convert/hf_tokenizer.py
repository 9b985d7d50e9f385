"""Write an export's tokenizer (files and chat template) and read its special token ids.

* An HF tokenizer directory: its tokenizer files are copied byte for byte.
* A sentencepiece ``.model``: converted to an HF fast tokenizer that encodes as the trainer did
  (:mod:`bft_megatron.convert.sp_tokenizer`) and saved with ``save_pretrained``.
* A checkpoint's ``hf/`` (what the trainer wrote there with this module when it saved it): every file but
  config.json / generation_config.json copied byte for byte, chat template included, so the export is the
  one an export at that time would have written.

The chat template: the one the training data was rendered with. A built-in one (chatml, llama3 or plain,
as Jinja that renders exactly as training did) replaces any template the tokenizer brings, so
``apply_chat_template`` gives the training token ids; ``data.template: tokenizer`` (and ``tokenizer_generation``)
keeps the tokenizer's. The special ids (bos, eos, pad, and the template's end-of-turn marker, where it has one) go
into config.json and generation_config.json (:mod:`bft_megatron.convert.hf_config`).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass

from bft_megatron.convert.chat_templates import BUILTIN_JINJA, end_of_turn
from bft_megatron.convert.sources import TokenizerSource
from bft_megatron.utils.logging import get_logger

__all__ = ["SpecialIds", "write_tokenizer", "check_auto_tokenizer", "TOKENIZER_FILES"]

_log = get_logger(__name__)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")
_NOT_TOKENIZER = ("config.json", "generation_config.json")  # a checkpoint's hf/ also holds these (written anew)


@dataclass(frozen=True)
class SpecialIds:
    bos: int | None
    eos: int | None
    pad: int | None
    end_of_turn: int | None  # the chat template's turn-closing token, where it has one
    size: int  # number of tokens (len(tokenizer))

    @property
    def generation_eos(self) -> list[int]:
        """Ids that end a generation: eos, then the end-of-turn token."""
        return list(dict.fromkeys(i for i in (self.eos, self.end_of_turn) if i is not None))


def _token_id(tok, token: str | None) -> int | None:
    if not token:
        return None
    idx = tok.convert_tokens_to_ids(token)
    return None if idx is None or (idx == tok.unk_token_id and token != tok.unk_token) else int(idx)


def _special_ids(tok) -> SpecialIds:
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos  # the trainer's fallback too
    return SpecialIds(bos=tok.bos_token_id, eos=eos, pad=pad,
                      end_of_turn=_token_id(tok, end_of_turn(tok.chat_template)), size=len(tok))


def _within(ids: SpecialIds, model_vocab: int) -> SpecialIds:
    """Drop special ids the model has no embedding row for (config.json must not name them)."""
    fields = {k: getattr(ids, k) for k in ("bos", "eos", "pad", "end_of_turn")}
    bad = {k: v for k, v in fields.items() if v is not None and v >= model_vocab}
    if bad:
        _log.warning("special token ids beyond the model's %d rows left out of config.json: %s", model_vocab, bad)
    fields = {k: None if k in bad else v for k, v in fields.items()}
    fields["pad"] = fields["eos"] if fields["pad"] is None else fields["pad"]
    return SpecialIds(size=ids.size, **fields)


def _add_chat_template(out_dir: str, jinja: str) -> None:
    """Put ``jinja`` into the copied tokenizer_config.json (read by transformers 4.x and 5)."""
    path = os.path.join(out_dir, "tokenizer_config.json")
    config = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            config = json.load(fh)
    config["chat_template"] = jinja
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2, ensure_ascii=False)


def _copy_hf(src: TokenizerSource, out_dir: str):
    """Copy an HF tokenizer directory's files with the chat template training used. Returns the tokenizer.

    Training with a built-in template (``data.template`` llama3/chatml/plain) writes that template, replacing
    the tokenizer's own (Meta's adds a date system header, Qwen's a default system prompt: evaluation prompts
    would not be the ones the model was fine-tuned on); ``data.template: tokenizer`` keeps the tokenizer's.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src.path, local_files_only=True)
    builtin = BUILTIN_JINJA.get(src.template or "")
    for name in TOKENIZER_FILES:
        if builtin and name in ("chat_template.jinja", "chat_template.json"):
            continue  # a separate template file would take precedence over the one written below
        if os.path.isfile(os.path.join(src.path, name)):
            shutil.copyfile(os.path.join(src.path, name), os.path.join(out_dir, name))
    if builtin:
        if tok.chat_template:
            _log.info("writing the built-in %r chat template training used in place of %s's own", src.template,
                      src.path)
        _add_chat_template(out_dir, builtin)
        tok.chat_template = builtin
    return tok


def _copy_stored(src: TokenizerSource, out_dir: str):
    """Copy a checkpoint's stored tokenizer files as they are (their chat template is already the training one).

    Returns them loaded with the class the trainer's AutoTokenizer picked in the training tokenizer's directory
    where that still exists: there config.json's ``model_type`` chose it (a ``qwen2`` folder: Qwen2Tokenizer),
    while ``out_dir`` has no config.json yet. Loaded by another class, the files can encode otherwise, and
    :func:`check_auto_tokenizer` compared the export against that instead of training."""
    from transformers import AutoTokenizer

    for name in sorted(os.listdir(src.path)):
        if name not in _NOT_TOKENIZER and os.path.isfile(os.path.join(src.path, name)):
            shutil.copyfile(os.path.join(src.path, name), os.path.join(out_dir, name))
    if src.training and os.path.isdir(src.training):
        trained_class = type(AutoTokenizer.from_pretrained(src.training, local_files_only=True))
        return trained_class.from_pretrained(out_dir, local_files_only=True)
    return AutoTokenizer.from_pretrained(out_dir, local_files_only=True)


def _convert_sentencepiece(src: TokenizerSource, out_dir: str):
    from bft_megatron.convert.sp_tokenizer import sentencepiece_to_fast

    tok = sentencepiece_to_fast(src.path, chat_template=BUILTIN_JINJA.get(src.template or ""))
    tok.save_pretrained(out_dir)
    _portable_tokenizer_class(out_dir)
    return tok


def _portable_tokenizer_class(out_dir: str) -> None:
    """transformers 5 saves our sentencepiece conversion (a generic fast tokenizer) as ``TokenizersBackend``, a
    class transformers 4.x (and the serving stacks pinned to it) cannot load; ``PreTrainedTokenizerFast`` is the
    name both load as that class. HF tokenizer folders are copied as they are (byte for byte)."""
    path = os.path.join(out_dir, "tokenizer_config.json")
    with open(path, encoding="utf-8") as fh:
        config = json.load(fh)
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(config, fh, indent=2, ensure_ascii=False)


def _check_record(ids: SpecialIds, src: TokenizerSource) -> None:
    """Warn when the tokenizer's ids differ from those the prepared training data recorded."""
    record = src.record or {}
    pairs = {"bos_id": ids.bos, "eos_id": ids.eos, "vocab_size": ids.size}
    diff = [f"{k}: data {record[k]} vs tokenizer {v}" for k, v in pairs.items() if k in record and record[k] != v]
    if diff:
        _log.warning("the exported tokenizer %s (%s) differs from the one the training data was tokenized with "
                     "(%s): %s", src.path, src.origin, record.get("path"), "; ".join(diff))


def write_tokenizer(src: TokenizerSource, out_dir: str, model_vocab: int):
    """Write ``src``'s tokenizer files and chat template into ``out_dir``; (its special ids, the tokenizer)."""
    os.makedirs(out_dir, exist_ok=True)
    if src.stored:
        tok = _copy_stored(src, out_dir)
    else:
        tok = _convert_sentencepiece(src, out_dir) if os.path.isfile(src.path) else _copy_hf(src, out_dir)
    ids = _special_ids(tok)
    _check_record(ids, src)
    if ids.size > model_vocab:
        _log.warning("tokenizer %s (%s) has %d tokens but the model only %d embedding rows: is it the one the model "
                     "was trained with?", src.path, src.origin, ids.size, model_vocab)
        ids = _within(ids, model_vocab)
    _log.info("tokenizer from %s (%s): bos=%s eos=%s pad=%s end-of-turn=%s, chat template: %s", src.path, src.origin,
              ids.bos, ids.eos, ids.pad, ids.end_of_turn, "yes" if tok.chat_template else "none")
    return ids, tok


_PROBE_CHAT = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "What is HPO?"},
               {"role": "assistant", "content": "The Human Phenotype Ontology, 2024 release."}]


def _probe_text(tok) -> str:
    """A text whose ids show whether another tokenizer class encodes as ``tok`` does: a rendered chat (the
    template's markers must stay single tokens) when there is a template, else plain text."""
    if tok.chat_template:
        try:
            return tok.apply_chat_template(_PROBE_CHAT, tokenize=False)
        except Exception:  # noqa: BLE001 - a template refusing this chat (e.g. no system role): plain text below
            pass
    return "The Human Phenotype Ontology (HPO), release 2024: abnormal gait."


def _model_type(out_dir: str) -> str | None:
    with open(os.path.join(out_dir, "config.json"), encoding="utf-8") as fh:
        return json.load(fh).get("model_type")


def check_auto_tokenizer(out_dir: str, tok) -> None:
    """Warn when ``AutoTokenizer.from_pretrained(out_dir)`` encodes otherwise than ``tok`` (the tokenizer written).

    Called once config.json is in ``out_dir``: AutoTokenizer picks its class from config.json's ``model_type`` too,
    and transformers 5 loads a ``qwen2`` folder with ``Qwen2Tokenizer`` (a byte-level BPE built from
    tokenizer.json) whatever tokenizer_config.json names, which garbles a converted sentencepiece tokenizer
    (``model.family: qwen2`` trained on a ``.model``). Nothing in the folder can override that, so the export
    says so and names the class that does load it."""
    import transformers
    from transformers import AutoTokenizer

    text = _probe_text(tok)
    want = tok(text, add_special_tokens=False)["input_ids"]
    try:
        auto = AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
        got = auto(text, add_special_tokens=False)["input_ids"]
    except Exception as err:  # noqa: BLE001 - any failure to load is what this check reports
        _log.warning("AutoTokenizer cannot load the exported tokenizer (%s: %s); load it with "
                     "PreTrainedTokenizerFast.from_pretrained(EXPORT_DIR)", type(err).__name__, err)
        return
    if got != want:
        _log.warning("AutoTokenizer loads the exported tokenizer as %s, which encodes otherwise than the training "
                     "tokenizer (%d vs %d ids for a probe chat; transformers %s picks the class from config.json's "
                     "model_type %r): load it with %s.from_pretrained(EXPORT_DIR)",
                     type(auto).__name__, len(got), len(want), transformers.__version__,
                     _model_type(out_dir), _class_name(tok))


def _class_name(tok) -> str:
    """The transformers class that encodes as ``tok`` does, as a user imports it (transformers 5 names its generic
    fast tokenizer TokenizersBackend; PreTrainedTokenizerFast is the name both major versions export)."""
    name = type(tok).__name__
    return "PreTrainedTokenizerFast" if name in ("TokenizersBackend", "PreTrainedTokenizerFast") else name
