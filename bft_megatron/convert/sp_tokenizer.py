"""A sentencepiece ``.model`` as a Hugging Face fast tokenizer that encodes like the trainer did.

The trainer's :class:`bft_megatron.data.tokenizer.SPTokenizer` maps control pieces written in the text
(``<s>``, ``</s>``, ``<pad>``) to their ids and encodes every stretch between them with
``SentencePieceProcessor.encode``. The ``tokenizers`` pipeline built here does the same: control pieces
are special added tokens (split off first), each stretch between them is normalised as sentencepiece
does (its precompiled charsmap, extra-whitespace removal, dummy prefix, whitespace escaping),
user-defined pieces are isolated (sentencepiece always emits them whole), and the model is the
sentencepiece model's own Unigram or BPE table with its byte fallback. No bos/eos is added on
encoding, as in training (chat templates write them).

Known difference: the literal text ``<unk>`` encodes as the unknown piece here, as characters in
sentencepiece (``tokenizers`` matches every vocabulary entry; sentencepiece never matches its unknown
piece).
"""

from __future__ import annotations

import re

__all__ = ["sentencepiece_to_fast"]

# sentencepiece ModelProto.SentencePiece.Type
_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4
_UNIGRAM, _BPE = 1, 2


def _load_proto(path: str):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    with open(path, "rb") as fh:
        proto.ParseFromString(fh.read())
    return proto


def _bpe_merges(proto) -> list[tuple[str, str]]:
    """sentencepiece BPE keeps no merge list: every split of a normal piece into two normal pieces is a merge,
    ranked by the merged piece's score (higher first), then its id."""
    normal = {p.piece: (p.score, i) for i, p in enumerate(proto.pieces) if p.type == _NORMAL}
    ranked = [(-score, i, piece[:k], piece[k:]) for piece, (score, i) in normal.items()
              for k in range(1, len(piece)) if piece[:k] in normal and piece[k:] in normal]
    return [(left, right) for _, _, left, right in sorted(ranked)]


def _model(proto, path: str):
    from tokenizers import models

    trainer = proto.trainer_spec
    if trainer.model_type == _UNIGRAM:
        vocab = [(p.piece, p.score) for p in proto.pieces]
        return models.Unigram(vocab, unk_id=trainer.unk_id, byte_fallback=trainer.byte_fallback)
    if trainer.model_type == _BPE:
        vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
        # ignore_merges: an isolated user-defined piece (no merges build it) maps straight to its id
        return models.BPE(vocab, _bpe_merges(proto), unk_token=proto.pieces[trainer.unk_id].piece, fuse_unk=True,
                          byte_fallback=trainer.byte_fallback, ignore_merges=True)
    raise ValueError(f"{path}: sentencepiece model type {trainer.model_type} (only unigram and BPE convert to an HF "
                     f"tokenizer)")


def _normalizer(spec):
    from tokenizers import Regex, normalizers

    steps = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:  # spaces only, as sentencepiece
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.add_dummy_prefix:  # per stretch between added tokens, as the trainer's per-stretch encode
        steps.append(normalizers.Prepend(" "))
    if spec.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "\u2581"))
    return normalizers.Sequence(steps)


def _decoder(proto):
    from tokenizers import decoders

    steps = [decoders.Replace("\u2581", " ")]
    if proto.trainer_spec.byte_fallback:
        steps.append(decoders.ByteFallback())
    steps.append(decoders.Fuse())
    if proto.normalizer_spec.add_dummy_prefix:
        steps.append(decoders.Strip(content=" ", left=1))
    return decoders.Sequence(steps)


def sentencepiece_to_fast(path: str, chat_template: str | None = None):
    """``PreTrainedTokenizerFast`` equivalent to the trainer's tokenizer for the ``.model`` at ``path``."""
    from tokenizers import AddedToken, Regex, Tokenizer, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    proto = _load_proto(path)
    tok = Tokenizer(_model(proto, path))
    tok.normalizer = _normalizer(proto.normalizer_spec)
    user = [p.piece for p in proto.pieces if p.type == _USER_DEFINED]
    if user:
        pattern = "|".join(re.escape(u) for u in sorted(user, key=len, reverse=True))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    tok.decoder = _decoder(proto)
    controls = [p.piece for p in proto.pieces if p.type == _CONTROL and p.piece]
    tok.add_special_tokens([AddedToken(c, special=True, normalized=False) for c in controls])
    trainer = proto.trainer_spec

    def piece(idx: int) -> str | None:
        return proto.pieces[idx].piece if 0 <= idx < len(proto.pieces) else None

    eos = piece(trainer.eos_id)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=piece(trainer.bos_id), eos_token=eos,
                                   pad_token=piece(trainer.pad_id) or eos, chat_template=chat_template)
