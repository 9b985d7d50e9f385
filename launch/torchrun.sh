#!/usr/bin/env bash
# Launch `bft-megatron train` on this node with torchrun. One call per node; the same call on every node.
#
# Environment (defaults in brackets):
#   CONFIG          training config YAML                               [configs/demo_cpu.yaml]
#   NNODES          number of nodes                                    [1]
#   NODE_RANK       this node's index, 0..NNODES-1                     [0]
#   MASTER_ADDR     address of node 0, reachable from every node       [127.0.0.1]
#   MASTER_PORT     a free TCP port on node 0                          [29500]
#   NPROC_PER_NODE  processes (GPUs) per node                          [number of GPUs, or 1 without GPUs]
#   PYTHON          interpreter                                        [python3]
# Extra arguments are passed to the trainer as dotted overrides, e.g. `train.train_iters=100 parallel.tp=8`.
#
# Examples:
#   bash launch/torchrun.sh                                           # the CPU demo, one process
#   NPROC_PER_NODE=2 bash launch/torchrun.sh parallel.tp=2            # two gloo processes on CPU
#   CONFIG=configs/llama3.1_8b.yaml bash launch/torchrun.sh           # one 8-GPU node
#   NNODES=4 NODE_RANK=$i MASTER_ADDR=node0 CONFIG=configs/llama3.1_70b_tp8pp4.yaml bash launch/torchrun.sh
set -euo pipefail

CONFIG=${CONFIG:-configs/demo_cpu.yaml}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
PYTHON=${PYTHON:-python3}
if [[ -z ${NPROC_PER_NODE:-} ]]; then
  NPROC_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [[ $NPROC_PER_NODE -gt 0 ]] || NPROC_PER_NODE=1
fi

# Megatron needs one CUDA connection so that its communication kernels are ordered with compute
# (sequence parallel / TP overlap); harmless elsewhere.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
# Fail fast with a stack trace instead of hanging when one rank dies in a collective.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# One OpenMP thread per rank unless told otherwise (many ranks share a node's cores).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# TE's fused attention must load torch's cuDNN, not an older system copy (see docs/training.md).
if [[ -z ${CUDNN_HOME:-} ]]; then
  cudnn_dir=$("$PYTHON" -c "import nvidia.cudnn, os; print(list(nvidia.cudnn.__path__)[0])" 2>/dev/null || true)
  if [[ -n $cudnn_dir && -d $cudnn_dir/lib ]]; then
    export CUDNN_HOME=$cudnn_dir LD_LIBRARY_PATH=$cudnn_dir/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  fi
fi

[[ -f $CONFIG ]] || { echo "torchrun.sh: CONFIG=$CONFIG does not exist" >&2; exit 2; }
echo "torchrun.sh: node ${NODE_RANK}/${NNODES}, ${NPROC_PER_NODE} proc/node, master ${MASTER_ADDR}:${MASTER_PORT}, config ${CONFIG}" >&2

exec "$PYTHON" -m torch.distributed.run \
  --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC_PER_NODE" \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
  -m bft_megatron.train --config "$CONFIG" "$@"
