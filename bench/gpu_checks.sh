#!/usr/bin/env bash
# Every single-GPU check of the project in one command, for a short GPU session (an H100 / H200 with
# megatron-core and Transformer Engine installed). Logs go to OUT_DIR; the summary lines to stdout.
#
#     bash bench/gpu_checks.sh OUT_DIR [quick|full|issue4]
#
# quick (~5 min): the GPU tests (loss incl. compiled BFT math, trainer, convert) and the 1B bft/sft pair
#                 at micro-batch 2 with the BFT math compiled and eager.
# full (~12 min): also FP8 vs BF16 on the 8B proxy over three interleaved rounds, the FP8 step's
#                 device time by kernel family (bench/profile_step.py --kernels), and a 17 GB checkpoint
#                 save in each optimizer format (bench/ckpt_save.py; needs ~18 GB free under OUT_DIR).
# issue4 (~4 min, no tests): issue 4's 8B-proxy list side by side: TE's attention backend from its debug log,
#                 the 8b suite (sft/bft BF16, bft FP8 delayed and tensorwise) and the HF transformers peer.
# Numbers belong in docs/benchmarks.md with the hardware and versions printed first.
set -uo pipefail
usage="usage: bash bench/gpu_checks.sh OUT_DIR [quick|full|issue4]"
mode=${2:-quick}
[[ $mode == quick || $mode == full || $mode == issue4 ]] || { echo "$usage (got mode '$mode')" >&2; exit 2; }
out=$(mkdir -p "${1:?$usage}" && cd "$1" && pwd) || exit 2   # absolute: we cd to the repository next
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
failed=()
python3 - <<'EOF' | tee "$out/versions.txt"
import torch, megatron.core
try:
    import transformer_engine as te
    te_version = te.__version__
except ImportError:
    te_version = "not installed"
print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | megatron-core {megatron.core.__version__} "
      f"| TE {te_version}")
EOF
if [[ $mode == issue4 ]]; then
    NVTE_DEBUG=1 NVTE_DEBUG_LEVEL=2 python3 -m bft_megatron.train --config configs/bench/llama8b_proxy.yaml \
        train.train_iters=2 checkpoint.save=null train.te_op_fuser=true > "$out/te_debug.log" 2>&1 || failed+=(te_debug)
    echo "TE attention backends: $(grep -o "Selected backend = [A-Za-z]* (sub-backend [0-9])" "$out/te_debug.log" \
        | sort | uniq -c | tr -s ' ')"
    python3 bench/train_bench.py --suite 8b --iters 10 --warmup 3 --json "$out/8b.json" > "$out/8b.log" 2>&1 \
        || failed+=(suite_8b)
    grep -E "^\|" "$out/8b.log"
    python3 bench/hf_peer_bench.py --loss bft > "$out/hf_peer.log" 2>&1 || failed+=(hf_peer)
    tail -n 1 "$out/hf_peer.log"
    (( ${#failed[@]} )) && { echo "FAILED: ${failed[*]} (logs in $out)" >&2; exit 1; }
    exit 0
fi
python3 -m pytest -q -p no:cacheprovider tests/test_loss_gpu.py tests/test_train_gpu.py tests/test_convert_gpu.py \
    > "$out/gpu_tests.log" 2>&1 || failed+=(gpu_tests)
echo "gpu tests: $(tail -n 1 "$out/gpu_tests.log")"
for compile in true false; do
    python3 bench/loss_ab_bench.py --config configs/bench/llama_1b.yaml --pairs 50 --warmup 3 \
        train.micro_batch_size=2 loss.compile=$compile > "$out/ab_1b_mbs2_compile_$compile.log" 2>&1 \
        || failed+=(ab_compile_$compile)
    echo "1b bft/sft mbs2 compile=$compile: $(grep -E '"(sft_ms|bft_ms|ratio_median|ratio_p10|ratio_p90)"' \
        "$out/ab_1b_mbs2_compile_$compile.log" | tr -d ' \n')"
done
grep -h "torch.compile" "$out"/*.log | head -n 3
if [[ $mode == full ]]; then
    python3 bench/train_bench.py --suite 8b-fp8 --rounds 3 --iters 10 --warmup 3 --json "$out/fp8_rounds.json" \
        > "$out/fp8_rounds.log" 2>&1 || failed+=(fp8_rounds)
    tail -n 4 "$out/fp8_rounds.log"
    python3 bench/profile_step.py --config configs/bench/llama8b_proxy.yaml --iters 3 --kernels --top 45 \
        train.te_op_fuser=true train.fp8=hybrid train.fp8_recipe=delayed > "$out/fp8_kernels.log" 2>&1 \
        || failed+=(fp8_kernels)
    grep -A 10 "device time per step" "$out/fp8_kernels.log"
    python3 bench/ckpt_save.py --config configs/bench/demo_gpu.yaml --dir "$out/ckbench" --threads 2 --rounds 1 \
        --optim dp_reshardable fully_reshardable > "$out/ckpt_save.log" 2>&1 || failed+=(ckpt_save)
    grep -E "^\|" "$out/ckpt_save.log"
fi
if (( ${#failed[@]} )); then
    echo "FAILED: ${failed[*]} (logs in $out)" >&2
    exit 1
fi
