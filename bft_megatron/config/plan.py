"""``bft-megatron plan``: per-GPU memory and a throughput estimate for a config, before any GPU is touched.

The model is analytic (documented term by term in docs/launch.md) and uses the trainer's actual choices:
bf16 parameters, fp32 gradient buffers (bf16 with ``parallel.grad_reduce_in_fp32=false``), Adam with fp32 master
weights and two moments (sharded over data-parallel ranks with the distributed optimizer), TE fused attention (no
``seq^2`` activations), the Triton NLL on the last pipeline stage (bf16 logits + their bf16 gradient).
It reports the most loaded pipeline stage (first or last), since that is the one that runs out of memory.

Throughput: Megatron's FLOP count (causal attention halved) divided by an assumed MFU of the busy time, and by
``1 + bubble`` for the 1F1B pipeline bubble ``(pp-1)/(vp*m)``, ``m`` the micro-batches per step per pipeline.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from bft_megatron.config.schema import load_config, padded_vocab_size
from bft_megatron.utils.cli_text import plain

GIB = 2**30
# CUDA context, cuBLAS/cuDNN workspaces, NCCL buffers, allocator fragmentation: measured ~2.5 GiB on H100.
RUNTIME_OVERHEAD_GIB = 2.5
# H100 SXM / H200 dense BF16, when neither --peak-tflops nor logging.peak_tflops is given (the planner asks no GPU).
DEFAULT_PEAK_TFLOPS = 989.0


@dataclass
class MemoryPlan:
    weights: float
    gradients: float
    optimizer: float
    activations: float
    activations_recompute: float
    logits: float
    fp8_buffers: float
    overhead: float

    def total(self, recompute: bool) -> float:
        acts = self.activations_recompute if recompute else self.activations
        return (self.weights + self.gradients + self.optimizer + acts + self.logits + self.fp8_buffers
                + self.overhead)


def _padded_vocab(m, tp: int) -> int:
    return padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by, tp)


def _norm_params(m) -> int:
    """A layer's norm weights, replicated on every TP rank: two RMSNorms (Gemma 3: four), and Qwen3's / Gemma 3's
    query and key head norms."""
    return (4 if m.family == "gemma3" else 2) * m.hidden_size + (2 * m.kv_channels if m.qk_norm else 0)


def layer_params(m) -> int:
    """Parameters of one transformer layer (attention + SwiGLU MLP + norms)."""
    attn = m.hidden_size * m.qkv_size + m.query_size * m.hidden_size + (m.qkv_size if m.qkv_bias else 0)
    mlp = 3 * m.hidden_size * m.ffn_hidden_size
    return attn + mlp + _norm_params(m)


def total_params(m) -> int:
    embed = m.vocab_size * m.hidden_size
    return m.num_layers * layer_params(m) + embed * (1 if m.tie_embeddings else 2) + m.hidden_size


def _stage_params(m, p, stage: str) -> float:
    """Parameters held by one GPU of the ``first``, ``last`` or ``only`` (PP=1) pipeline stage."""
    table = _padded_vocab(m, p.tp) * m.hidden_size / p.tp
    # A layer's linear weights (and the QKV bias) are split over TP; its norm weights are replicated.
    params = m.num_layers / p.pp * ((layer_params(m) - _norm_params(m)) / p.tp + _norm_params(m))
    if stage in ("first", "only"):
        params += table
    if stage == "last" or (stage == "only" and not m.tie_embeddings):
        params += table                        # output layer (a tied copy lives on the last stage too)
    if stage in ("last", "only"):
        params += m.hidden_size                # final norm
    return params


def _layer_activation_bytes(m, seq: int, mbs: int, p) -> float:
    """Bytes one layer keeps for backward per micro-batch (bf16, TE fused attention, no dropout)."""
    sb = seq / p.cp * mbs
    h, f = m.hidden_size, m.ffn_hidden_size
    # proj input, attn out, q/k/v, fc1 out, swiglu out (= fc2 input); with qk norms also their q and k inputs
    qk_norm_inputs = m.query_size + m.kv_groups * m.kv_channels if m.qk_norm else 0
    split = 2 * (h + m.query_size + m.qkv_size + qk_norm_inputs + 3 * f)
    # The two norm inputs and the two norm outputs (the qkv and fc1 inputs, kept for their weight gradients):
    # full on every TP rank unless sequence parallel shards them (Korthikanti et al.: sbh(10 + 24/t) without SP).
    replicated = 2 * 2 * h + 2 * 2 * h + (2 * 2 * h if m.family == "gemma3" else 0)  # Gemma 3: 2 post-norm inputs
    softmax_stats = 4 * m.num_attention_heads  # fp32 log-sum-exp per head (flash attention)
    per_token = split / p.tp + (replicated / p.tp if p.sequence_parallel else replicated) + softmax_stats / p.tp
    return sb * per_token


def _in_flight(p, num_microbatches: int, stage: str) -> float:
    """Micro-batches of ``num_layers/pp`` layers whose activations a pipeline stage holds at once.

    Megatron's schedules keep ``warmup + 1`` forward passes (of one model chunk each) before the first
    backward: 1F1B ``pp - rank - 1``; interleaved ``2*(pp - rank - 1) + (vp - 1)*pp`` chunks, capped at
    all of them. A chunk is ``1/vp`` of the stage's layers. First stage: ``pp`` (1F1B) or
    ``pp*(1 + (pp-1)/(pp*vp))`` (interleaved); the last stage: 1, or ``((vp-1)*pp + 1)/vp``.
    """
    if p.pp == 1:
        return 1.0
    rank = 0 if stage == "first" else p.pp - 1
    vp = p.vp or 1
    if vp == 1:
        return float(min(p.pp - rank, num_microbatches))
    chunks = min(2 * (p.pp - rank - 1) + (vp - 1) * p.pp + 1, num_microbatches * vp)
    return chunks / vp


def _fp8_weight_copies(t, linear_params: float, flight: float) -> float:
    """GiB of FP8 weight copies (1 byte each, row- and column-wise): cached for the step, both copies of every
    linear weight; else each micro-batch in flight keeps the column-wise copy for its backward pass."""
    if not t.fp8:
        return 0.0
    return (2.0 if t.fp8_weight_cache else flight) * linear_params / GIB


def _stages(p) -> tuple[str, ...]:
    """The pipeline stages whose GPUs differ: one without PP, else the first and the last."""
    return ("only",) if p.pp == 1 else ("first", "last")


def plan_memory(cfg, dp: int, num_microbatches: int, seq_length: float | None = None) -> tuple[MemoryPlan, str]:
    """Memory of the most loaded GPU (bytes -> GiB) and which stage that is.

    ``seq_length``: tokens per row if not ``data.seq_length`` (packed rows under CP grow by their samples'
    padding to multiples of 2*CP; the trainer re-plans with the measured length).
    """
    m, p, t = cfg.model, cfg.parallel, cfg.train
    seq, mbs = seq_length or cfg.data.seq_length, t.micro_batch_size
    layers_here = m.num_layers / p.pp
    act_layer = _layer_activation_bytes(m, seq, mbs, p)
    layer_input = 2 * seq / p.cp * mbs * m.hidden_size / (p.tp if p.sequence_parallel else 1)
    vocab = _padded_vocab(m, p.tp)
    plans = {}
    grad_bytes = 4 if p.grad_reduce_in_fp32 or not t.bf16 else 2  # the buffers have the parameters' dtype
    # bf16 runs: bf16 weights and activations, fp32 master weights + two Adam moments in the optimizer;
    # fp32 runs (train.bf16=false): fp32 weights and activations, the optimizer holds only the two moments.
    width, opt_bytes = (1.0, 12) if t.bf16 else (2.0, 8)
    act_layer, layer_input = width * act_layer, width * layer_input
    for stage in _stages(p):
        params = _stage_params(m, p, stage)
        shard = dp * p.cp if p.distributed_optimizer else 1
        logits = width * 2 * 2 * seq / p.cp * mbs * vocab / p.tp if stage != "first" else 0.0
        flight = _in_flight(p, num_microbatches, stage)
        linear_params = layers_here * (layer_params(m) - _norm_params(m)) / p.tp
        plans[stage] = MemoryPlan(
            weights=2 * width * params / GIB,
            gradients=grad_bytes * params / GIB,
            optimizer=opt_bytes * params / shard / GIB,
            activations=flight * layers_here * act_layer / GIB,
            activations_recompute=(flight * layers_here * layer_input + act_layer) / GIB,
            logits=logits / GIB,
            fp8_buffers=_fp8_weight_copies(t, linear_params, flight),
            overhead=RUNTIME_OVERHEAD_GIB,
        )
    recompute = t.recompute == "full"
    stage = max(plans, key=lambda k: plans[k].total(recompute))
    return plans[stage], stage


def flops_per_token(m, seq: int, tp: int = 1) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), causal attention halved (Megatron).

    The output layer is counted at the vocabulary padded for ``tp`` (``make_vocab_size_divisible_by * tp``): the
    model's output GEMM has that many columns, and Megatron-LM's ``num_floating_point_operations`` counts
    ``padded_vocab_size`` too.
    """
    dense = m.hidden_size * m.qkv_size + m.query_size * m.hidden_size + 3 * m.hidden_size * m.ffn_hidden_size
    attention = 2 * seq * m.query_size * 0.5                      # QK^T and AV, causal half
    layers = m.num_layers * (dense + attention)
    if m.window_binds(seq):
        # sliding layers (Gemma 3's; all of Mistral's / Phi3's): query i sees min(i, W) keys, W*(1 - (W-1)/(2*seq))
        # on average (exact for W <= seq)
        w = m.sliding_window
        sliding = (sum(1 for n in range(1, m.num_layers + 1) if n % m.sliding_window_pattern)
                   if m.family == "gemma3" else m.num_layers)
        layers -= sliding * 2 * m.query_size * (seq * 0.5 - w * (1 - (w - 1) / (2 * seq)))
    forward = 2 * layers + 2 * m.hidden_size * _padded_vocab(m, tp)
    return 3 * forward


