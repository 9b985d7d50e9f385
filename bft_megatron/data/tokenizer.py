"""One interface over Hugging Face tokenizers (a local directory) and sentencepiece ``.model`` files.

Masking works on character offsets, so the adapter's one essential method is ``encode_offsets``:
token ids plus the character span each token covers. Special-token strings that appear in the text
(``<|im_end|>``, ``</s>``, ...) become their single ids, as in ``apply_chat_template`` output.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bft_megatron.data.errors import DataError

Offsets = list[tuple[int, int]]

# 2: an HF directory's fingerprint covers its tokenizer files only (1 hashed every file, model weights
# included); a sentencepiece file's is unchanged
FINGERPRINT_VERSION = 2
_TOKENIZER_FILES = ("tokenizer", "special_tokens_map", "added_tokens", "vocab", "merges", "chat_template", "spiece",
                    "sentencepiece")


def _hash_files(paths: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for p in sorted(paths):
        digest.update(p.name.encode())
        with p.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


# Files a tokenizer is built from (chat templates, special-token maps and added tokens alone are not one).
_DEFINING_FILES = ("tokenizer", "vocab", "merges", "spiece", "sentencepiece")


def has_tokenizer_files(directory: str | Path) -> bool:
    """Whether ``directory`` holds the files of an HF tokenizer (tokenizer.json, tokenizer_config.json, a
    sentencepiece or tiktoken model, vocab/merges files): the one rule for the data layer and the exporter."""
    p = Path(directory)
    return p.is_dir() and any(f.is_file() and (f.name.startswith(_DEFINING_FILES) or f.suffix == ".tiktoken")
                              for f in p.iterdir())


def check_tokenizer_path(path: str) -> Path:
    """``path`` as an existing HF tokenizer directory or ``.model`` file, or a DataError saying what it is
    (also the trainer's pre-flight check, ``bft_megatron.config.paths.check_paths``)."""
    p = Path(path)
    expected = "expected an HF tokenizer directory or a sentencepiece .model file"
    if p.is_dir():
        if not has_tokenizer_files(p):  # else transformers' "Couldn't instantiate the backend tokenizer"
            from bft_megatron.checkpoint.pointer import HF_SUBDIR  # a convert import's or a checkpoint's copy

            nested = p / HF_SUBDIR
            hint = (f" (a bft-megatron checkpoint keeps its tokenizer in {HF_SUBDIR}/: {nested})"
                    if (nested / "tokenizer_config.json").is_file() else "")
            raise DataError(f"tokenizer={path!r}", f"a directory without tokenizer files (tokenizer.json, "
                                                   f"tokenizer_config.json, tokenizer.model, vocab.*, ...){hint}; "
                                                   f"{expected}")
        return p
    if p.suffix == ".model" and p.is_file():
        return p
    if not p.exists():
        looks_like_hub_id = path.count("/") == 1 and not path.startswith((".", "/", "~"))
        hub = " (a hub id is not downloaded: fetch the tokenizer and give its directory)" if looks_like_hub_id else ""
        cwd = "" if p.is_absolute() else f" (relative paths are taken from {os.getcwd()})"
        raise DataError(f"tokenizer={path!r}", f"no such file or directory{cwd}{hub}; {expected}")
    raise DataError(f"tokenizer={path!r}", f"{expected}, got a {p.suffix or 'suffix-less'} file")


def tokenizer_fingerprint(path: str) -> str:
    """Short sha256 of the files that define the tokenizer (cheap: never a model's weights)."""
    p = check_tokenizer_path(path)
    if not p.is_dir():
        return _hash_files([p])
    files = [f for f in p.iterdir() if f.is_file()]
    chosen = [f for f in files if f.name.startswith(_TOKENIZER_FILES) or f.suffix == ".tiktoken"]
    return _hash_files(chosen or files)


class Tokenizer:
    """Common surface: ``encode_offsets``, ``decode``, special ids, optional chat template."""

    name: str
    vocab_size: int
    eos_id: int
    bos_id: int | None
    pad_id: int
    fingerprint: str
    chat_template: str | None = None

    def encode_offsets(self, text: str) -> tuple[list[int], Offsets]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def token_to_id(self, token: str) -> int | None:
        raise NotImplementedError

    def id_to_token(self, idx: int) -> str:
        raise NotImplementedError

    @property
    def special_texts(self) -> tuple[str, ...]:
        """The strings this tokenizer encodes as a control token wherever they occur in text (``<|eot_id|>``)."""
        return ()

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        raise ValueError(f"tokenizer {self.name} has no chat template; choose template: llama3|chatml|plain")

    @property
    def eos_token(self) -> str:
        return self.id_to_token(self.eos_id)

    @property
    def bos_token(self) -> str | None:
        return None if self.bos_id is None else self.id_to_token(self.bos_id)


class HFTokenizer(Tokenizer):
    def __init__(self, path: str) -> None:
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if not getattr(self._tok, "is_fast", False):
            raise DataError(path, "a fast tokenizer (tokenizer.json) is needed for character offsets")
        self.name = path
        self.vocab_size = len(self._tok)
        if self._tok.eos_token_id is None:
            raise DataError(path, "tokenizer defines no eos_token")
        self.eos_id = int(self._tok.eos_token_id)
        self.bos_id = None if self._tok.bos_token_id is None else int(self._tok.bos_token_id)
        pad = self._tok.pad_token_id
        self.pad_id = int(pad) if pad is not None else self.eos_id
        self.chat_template = getattr(self._tok, "chat_template", None) or None
        self.fingerprint = tokenizer_fingerprint(path)

    def encode_offsets(self, text: str) -> tuple[list[int], Offsets]:
        enc = self._tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids))

    @property
    def special_texts(self) -> tuple[str, ...]:
        return tuple(t.content for t in self._tok.added_tokens_decoder.values() if t.special)

    def token_to_id(self, token: str) -> int | None:
        idx = self._tok.convert_tokens_to_ids(token)
        return None if idx is None or idx == self._tok.unk_token_id else int(idx)

    def id_to_token(self, idx: int) -> str:
        return self._tok.convert_ids_to_tokens(int(idx))

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        if not self.chat_template:
            return super().apply_chat_template(messages, add_generation_prompt)
        return self._tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


