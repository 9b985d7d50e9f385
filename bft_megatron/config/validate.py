"""Config validation: every check runs before any model or GPU memory exists.

:func:`validate` raises :class:`ConfigError` (a ``ValueError``) naming the field(s) and value(s).
It returns the derived layout (data-parallel size, micro-batches per step) so callers do not
recompute it differently.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

from bft_megatron.config.base import ConfigError, format_value, non_finite_floats
from bft_megatron.config.hf import HF_NAMES
from bft_megatron.config.rope_checks import check_longrope_rows, check_phi3_rope, longrope_warnings
from bft_megatron.config.schema import Config

__all__ = ["Layout", "validate", "config_warnings", "error_hint", "have_transformer_engine"]


@dataclass(frozen=True)
class Layout:
    world_size: int
    dp: int
    num_microbatches: int  # per DP rank per optimizer step


def have_transformer_engine() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _check_window(cfg: Config) -> None:
    """A sliding window (Gemma 3's sliding layers; Mistral's / Phi3's every layer once data.seq_length exceeds it) is
    applied by the attention (model/builder.py, model/gemma3.py). TE's point-to-point context parallelism (megatron's
    default cp_comm_type p2p) asserts that no window is set, so the builder switches such models to TE's all-to-all
    CP (cp_comm_type a2a, which takes windows; from TE 2.20's source), which swaps sequence shards for head shards:
    the query and the key/value heads of each tensor-parallel rank must split over the CP ranks. Our reference
    attention (no TE) needs neither."""
    m, p = cfg.model, cfg.parallel
    if not m.window_binds(cfg.data.seq_length) or p.cp == 1 or not have_transformer_engine():
        return
    heads, kv = m.num_attention_heads // p.tp, m.kv_groups // p.tp
    _require(heads % p.cp == 0 and kv % p.cp == 0, f"parallel.cp={p.cp} with model.family={m.family} under "
             f"Transformer Engine: the window applies (model.sliding_window={m.sliding_window} < data.seq_length="
             f"{cfg.data.seq_length}), so context parallelism runs all-to-all (TE's cp_comm_type a2a; its p2p ring "
             f"has no sliding-window attention), which needs the attention heads per tensor-parallel rank "
             f"({heads} = model.num_attention_heads / parallel.tp) and the key/value heads per rank ({kv} = "
             f"model.num_query_groups / parallel.tp) to be multiples of parallel.cp; use a parallel.cp dividing both, "
             "or rows no longer than the window")


def _check_model(m) -> None:
    for name in ("hidden_size", "num_layers", "num_attention_heads", "ffn_hidden_size", "vocab_size",
                 "max_position_embeddings"):
        value = getattr(m, name)
        _require(value > 0, f"model.{name} must be > 0, got {value} (set it or use model.from_hf)")
    # Megatron pads the vocabulary up to a multiple of it: 0 divides by zero, a negative multiple rounds the
    # embedding table *down* (-128 gives 2944 rows for 3000 tokens).
    _require(m.make_vocab_size_divisible_by >= 1,
             f"model.make_vocab_size_divisible_by must be >= 1, got {m.make_vocab_size_divisible_by}")
    _require(m.head_dim is not None or m.hidden_size % m.num_attention_heads == 0,
             f"model.hidden_size={m.hidden_size} must be divisible by "
             f"model.num_attention_heads={m.num_attention_heads} (or set model.head_dim)")
    # RoPE rotates channel pairs: an odd head width has a channel it cannot pair
    _require(m.head_dim is None or (m.head_dim > 0 and m.head_dim % 2 == 0),
             f"model.head_dim must be a positive even number or null (= hidden_size/num_attention_heads), "
             f"got {m.head_dim}")
    # 0 used to mean MHA silently (kv_groups falls back to the heads); null is the documented spelling.
    _require(m.num_query_groups is None or m.num_query_groups >= 1,
             f"model.num_query_groups must be >= 1 or null (= model.num_attention_heads), got {m.num_query_groups}")
    _require(m.kv_groups > 0 and m.num_attention_heads % m.kv_groups == 0,
             f"model.num_attention_heads={m.num_attention_heads} must be divisible by "
             f"model.num_query_groups={m.num_query_groups}")
    # model.family names the HF architecture of the export: its attention biases must be what that class builds.
    _require(m.family != "qwen2" or m.qkv_bias, "model.qkv_bias=false with model.family=qwen2: Qwen2 attention "
             "always has q/k/v biases (and the export would not match the weights); set model.qkv_bias=true")
    why = (f"HF {HF_NAMES[m.family]}'s attention has no biases" if m.family in ("mistral", "phi3") else
           f"HF {HF_NAMES[m.family]}'s attention_bias also adds an o_proj bias this model does not have")
    _require(m.family == "qwen2" or not m.qkv_bias, f"model.qkv_bias=true with model.family={m.family}: {why}, so "
             "its export would not load; use model.family=qwen2 for q/k/v biases")
    _require(m.sliding_window is None or (m.family in ("mistral", "phi3", "gemma3") and m.sliding_window >= 1),
             f"model.sliding_window={m.sliding_window} with model.family={m.family}: only Mistral's, Phi3's and "
             "Gemma3's exports have a sliding window (>= 1); leave it null")
    _check_gemma3(m)
    check_phi3_rope(m)  # longrope and partial rotary (Phi3 only; config/rope_checks.py)
    head_norms = m.family in ("qwen3", "gemma3")
    _require(head_norms == m.qk_norm, f"model.qk_norm={str(m.qk_norm).lower()} with model.family="
             f"{m.family}: of the exported architectures only Qwen3 and Gemma3 normalise query and key heads (q_norm, "
             "k_norm); " + ("set model.qk_norm=true" if head_norms else "use model.family=qwen3 for it"))
    _require(m.rope_theta > 0, f"model.rope_theta must be > 0, got {m.rope_theta}")
    _require(m.norm_epsilon > 0, f"model.norm_epsilon must be > 0, got {m.norm_epsilon}")
    # torch's normal_ rejects a negative std only at model build (after the process groups exist), and 0 would
    # make every weight of a from-scratch model zero, and with them every gradient: it could never train.
    _require(m.init_method_std > 0, f"model.init_method_std must be > 0, got {m.init_method_std}")
    rs = m.rope_scaling
    if rs is not None and rs.rope_type == "yarn":
        _check_yarn(rs)
    elif rs is not None and rs.rope_type == "llama3":
        _require(rs.factor > 0, f"model.rope_scaling.factor must be > 0, got {rs.factor}")
        _require(rs.high_freq_factor > rs.low_freq_factor > 0,
                 f"model.rope_scaling needs high_freq_factor > low_freq_factor > 0, got "
                 f"{rs.high_freq_factor} and {rs.low_freq_factor}")
        # The wavelength thresholds are this length over the frequency factors: at <= 0 every frequency counts as
        # low and is divided by factor, a silently different model.
        _require(rs.original_max_position_embeddings >= 1, "model.rope_scaling.original_max_position_embeddings "
                 f"must be >= 1, got {rs.original_max_position_embeddings}")


def _check_yarn(rs) -> None:
    """YaRN's ranges as HF validates them (``_validate_yarn_parameters``), as errors: a factor below 1 would shrink
    the context, a correction range with beta_fast <= beta_slow is empty."""
    _require(rs.factor >= 1, f"model.rope_scaling.factor must be >= 1 for rope_type yarn, got {rs.factor}")
    _require(rs.original_max_position_embeddings >= 1, "model.rope_scaling.original_max_position_embeddings must be "
             f">= 1, got {rs.original_max_position_embeddings}")
    _require(rs.beta_fast > rs.beta_slow > 0, f"model.rope_scaling needs beta_fast > beta_slow > 0 for rope_type "
             f"yarn, got {rs.beta_fast} and {rs.beta_slow}")
    for name in ("mscale", "mscale_all_dim", "attention_factor"):
        value = getattr(rs, name)
        _require(value is None or value > 0, f"model.rope_scaling.{name} must be > 0 or null, got {value}")


_GEMMA3_FIELDS = ("sliding_window_pattern", "rope_local_theta", "rope_linear_factor", "query_pre_attn_scalar")


def _check_gemma3(m) -> None:
    """Gemma 3's own fields: set (and positive) with model.family=gemma3, null with every other family."""
    if m.family != "gemma3":
        for name in _GEMMA3_FIELDS:
            _require(getattr(m, name) is None, f"model.{name}={getattr(m, name)} with model.family={m.family}: only "
                     "Gemma 3 (model.family=gemma3) has it; leave it null")
        return
    for name in ("sliding_window_pattern", "rope_local_theta", "query_pre_attn_scalar"):
        value = getattr(m, name)
        _require(value is not None and value > 0, f"model.{name} must be > 0 with model.family=gemma3, got {value} "
                 "(model.from_hf fills it from config.json)")
    _require(m.rope_linear_factor is None or m.rope_linear_factor > 0,
             f"model.rope_linear_factor must be > 0 or null (no scaling), got {m.rope_linear_factor}")
    _require(m.rope_scaling is None, "model.rope_scaling (llama3/yarn) is set with model.family=gemma3: Gemma 3 scales "
             "its global layers' RoPE linearly (model.rope_linear_factor); leave model.rope_scaling null")
    slides = m.sliding_window_pattern <= m.num_layers
    _require(m.sliding_window is not None or not slides, f"model.sliding_window=null with model.family=gemma3 and "
             f"model.sliding_window_pattern={m.sliding_window_pattern} (sliding layers need a window)")


def _check_parallel(cfg: Config, world_size: int) -> int:
    p, m = cfg.parallel, cfg.model
    for name in ("tp", "pp", "cp"):
        _require(getattr(p, name) >= 1, f"parallel.{name} must be >= 1, got {getattr(p, name)}")
    mp = p.tp * p.pp * p.cp
    _require(world_size % mp == 0, f"world size {world_size} is not divisible by parallel.tp*pp*cp = "
                                   f"{p.tp}*{p.pp}*{p.cp} = {mp} (tp*pp*cp*dp must equal the world size)")
    _require(m.num_attention_heads % p.tp == 0,
             f"model.num_attention_heads={m.num_attention_heads} must be divisible by parallel.tp={p.tp}")
    _require(m.kv_groups % p.tp == 0, f"model.num_query_groups={m.kv_groups} must be divisible by parallel.tp={p.tp}")
    # fc2 is row-parallel over the FFN width (and each rank's fc1 holds its gate and up halves): megatron's
    # divide() would fail an assert at model build, after the process groups exist.
    _require(m.ffn_hidden_size % p.tp == 0,
             f"model.ffn_hidden_size={m.ffn_hidden_size} must be divisible by parallel.tp={p.tp}")
    # A negative vp passed the layer check below (80 % -8 == 0) and gave the planner negative chunk counts.
    _require(p.vp is None or p.vp >= 1, f"parallel.vp must be >= 1 or null (no interleaving), got {p.vp}")
    if p.vp is not None and p.vp > 1:
        _require(p.pp > 1, f"parallel.vp={p.vp} (interleaved pipeline) requires parallel.pp > 1, got pp={p.pp}")
    chunks = p.pp * (p.vp or 1)
    _require(m.num_layers % chunks == 0,
             f"model.num_layers={m.num_layers} must be divisible by parallel.pp*vp = {p.pp}*{p.vp or 1} = {chunks}")
    seq = cfg.data.seq_length
    _require(seq >= 2, f"data.seq_length must be >= 2 (a prompt token and a target), got {seq}")
    if p.cp > 1:
        _require(seq % (2 * p.cp) == 0, f"data.seq_length={seq} must be divisible by 2*parallel.cp = {2 * p.cp}")
    if p.sequence_parallel:
        _require(p.tp > 1, "parallel.sequence_parallel=true requires parallel.tp > 1")
        _require((seq // p.cp) % p.tp == 0,
                 f"data.seq_length/parallel.cp = {seq}/{p.cp} must be divisible by parallel.tp={p.tp} "
                 "with sequence_parallel")
    if p.overlap_param_gather:
        _require(p.distributed_optimizer, "parallel.overlap_param_gather=true requires parallel.distributed_optimizer")
    # A timeout of 0 minutes fails the first collective that has to wait at all. Megatron closes a gradient bucket
    # once it holds >= bucket_size elements: <= 0 gives one bucket (one padded collective) per parameter.
    _require(p.timeout_minutes >= 1, f"parallel.timeout_minutes must be >= 1, got {p.timeout_minutes}")
    _require(p.bucket_size is None or p.bucket_size >= 1,
             f"parallel.bucket_size must be >= 1 or null (megatron's default), got {p.bucket_size}")
    return world_size // mp


def packed_row_multiple(cp: int, tp_sp: int) -> int:
    """Multiple that a packed micro-batch's length is rounded to under context parallelism: every CP and
    SP shard whole and a multiple of 8 tokens (FP8 GEMMs); ``tp_sp`` = TP with sequence parallel, else 1."""
    return 16 * cp * tp_sp


def _check_optimizer(t) -> None:
    """Adam, clipping and the LR schedule's length (torch's Adam and megatron's scheduler would fail or silently
    adjust later)."""
    for name in ("adam_beta1", "adam_beta2"):
        value = getattr(t, name)
        _require(0.0 <= value < 1.0, f"train.{name} must be in [0, 1), got {value}")
    _require(t.adam_eps > 0, f"train.adam_eps must be > 0, got {t.adam_eps} (typically 1e-8)")
    _require(t.weight_decay >= 0, f"train.weight_decay must be >= 0, got {t.weight_decay}")
    _require(t.clip_grad >= 0, f"train.clip_grad must be >= 0, got {t.clip_grad}")
    if t.decay_iters is not None:
        _require(t.decay_iters >= 1, f"train.decay_iters must be >= 1 or null (= train.train_iters), got "
                                     f"{t.decay_iters}")
        _require(t.decay_iters >= t.warmup_iters,
                 f"train.decay_iters={t.decay_iters} must be >= train.warmup_iters={t.warmup_iters}: the decay to "
                 f"train.min_lr ends at decay_iters, after the warmup (null: train.train_iters)")
    _check_wsd(t)


def _check_wsd(t) -> None:
    """megatron's WSD anneal spans the last ``wsd_decay_iters`` steps before ``decay_iters``, after the warmup."""
    if t.decay != "wsd":
        _require(t.wsd_decay_iters is None, f"train.wsd_decay_iters={t.wsd_decay_iters} is only used with "
                                            f"train.decay=wsd (got train.decay={t.decay}); leave it null")
        return
    room = (t.decay_iters or t.train_iters) - t.warmup_iters
    got = format_value(t.wsd_decay_iters)
    _require(t.wsd_decay_iters is not None and 1 <= t.wsd_decay_iters <= room,
             f"train.decay=wsd needs train.wsd_decay_iters in [1, {room}] (the anneal steps at the end of "
             f"train.decay_iters or train.train_iters, after train.warmup_iters), got {got}")


def _check_fp8_widths(m, tp: int, fp8: str) -> None:
    """TE's FP8 GEMMs assert (``assert_dim_for_fp8_exec``, at the first forward on the GPU) that every input's
    last dimension is a multiple of 16 and a weight's rows a multiple of 8: the inputs of linear_qkv / fc1
    (hidden), of linear_proj (hidden/tp per rank) and of fc2 (ffn/tp), and linear_qkv's rows per rank."""
    queries = "model.hidden_size" if m.head_dim is None else "model.num_attention_heads*head_dim"
    for name, width, multiple in (("model.hidden_size", m.hidden_size, 16),
                                  (f"{queries}/parallel.tp", m.query_size // tp, 16),
                                  ("model.ffn_hidden_size/parallel.tp", m.ffn_hidden_size // tp, 16),
                                  (f"({queries} + 2*num_query_groups*head_dim)/parallel.tp", m.qkv_size // tp, 8)):
        _require(width % multiple == 0, f"train.fp8={fp8!r}: {name} = {width} must be a multiple of {multiple} "
                                        "(Transformer Engine's FP8 GEMM shapes)")


def _check_train(cfg: Config, dp: int, require_te: bool = True) -> int:
    t, p = cfg.train, cfg.parallel
    _require(t.micro_batch_size >= 1, f"train.micro_batch_size must be >= 1, got {t.micro_batch_size}")
    step = t.micro_batch_size * dp
    near = sorted({max(step, t.global_batch_size // step * step), -(-t.global_batch_size // step) * step})
    _require(t.global_batch_size % step == 0,
             f"train.global_batch_size={t.global_batch_size} must be divisible by train.micro_batch_size*dp = "
             f"{t.micro_batch_size}*{dp} = {step} (e.g. {' or '.join(map(str, near))})")
    _require(t.global_batch_size > 0, f"train.global_batch_size must be > 0, got {t.global_batch_size}")
    _require(t.train_iters > 0, f"train.train_iters must be > 0, got {t.train_iters}")
    _require(t.lr > 0, f"train.lr must be > 0, got {t.lr}")
    _require(0 <= t.min_lr <= t.lr, f"train.min_lr={t.min_lr} must be in [0, train.lr={t.lr}]")
    _require(0 <= t.warmup_iters <= t.train_iters,
             f"train.warmup_iters={t.warmup_iters} must be in [0, train.train_iters={t.train_iters}]")
    _check_optimizer(t)
    _require(0.0 <= t.dropout < 1.0, f"train.dropout must be in [0, 1), got {t.dropout}")
    _require(t.max_consecutive_skips >= 1, f"train.max_consecutive_skips must be >= 1, got {t.max_consecutive_skips}")
    _require(t.eval_interval >= 0, f"train.eval_interval must be >= 0, got {t.eval_interval}")
    _require(t.eval_iters is None or t.eval_iters >= 1,
             f"train.eval_iters must be >= 1 or null (the whole validation split once), got {t.eval_iters}")
    # 0 would stop after the first step (and save), while Megatron-LM's --exit-duration-in-mins 0 means no limit.
    _require(t.exit_duration_minutes is None or t.exit_duration_minutes > 0,
             f"train.exit_duration_minutes must be > 0 or null (no time limit), got {t.exit_duration_minutes}")
    # numpy's global seed takes [0, 2**32), and each pipeline stage seeds with train.seed + 100 * its rank.
    _require(0 <= t.seed < 2**31, f"train.seed must be in [0, 2**31), got {t.seed}")
    # The data layer checks data.seed only with data.train sources; prepared or synthetic data is shuffled with it too
    # (numpy's default_rng([seed, epoch]) rejects a negative one at the first batch, after the model is built).
    _require(cfg.data.seed >= 0, f"data.seed must be >= 0, got {cfg.data.seed}")
    if t.fp8 is not None:
        _require(not require_te or have_transformer_engine(),
                 f"train.fp8={t.fp8!r} requires Transformer Engine, which is not installed")
        _require(t.bf16, f"train.fp8={t.fp8!r} requires train.bf16=true")
        shards = p.cp * (p.tp if p.sequence_parallel else 1)
        _require(cfg.data.seq_length % (8 * shards) == 0,
                 f"train.fp8={t.fp8!r}: data.seq_length={cfg.data.seq_length} must be a multiple of 8*cp*(tp with "
                 f"sequence parallel) = {8 * shards} (FP8 GEMMs need a multiple of 8 tokens per rank)")
        _check_fp8_widths(cfg.model, p.tp, t.fp8)
    if t.te_op_fuser:
        _require(not require_te or have_transformer_engine(),
                 "train.te_op_fuser=true requires Transformer Engine, which is not installed")
        # TE's fused MLP has no gated tanh-gelu, and its norm no place for Gemma 3's norm after fc2
        _require(cfg.model.family != "gemma3", "train.te_op_fuser=true with model.family=gemma3 is not supported "
                 "(TE's fused MLP has no gelu-tanh gate nor Gemma 3's post-MLP norm); set train.te_op_fuser=false")
    num_micro = t.global_batch_size // (t.micro_batch_size * dp)
    if p.vp is not None and p.vp > 1:
        _require(num_micro % p.pp == 0, f"interleaved pipeline: micro-batches per step = global_batch_size/"
                                        f"(micro_batch_size*dp) = {num_micro} must be divisible by parallel.pp={p.pp}")
    return num_micro


def _check_loss_ckpt(cfg: Config) -> None:
    lo, c = cfg.loss, cfg.checkpoint
    _require(lo.group_size >= 1, f"loss.group_size must be >= 1, got {lo.group_size}")
    _require(lo.gamma > 0, f"loss.gamma must be > 0, got {lo.gamma}")
    _require(lo.eps > 0, f"loss.eps must be > 0, got {lo.eps}")
    _require(lo.sft_warmup_iters >= 0, f"loss.sft_warmup_iters must be >= 0, got {lo.sft_warmup_iters}")
    _require(c.save_interval >= 0, f"checkpoint.save_interval must be >= 0, got {c.save_interval}")
    _require(not (c.save_interval and not c.save), f"checkpoint.save_interval={c.save_interval} needs checkpoint.save")
    _require(c.keep_last is None or c.keep_last >= 1, f"checkpoint.keep_last must be >= 1 or null, got {c.keep_last}")
    _require(not (c.finetune and not c.load), "checkpoint.finetune=true needs checkpoint.load")
    _require(not (c.export_hf and not c.save),
             "checkpoint.export_hf=true needs checkpoint.save (the export goes to <save>/hf_iter_<N>)")


def _check_logging(cfg: Config, require_installed: bool) -> None:
    lc = cfg.logging
    _require(lc.log_interval >= 1, f"logging.log_interval must be >= 1, got {lc.log_interval}")
    _require(lc.peak_tflops is None or lc.peak_tflops > 0,
             f"logging.peak_tflops must be > 0 or null (auto), got {lc.peak_tflops}")
    if lc.wandb_project:
        _require(not require_installed or importlib.util.find_spec("wandb") is not None,
                 f"logging.wandb_project={lc.wandb_project!r} needs the wandb package, which is not installed "
                 "(pip install wandb), or unset it")


def validate(cfg: Config, world_size: int, require_te: bool = True) -> Layout:
    """Check ``cfg`` for ``world_size`` processes; raise :class:`ConfigError` naming field and value.
    ``require_te=False`` (``bft-megatron plan``, on a machine without GPUs) skips only the checks that packages
    are installed (Transformer Engine for ``train.fp8`` / ``train.te_op_fuser``, wandb for
    ``logging.wandb_project``); everything else is checked."""
    _require(world_size >= 1, f"world size must be >= 1, got {world_size}")
    bad = non_finite_floats(cfg)  # before the range checks: inf passes lr > 0, nan would get a misleading message
    if bad:
        raise ConfigError(f"{bad[0][0]} must be a finite number, got {bad[0][1]}")
    _check_model(cfg.model)
    _check_window(cfg)
    check_longrope_rows(cfg)
    dp = _check_parallel(cfg, world_size)
    num_micro = _check_train(cfg, dp, require_te)
    _check_loss_ckpt(cfg)
    _check_logging(cfg, require_te)
    if cfg.data.train:  # sources to prepare: the data layer's own checks (tokenizer, template, ...)
        cfg.data.validate()
    return Layout(world_size=world_size, dp=dp, num_microbatches=num_micro)


def config_warnings(cfg: Config, eval_only: bool = False) -> list[str]:
    """Settings that are valid but probably not what was meant (logged by the trainer, ``--check`` and
    ``--dry-run``); ``eval_only`` (``--eval-only``): those about training (prepares and checks data.valid alone)."""
    out = []
    m, t, lo = cfg.model, cfg.train, cfg.loss
    unused = [f"logging.{k}" for k in ("wandb_entity", "wandb_run_name", "wandb_dir") if getattr(cfg.logging, k)]
    if unused and not cfg.logging.wandb_project:
        out.append(f"{', '.join(unused)} set but logging.wandb_project is not: no W&B logging")
    if cfg.data.seq_length > m.max_position_embeddings:
        out.append(f"data.seq_length={cfg.data.seq_length} exceeds model.max_position_embeddings="
                   f"{m.max_position_embeddings}: positions beyond the model's context length")
    out += longrope_warnings(m)
    if lo.method != "sft" and lo.sft_warmup_iters >= t.train_iters:
        out.append(f"loss.sft_warmup_iters={lo.sft_warmup_iters} >= train.train_iters={t.train_iters}: "
                   f"loss.method={lo.method} never runs (every step is SFT)")
    d = cfg.data
    if d.valid and not d.train and d.output_dir and not eval_only:  # without data.output_dir: refused (preflight)
        out.append(f"data.valid lists {len(d.valid)} source(s) but data.train none: a training run neither prepares "
                   f"nor compares them; it reads {d.output_dir} as prepared (its valid/ split only if present). List "
                   "data.train too to prepare both (--eval-only prepares and checks data.valid alone)")
    c = cfg.checkpoint
    unused = [f"checkpoint.{k}={format_value(v)}" for k, v in (("async_save", c.async_save),
                                                                ("keep_last", c.keep_last)) if v]
    if unused and not c.save:
        out.append(f"{' and '.join(unused)} without checkpoint.save: nothing is saved, so they do nothing")
    elif not c.save and (d.train or d.output_dir):  # real data; a synthetic-data run (a smoke test) saves nothing
        out.append("checkpoint.save is not set: the trained weights are not saved (no checkpoint at the end or on a "
                   "signal, no HF export)")
    return out


def error_hint(message: str, config_file: str | None) -> str:
    """What to add to a config error's message for a command-line user ("" when nothing helps)."""
    hints = []
    if "WORLD_SIZE" not in os.environ and "world size" in message:
        hints.append("outside torchrun the world size is 1: set WORLD_SIZE=N to check or plan for N processes")
    if config_file is None and message.startswith("model.") and not message.startswith("model.from_hf"):
        hints.append("no --config was given: start from a recipe, e.g. --config configs/demo_cpu.yaml or "
                     "configs/llama3.1_8b.yaml (or set model.from_hf=DIR)")
    return "".join(f"; {h}" for h in hints)