def pipeline_bubble(p, num_microbatches: int) -> float:
    """Idle time of a 1F1B pipeline stage as a fraction of its busy time: ``(pp-1)/(vp*m)`` (0 without PP)."""
    return (p.pp - 1) / ((p.vp or 1) * num_microbatches)


def plan_throughput(cfg, mfu: float, peak_tflops: float, bubble: float = 0.0) -> float:
    """Tokens per second per GPU at the given MFU of the busy time, the step lengthened by ``1 + bubble``."""
    busy = mfu * peak_tflops * 1e12 / flops_per_token(cfg.model, cfg.data.seq_length, cfg.parallel.tp)
    return busy / (1 + bubble)


def _derived_layout(cfg, gpus: int) -> tuple[int, int]:
    p, t = cfg.parallel, cfg.train
    if gpus < 1:
        raise ValueError(f"--gpus must be >= 1, got {gpus}")
    model_parallel = p.tp * p.pp * p.cp
    if gpus % model_parallel:
        raise ValueError(f"--gpus={gpus} is not divisible by parallel.tp*pp*cp = {model_parallel}")
    dp = gpus // model_parallel
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ValueError(f"train.global_batch_size={t.global_batch_size} is not divisible by "
                         f"train.micro_batch_size*dp = {t.micro_batch_size}*{dp}")
    return dp, t.global_batch_size // (t.micro_batch_size * dp)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def _gflop(flops: float) -> str:
    """One decimal at 8B+ scales (433.2), three significant digits for tiny models (0.0523, not 0.0)."""
    gflop = flops / 1e9
    return f"{gflop:.1f}" if gflop >= 10 else f"{gflop:.3g}"


