"""Loading a checkpoint into a model of another architecture: compare the config's ``model`` with the checkpoint's.

Every checkpoint stores the config it was written with (``common["config"]``: the trainer's ``Checkpointer`` and
``convert import`` both write it, the import's ``model`` section being the HF config.json's). Without a comparison
a shape change (``model.num_query_groups``) ends in megatron's raw ``CheckpointingException`` half-way through
loading, and a change that keeps every shape (``model.rope_theta``, ``model.norm_epsilon``: a Llama-3.1 recipe
pointed at a Llama-3 import) loads and trains silently with another function. :func:`check_architecture` runs on
every rank before any tensor is loaded, for a full resume and for ``finetune`` alike, and raises one
:class:`ConfigError` listing every differing field with both values (reported like the resume-schedule check,
``schedule.py``).

``max_position_embeddings`` changes neither shapes nor the function (RoPE is computed for any position; Llama-3.1
scaling's own length lives in ``rope_scaling``): a warning. ``init_method_std`` only draws weights the load
replaces: ignored. ``make_vocab_size_divisible_by`` only moves the vocabulary padding, which megatron reloads at
another size (``allow_shape_mismatch``: an import padded for TP1 fine-tunes at TP2, tested; a TP1 -> TP2 resume
from 128 to 256 padded rows loaded on CPU too): not compared.
"""

from __future__ import annotations

import math

from bft_megatron.config.base import ConfigError, format_value, to_dict
from bft_megatron.utils.logging import get_logger

__all__ = ["FIELDS", "WARN_FIELDS", "architecture_changes", "check_architecture"]

_log = get_logger(__name__)

# Fields that change parameter shapes or the function the weights compute: a difference is an error.
FIELDS = ("family", "hidden_size", "num_layers", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
          "vocab_size", "rope_theta", "rope_scaling", "norm_epsilon", "tie_embeddings", "qkv_bias", "head_dim",
          "qk_norm", "sliding_window", "sliding_window_pattern", "rope_local_theta", "rope_linear_factor",
          "query_pre_attn_scalar", "partial_rotary_factor")
WARN_FIELDS = ("max_position_embeddings",)
# Fields added after checkpoints were first written: what a checkpoint without them was built with.
LATER_FIELDS = {"head_dim": None, "qk_norm": False, "sliding_window": None, "sliding_window_pattern": None,
                "rope_local_theta": None, "rope_linear_factor": None, "query_pre_attn_scalar": None,
                "partial_rotary_factor": 1.0}


def _value(model: dict, name: str):
    """A field as it acts on the model: ``num_query_groups: null`` means one group per head (MHA)."""
    value = model[name] if name in model else LATER_FIELDS[name]
    if name == "num_query_groups" and value is None:
        return model.get("num_attention_heads")
    if name == "head_dim" and value is None and model.get("num_attention_heads"):  # what head_dim: null means
        return model["hidden_size"] // model["num_attention_heads"]
    if name == "rope_scaling" and isinstance(value, dict):  # keys added later (rope_type, YaRN's, longrope's)
        from dataclasses import asdict

        from bft_megatron.config.schema import RopeScaling

        return {**asdict(RopeScaling()), **value}
    return value


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):  # values that went through YAML/JSON parsing and pickling
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return a == b


def _line(name: str, before, after) -> str:
    return f"model.{name}: checkpoint {format_value(before)}, config {format_value(after)}"


def architecture_changes(saved: dict, current: dict) -> tuple[list[str], list[str], list[str]]:
    """``(errors, warnings, unchecked)``: one line per differing field of the checkpoint's ``model`` section
    ``saved`` and the config's ``current`` (both :func:`to_dict` form), and the fields ``saved`` lacks (a
    checkpoint older than the field)."""
    errors, warnings, unchecked = [], [], []
    for names, out in ((FIELDS, errors), (WARN_FIELDS, warnings)):
        for name in names:
            if name not in saved and name not in LATER_FIELDS:
                unchecked.append(name)
            elif not _same(_value(saved, name), _value(current, name)):
                out.append(_line(name, _value(saved, name), _value(current, name)))
    return errors, warnings, unchecked


def _saved_model(common: dict) -> dict | None:
    config = common.get("config")
    model = config.get("model") if isinstance(config, dict) else None
    return model if isinstance(model, dict) else None


def check_architecture(common: dict, cfg, path: str, finetune: bool, rank: int = 0) -> None:
    """Compare the checkpoint's stored ``model`` config (``common["config"]["model"]``) with ``cfg.model``.

    Differences in :data:`FIELDS` raise :class:`ConfigError` (``finetune`` only changes the message);
    :data:`WARN_FIELDS` log a warning on ``rank`` 0. A checkpoint without a stored model config is loaded
    unchecked (an info log). Reads nothing but ``common``, so every rank decides the same without communicating.
    """
    saved = _saved_model(common)
    if saved is None:
        if rank == 0:
            _log.info("%s stores no model config: its architecture is not compared with this config's", path)
        return
    errors, warnings, unchecked = architecture_changes(saved, to_dict(cfg.model))
    if unchecked and rank == 0:
        _log.info("%s stores no model.%s: not compared with this config's", path, ", model.".join(unchecked))
    if errors:
        source = saved.get("from_hf")
        hint = (f" (or leave them unset: model.from_hf={source} sets them all; model.FIELD=null unsets one the YAML "
                "sets)" if source else "")
        what = "weights only" if finetune else f"iteration {(common.get('train_state') or {}).get('iteration', '?')}"
        lines = "\n  ".join(errors)
        raise ConfigError(
            f"loading {path} ({what}): this config's model differs from the checkpoint's:\n  {lines}\nSet these "
            f"fields to the checkpoint's values{hint}, or load a checkpoint of this architecture.")
    if warnings and rank == 0:
        _log.warning("loading %s: %s (no shape or weight depends on it; positions beyond the checkpoint's were not "
                     "trained)", path, "; ".join(warnings))