class SPTokenizer(Tokenizer):
    """sentencepiece model; control symbols (``<s>``, ``</s>``) written in text are mapped to their ids."""

    def __init__(self, path: str) -> None:
        import sentencepiece as spm

        self._sp = spm.SentencePieceProcessor(model_file=path)
        self.name = path
        self.vocab_size = int(self._sp.get_piece_size())
        self.eos_id = int(self._sp.eos_id())
        if self.eos_id < 0:
            raise DataError(path, "sentencepiece model defines no eos id")
        self.bos_id = int(self._sp.bos_id()) if self._sp.bos_id() >= 0 else None
        self.pad_id = int(self._sp.pad_id()) if self._sp.pad_id() >= 0 else self.eos_id
        self.fingerprint = tokenizer_fingerprint(path)
        controls = [i for i in range(self.vocab_size) if self._sp.is_control(i) and self._sp.id_to_piece(i)]
        self._controls = {self._sp.id_to_piece(i): i for i in controls}
        alternation = "|".join(re.escape(t) for t in sorted(self._controls, key=len, reverse=True))
        self._split = re.compile(f"({alternation})") if alternation else None

    def _encode_plain(self, text: str, base: int) -> tuple[list[int], Offsets]:
        """sentencepiece reports byte offsets; convert them to character offsets of ``text`` (vectorised: a
        per-character Python loop here was most of the preparation time with a sentencepiece tokenizer)."""
        if not text:
            return [], []
        proto = self._sp.encode(text, return_type="proto")
        pieces = [(p.id, p.begin, p.end) for p in proto.pieces]
        if not pieces:
            return [], []
        arr = np.array(pieces, dtype=np.int64)
        begins, ends = arr[:, 1], arr[:, 2]
        raw = text.encode("utf-8")
        if len(raw) != len(text):  # not ASCII: byte b belongs to the character whose first byte is the last at <= b
            char_of_byte = np.empty(len(raw) + 1, dtype=np.int64)
            char_of_byte[:-1] = np.cumsum((np.frombuffer(raw, dtype=np.uint8) & 0xC0) != 0x80) - 1
            char_of_byte[-1] = len(text)
            begins, ends = char_of_byte[begins], char_of_byte[ends]
        return arr[:, 0].tolist(), list(zip((begins + base).tolist(), (ends + base).tolist()))

    def encode_offsets(self, text: str) -> tuple[list[int], Offsets]:
        parts = self._split.split(text) if self._split else [text]
        ids: list[int] = []
        offs: Offsets = []
        pos = 0
        for part in parts:
            if part in self._controls:
                ids.append(self._controls[part])
                offs.append((pos, pos + len(part)))
            else:
                a, b = self._encode_plain(part, pos)
                ids += a
                offs += b
            pos += len(part)
        return ids, offs

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    @property
    def special_texts(self) -> tuple[str, ...]:
        """Control symbols (mapped by :meth:`encode_offsets`) and user-defined pieces that are markup (``<|...|>``;
        sentencepiece itself finds those in text; others, such as a newline piece, are ordinary text)."""
        from sentencepiece import sentencepiece_model_pb2

        model = sentencepiece_model_pb2.ModelProto()
        model.ParseFromString(self._sp.serialized_model_proto())
        defined = [p.piece for p in model.pieces if p.type == model.SentencePiece.USER_DEFINED
                   and len(p.piece) > 2 and p.piece[0] == "<" and p.piece[-1] == ">"]
        return tuple(self._controls) + tuple(defined)

    def token_to_id(self, token: str) -> int | None:
        idx = int(self._sp.piece_to_id(token))
        return None if idx == self._sp.unk_id() and token != self._sp.id_to_piece(idx) else idx

    def id_to_token(self, idx: int) -> str:
        return self._sp.id_to_piece(int(idx))


def load_tokenizer(path: str) -> Tokenizer:
    """A directory means Hugging Face (AutoTokenizer, offline); a ``.model`` file means sentencepiece."""
    return HFTokenizer(path) if check_tokenizer_path(path).is_dir() else SPTokenizer(path)


def describe(tok: Tokenizer) -> dict[str, Any]:
    return {"path": tok.name, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "bos_id": tok.bos_id,
            "pad_id": tok.pad_id, "fingerprint": tok.fingerprint, "fingerprint_version": FINGERPRINT_VERSION}