def _checkpoint_row(cfg) -> str:
    """Host memory a save needs per rank for the optimizer format (megatron's fully_reshardable gather copies the
    fp32 main weights and both Adam moments of the rank's TP/PP shard, unsharded over DP, into host buffers)."""
    if cfg.checkpoint.optimizer_format == "dp_reshardable":
        return ("checkpoint saves: optimizer written as dp_reshardable shards, no gather into host memory (a full "
                "resume keeps tp/pp/vp/cp)")
    p = cfg.parallel
    stage_params = max(_stage_params(cfg.model, p, s) for s in _stages(p))
    gib = 12 * stage_params / GIB
    return (f"checkpoint saves: fully_reshardable gathers {gib:.1f} GiB of optimizer state into host memory on every "
            f"rank ({8 * gib:.0f} GiB per 8-GPU node) before writing; checkpoint.optimizer_format=dp_reshardable "
            "skips it")


def _bubble_rows(cfg, dp: int, nmb: int) -> tuple[list[str], list[str]]:
    """Under PP: the bubble line, and a warning when the bubble exceeds 10% (a stronger one when m < pp).

    The suggested batch keeps the bubble under 5%: ``m >= 20*(pp-1)/vp`` (docs/launch.md), a multiple of pp when
    interleaved.
    """
    p = cfg.parallel
    if p.pp == 1:
        return [], []
    vp, bubble = p.vp or 1, pipeline_bubble(p, nmb)
    pct = f"{100 * bubble:.3g}%"
    line = f"pipeline bubble: {pct} of the ideal step time ((pp-1)/(vp*m) = {p.pp - 1}/{vp * nmb})"
    want = -(-20 * (p.pp - 1) // vp)
    want = -(-want // p.pp) * p.pp if vp > 1 else want
    advice = (f"raise train.global_batch_size (to {want * cfg.train.micro_batch_size * dp}: {want} micro-batches, "
              f"bubble {100 * (p.pp - 1) / (vp * want):.2g}%)")
    if nmb < p.pp:  # interleaving needs a multiple of pp micro-batches: no alternative here
        return [line], [f"warning: only {nmb} micro-batches/step for {p.pp} pipeline stages: the pipeline is never "
                        f"full and each stage idles {pct} of its busy time; {advice}"]
    if bubble > 0.10:
        other = "interleave the pipeline (parallel.vp)" if vp == 1 else "raise parallel.vp"
        return [line], [f"warning: the pipeline bubble ({pct}) is over 10% of the step; {advice} or {other}"]
    return [line], []


def format_plan(cfg, gpus: int, mfu: float, peak_tflops: float) -> str:
    dp, nmb = _derived_layout(cfg, gpus)
    mem, stage = plan_memory(cfg, dp, nmb)
    p = cfg.parallel
    recompute = cfg.train.recompute == "full"
    bubble = pipeline_bubble(p, nmb)
    bubble_line, bubble_warning = _bubble_rows(cfg, dp, nmb)
    tps = plan_throughput(cfg, mfu, peak_tflops, bubble)
    busy = (f"; the MFU is of the busy time: {plan_throughput(cfg, mfu, peak_tflops):,.0f} / (1 + bubble "
            f"{p.pp - 1}/{(p.vp or 1) * nmb})") if p.pp > 1 else ""
    bf16 = cfg.train.bf16
    terms = [(f"weights ({'bf16' if bf16 else 'fp32'})", mem.weights, ""),
             ("gradients (grad buffers)", mem.gradients, ""),
             (f"optimizer ({'fp32 master + Adam' if bf16 else 'Adam moments'})", mem.optimizer, ""),
             ("activations", mem.activations, f" (full recompute: {mem.activations_recompute:.2f})"),
             ("logits + their gradient", mem.logits, ""), ("fp8 weight copies", mem.fp8_buffers, ""),
             ("runtime overhead", mem.overhead, ""),
             ("total (with recompute)" if recompute else "total", mem.total(recompute), "")]
    rows = [
        f"layout: {gpus} GPUs = TP{p.tp} x PP{p.pp}{f' x VP{p.vp}' if p.vp else ''} x CP{p.cp} x DP{dp}; "
        f"{nmb} micro-batches/step; params {_count(total_params(cfg.model))}",
        f"most loaded GPU: {stage} pipeline stage",
        *(f"  {label:<31}{gib:8.2f} GiB{note}" for label, gib, note in terms),
        *bubble_line,
        f"throughput at MFU {mfu:.2f} of {peak_tflops:.0f} TFLOP/s: {tps:,.0f} tokens/s/GPU "
        f"({_gflop(flops_per_token(cfg.model, cfg.data.seq_length, p.tp))} GFLOP/token){busy}",
    ]
    rows += [*bubble_warning, _checkpoint_row(cfg)]
    if p.cp > 1 and cfg.data.packing:
        from bft_megatron.config.validate import packed_row_multiple

        rounding = packed_row_multiple(p.cp, p.tp if p.sequence_parallel else 1)
        rows.append(f"note: under CP{p.cp} each packed sample is padded to a multiple of {2 * p.cp} tokens, so rows "
                    f"grow past data.seq_length by up to {2 * p.cp - 1} tokens per sample (plus rounding to a "
                    f"multiple of {rounding}); the trainer logs the plan again at the measured length")
    if p.cp > 1 and cfg.model.window_binds(cfg.data.seq_length):
        rows.append(f"note: model.sliding_window={cfg.model.sliding_window} < data.seq_length={cfg.data.seq_length}: "
                    f"under Transformer Engine CP{p.cp} runs all-to-all (cp_comm_type a2a; its p2p ring has no "
                    "windowed attention), exchanging heads instead of key/value blocks")
    return "\n".join(rows)


def _validated_report(ap: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The plan of the config as ``train --dry-run`` would validate it for ``--gpus`` processes (minus the check
    that Transformer Engine is installed); a config problem exits 2 naming field and value."""
    from bft_megatron.config.validate import validate

    try:
        cfg = load_config(args.config, args.overrides)
        validate(cfg, args.gpus, require_te=False)
        peak = cfg.logging.peak_tflops if args.peak_tflops is None else args.peak_tflops
        peak = DEFAULT_PEAK_TFLOPS if peak is None else peak
        if not peak > 0:
            raise ValueError(f"the peak must be > 0 TFLOP/s, got {peak} (--peak-tflops or logging.peak_tflops)")
        return format_plan(cfg, args.gpus, args.mfu, peak)
    except ValueError as exc:                  # ConfigError and the layout checks: no traceback
        hint = f" (--gpus {args.gpus} is the world size)" if "world size" in str(exc) else ""
        sys.stderr.write(f"{ap.prog}: config error: {exc}{hint}\n")  # no usage block: the command line was fine
        raise SystemExit(2) from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bft-megatron plan", description=plain(__doc__),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="training config YAML (validated for --gpus processes as "
                    "train --dry-run does, except that train.fp8, train.te_op_fuser and logging.wandb_project do not "
                    "need Transformer Engine or wandb installed here)")
    ap.add_argument("--gpus", type=int, required=True, help="total GPUs (world size)")
    ap.add_argument("--mfu", type=float, default=0.40, help="assumed model FLOPs utilisation [0.40]")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="per-GPU peak TFLOP/s [the config's logging.peak_tflops, else 989: H100 SXM/H200 BF16 dense]")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.tp=4")
    args = ap.parse_args(argv)
    if not 0 < args.mfu <= 1:
        ap.error(f"--mfu must be in (0, 1], got {args.mfu}")
    sys.stdout.write(_validated_report(ap, args) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
