"""The training config: one dataclass per YAML section. Semantics of every field: docs/training.md."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from bft_megatron.config.base import apply_overrides, from_dict, load_yaml

from bft_megatron.config.data import DataConfig

__all__ = ["RopeScaling", "ModelConfig", "ParallelConfig", "TrainConfig", "LossConfig", "CheckpointConfig",
           "LoggingConfig", "Config", "DataConfig", "load_config", "padded_vocab_size"]


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron pads the vocabulary to a multiple of ``divisible_by * tp`` (padding is stripped on export)."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


@dataclass
class RopeScaling:
    """HF ``rope_scaling``: Llama-3.x's ``llama3`` (the defaults: Llama-3.1's values), YaRN (``yarn``: Qwen2.5 /
    Qwen3 long context; ``factor`` and ``original_max_position_embeddings`` are then the model's own) or Phi3's
    ``longrope`` (Phi-3.5-mini, Phi-3-*-128k, Phi-4-mini: ``short_factor`` / ``long_factor`` per frequency;
    ``factor`` only sets the default attention factor, HF's max_position_embeddings / original length)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0   # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192
    # yarn only (HF's names and defaults): the correction range's rotation bounds, and the attention factor that
    # scales cos/sin (null: 0.1 ln(factor) + 1, or the mscale / mscale_all_dim ratio when both are set)
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None  # yarn and longrope
    truncate: bool = True  # floor/ceil the correction range (HF's default; false: gpt-oss)
    rope_type: Literal["llama3", "yarn", "longrope"] = "llama3"  # the four llama3 fields keep their positions
    # longrope only (added after rope_type, so that every earlier field keeps its position): the divisors of the
    # rotary inverse frequencies (rotary_dim/2 each) for rows up to original_max_position_embeddings (short) and
    # beyond (long; rows that long are refused, docs/training.md)
    short_factor: list[float] | None = None
    long_factor: list[float] | None = None

    def yarn_attention_factor(self) -> float:
        """The factor HF multiplies YaRN's cos and sin by (``_compute_yarn_parameters``)."""
        if self.attention_factor is not None:
            return float(self.attention_factor)

        def get_mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        if self.mscale and self.mscale_all_dim:
            return get_mscale(self.factor, self.mscale) / get_mscale(self.factor, self.mscale_all_dim)
        return get_mscale(self.factor)

    def longrope_attention_factor(self) -> float:
        """The factor HF multiplies longrope's cos and sin by (``_compute_longrope_parameters``), short or long."""
        if self.attention_factor is not None:
            return float(self.attention_factor)
        if self.factor <= 1.0:
            return 1.0
        return math.sqrt(1 + math.log(self.factor) / math.log(self.original_max_position_embeddings))


@dataclass
class ModelConfig:
    """Architecture, HF naming. ``from_hf: DIR`` fills unset fields from ``DIR/config.json``."""

    from_hf: str | None = None
    family: Literal["llama", "qwen2", "qwen3", "mistral", "phi3", "gemma3"] = "llama"
    hidden_size: int = 0
    num_layers: int = 0
    num_attention_heads: int = 0
    num_query_groups: int | None = None  # None = num_attention_heads (MHA)
    ffn_hidden_size: int = 0
    vocab_size: int = 0
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    norm_epsilon: float = 1e-5
    tie_embeddings: bool = False
    qkv_bias: bool = False
    head_dim: int | None = None  # None = hidden_size / num_attention_heads; Qwen3 sets its own (e.g. 128 at 32B)
    qk_norm: bool = False  # RMSNorm of each query and key head before RoPE (Qwen3's q_norm / k_norm)
    # Mistral's / Phi3's / Gemma3's attention window (tokens; None: global), applied once data.seq_length exceeds it
    # (window_binds; below, it changes nothing): Mistral and Phi3 in every layer, Gemma3 in its sliding layers (see
    # sliding_window_pattern).
    sliding_window: int | None = None
    # Gemma 3 only (model.family=gemma3, which also implies its scaled embedding, zero-centred RMSNorms, the norms
    # after attention and MLP, and the gelu-tanh MLP). Its window is real: a layer slides model.sliding_window
    # unless its number (1-based) is a multiple of this pattern (HF's sliding_window_pattern: 6, every 6th global).
    sliding_window_pattern: int | None = None
    rope_local_theta: float | None = None  # RoPE base of the sliding layers (HF rope_local_base_freq: 10000)
    rope_linear_factor: float | None = None  # linear RoPE scaling of the global layers (HF rope_type linear: 8)
    query_pre_attn_scalar: float | None = None  # softmax scale query_pre_attn_scalar**-0.5 (None: head width)
    make_vocab_size_divisible_by: int = 128
    init_method_std: float = 0.02
    # Phi3 only (HF partial_rotary_factor; Phi-4-mini: 0.75): RoPE rotates the first int(head width * factor)
    # channels of each query and key head, the rest pass unrotated (megatron's rotary_percent)
    partial_rotary_factor: float = 1.0

    def window_binds(self, seq_length: int) -> bool:
        """Whether the attention window is narrower than the rows (``data.seq_length``), so that the built model
        applies it: Mistral / Phi3 in every layer, Gemma 3 in its sliding layers. In rows no longer than the window
        it cuts no key and is left off (TE keeps its plain causal kernels; context parallelism stays available);
        Gemma 3's sliding layers keep their local RoPE either way."""
        window = self.sliding_window
        return self.family in ("mistral", "phi3", "gemma3") and window is not None and window < seq_length

    @property
    def kv_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def kv_channels(self) -> int:
        """Channels per attention head (megatron's ``kv_channels``)."""
        return self.head_dim or self.hidden_size // max(self.num_attention_heads, 1)

    @property
    def rotary_dim(self) -> int:
        """Rotated channels per query / key head (HF's ``int(head_dim * partial_rotary_factor)``)."""
        return int(self.kv_channels * self.partial_rotary_factor)

    @property
    def query_size(self) -> int:
        """Width of all query heads together: linear_qkv's query rows and linear_proj's input."""
        return self.num_attention_heads * self.kv_channels

    @property
    def qkv_size(self) -> int:
        """linear_qkv's output rows: the query heads, then one key and one value head per query group."""
        return self.query_size + 2 * self.kv_groups * self.kv_channels


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    vp: int | None = None  # virtual pipeline chunks per pipeline rank (interleaved 1F1B)
    cp: int = 1
    sequence_parallel: bool = False
    distributed_optimizer: bool = True
    overlap_grad_reduce: bool = True
    overlap_param_gather: bool = False
    bucket_size: int | None = None
    # Gradient buffers (accumulation over micro-batches and the DP reduction) in fp32 (default: exact) or, when
    # false in bf16 runs, in bf16: half the buffer memory and DP traffic (Megatron-Bridge's FP8 presets), at the
    # cost of bf16 rounding in every accumulation.
    grad_reduce_in_fp32: bool = True
    timeout_minutes: int = 30


@dataclass
class TrainConfig:
    global_batch_size: int = 8  # rows (sequences) per optimizer step, over all DP ranks
    micro_batch_size: int = 1
    train_iters: int = 100
    lr: float = 1e-5
    min_lr: float = 0.0
    warmup_iters: int = 0
    decay: Literal["cosine", "linear", "constant", "wsd"] = "cosine"
    decay_iters: int | None = None  # None = train_iters
    # decay: wsd (warmup-stable-decay, megatron's WSD): lr stays at train.lr until the last wsd_decay_iters steps
    # before decay_iters, then anneals to min_lr in wsd_decay_style (Megatron-LM's --lr-wsd-decay-style default).
    wsd_decay_iters: int | None = None
    wsd_decay_style: Literal["exponential", "linear", "cosine", "minus_sqrt"] = "exponential"
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    bf16: bool = True
    fp8: Literal["hybrid", "e4m3"] | None = None
    fp8_recipe: Literal["delayed", "tensorwise"] = "tensorwise"
    recompute: Literal["full", "selective"] | None = None
    # Performance options. Weight gradients accumulate straight into the fp32 main_grad buffers: TE's
    # linear layers and the output layer with TE on CUDA (as in Megatron-LM), the word embedding everywhere
    # (pure torch; bft_megatron.model.wgrad);
    gradient_accumulation_fusion: bool = True
    # the MLP (norm, fc1, SwiGLU, fc2) runs through TE's fused operation API (te.ops), same parameters
    # (needs TE).
    te_op_fuser: bool = False
    # FP8: each weight's FP8 copy is cast at a step's first micro-batch and reused by its other micro-batches
    # (TE's Linear; the fused MLP through bft_megatron.model.te_fused_mlp). false: cast for every micro-batch
    # (megatron's disable_parameter_transpose_cache; less memory with several micro-batches in flight, slower).
    fp8_weight_cache: bool = True
    # The output layer and the NLL run on supervised positions only (every objective reads only those): fewer rows
    # in the step's largest GEMMs, by the unsupervised share of the tokens (prompts, padding); false: every row.
    supervised_logits_only: bool = True
    seed: int = 1234
    eval_interval: int = 0  # 0 = no validation
    eval_iters: int | None = 1  # global batches per validation; null = the whole validation split once
    # Also validate before the first step of a run that starts at step 0 (a fresh or fine-tuning run, not a
    # resume): the baseline of the loaded weights (HF TrainingArguments' eval_on_start).
    eval_on_start: bool = False
    exit_duration_minutes: float | None = None
    max_consecutive_skips: int = 3  # non-finite steps in a row before aborting
    dropout: float = 0.0


@dataclass
class LossConfig:
    method: Literal["sft", "dft", "bft"] = "bft"
    variant: Literal["v1", "v3"] = "v1"
    group_size: int = 256
    gamma: float = 1.0
    eps: float = 1e-6
    # Plain SFT for the first N optimizer steps, then `method`. DFT/BFT weight tokens by the model's own
    # confidence, which is meaningless (and self-reinforcing) for a randomly initialised model; 0 for
    # fine-tuning a pretrained one.
    sft_warmup_iters: int = 0
    # torch.compile (inductor) BFT's per-token weight math: ~110 small ops per micro-batch fewer to launch in
    # eager mode. Opt-in: it compiles on an H200 but gained nothing measurable at 1B shapes (docs/loss.md);
    # same values to float rounding; a compiler failure falls back to eager with a warning.
    compile: bool = False


@dataclass
class CheckpointConfig:
    save: str | None = None  # directory; checkpoints go to save/iter_XXXXXXX
    save_interval: int = 0  # 0 = only at the end / on signal
    load: str | None = None  # a run directory (uses its `latest`) or one iter_ directory
    finetune: bool = False  # load weights only: fresh optimizer, scheduler, data position, step 0
    # Full resume whose config gives another LR/weight-decay schedule (train.lr, min_lr, warmup_iters, decay,
    # decay_iters / train_iters, weight_decay) or Adam settings (adam_beta1/2, adam_eps) than the checkpoint's:
    # false = error naming the fields; true = use the config's values from the checkpoint's step on (a warning
    # lists the changes).
    override_scheduler: bool = False
    keep_last: int | None = None  # None = keep all
    async_save: bool = False
    # The data-parallel (x context-parallel) replicas share the writing of what they all hold (the weights, and the
    # optimizer state gathered over DP), as Megatron-LM's --ckpt-fully-parallel-save (its default); false = the first
    # replica writes it all.
    fully_parallel_save: bool = True
    # Each replica reads a part of what they all load and they exchange it (Megatron-LM's
    # --ckpt-fully-parallel-load, off there too): fewer reads of the file system, more memory while loading.
    fully_parallel_load: bool = False
    # The distributed optimizer's state in a checkpoint (megatron's format names). fully_reshardable: per-parameter
    # Adam state that a full resume can load at another TP/PP/VP/CP/DP; each save first gathers the whole optimizer
    # state of a TP/PP shard into host memory on every rank (most of a save's time, docs/benchmarks.md).
    # dp_reshardable (Megatron-LM's default): each rank writes its own flat shard, no gather; a full resume may
    # change DP only (weights-only loads, finetune=true, and HF export read either format at any layout).
    optimizer_format: Literal["fully_reshardable", "dp_reshardable"] = "fully_reshardable"
    save_on_signal: bool = True  # SIGTERM / SIGUSR1 -> save and exit
    export_hf: bool = False  # after the last step, also write HF safetensors to <save>/hf_iter_<N>


@dataclass
class LoggingConfig:
    log_interval: int = 1
    tensorboard_dir: str | None = None
    peak_tflops: float | None = None  # per-GPU peak for MFU; None = the GPU's dense BF16 peak by name
    # Weights & Biases (pip install wandb): on when wandb_project is set; the same scalars as TensorBoard
    wandb_project: str | None = None
    wandb_entity: str | None = None  # team or user; None = W&B's default
    wandb_run_name: str | None = None  # None = checkpoint.save's last two path components
    wandb_dir: str | None = None  # where W&B's wandb/ folder goes; None = checkpoint.save


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """YAML file (optional) + dotted overrides -> :class:`Config` (HF config merged, not validated)."""
    from bft_megatron.config.hf import merge_hf_config

    data = load_yaml(path) if path else {}
    data = apply_overrides(data, list(overrides or []), Config)
    if isinstance(data.get("model"), dict) and data["model"].get("from_hf"):
        data["model"] = _without_unset_nulls(data["model"])
    cfg = from_dict(Config, data)
    if cfg.model.from_hf:
        cfg.model = merge_hf_config(cfg.model, explicit=set((data.get("model") or {}).keys()))
    return cfg


def _without_unset_nulls(model: dict) -> dict:
    """With ``model.from_hf``, a null for a model field that cannot be null (``hidden_size``, ``rope_theta``, ...)
    means "not set here: take config.json's value". It is the only way to unset, from the command line, a field a
    recipe's YAML sets (``model.num_layers=null``), which the architecture check's error suggests. Nullable fields
    (``num_query_groups``, ``rope_scaling``) keep null's own meaning; without ``from_hf`` a null stays an error."""
    import typing

    from bft_megatron.config.base import unwrap_optional

    hints = typing.get_type_hints(ModelConfig)
    return {k: v for k, v in model.items() if v is not None or k not in hints or unwrap_optional(hints[k])[1]}
