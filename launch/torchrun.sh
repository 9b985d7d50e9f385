#!/usr/bin/env bash
# Launch `bft-megatron train` on this node with torchrun. One call per node; the same call on every node.
#
# Environment (defaults in brackets):
#   CONFIG            training config YAML                                 [configs/demo_cpu.yaml]
#   NNODES            number of nodes                                      [1]
#   NODE_RANK         this node's index, 0..NNODES-1                       [0; required when NNODES > 1]
#   MASTER_ADDR       address of node 0, reachable from every node         [127.0.0.1; required when NNODES > 1]
#   MASTER_PORT       a free TCP port on node 0                            [29500]
#   NPROC_PER_NODE    processes (GPUs) per node             [GPUs in CUDA_VISIBLE_DEVICES or on the node; 1 without]
#   SHUTDOWN_TIMEOUT  seconds torchrun lets the ranks finish their exit save after a signal, then SIGKILL  [1800]
#   PYTHON            interpreter                                          [python3]
# plus launch/env.sh's CUDA/NCCL settings, each applied only when not already set in the environment.
# Extra arguments are passed to the trainer as dotted overrides, e.g. `train.train_iters=100 parallel.tp=8`.
#
# Signals: SIGTERM or SIGUSR1 sent to torchrun is forwarded to the ranks, which save a checkpoint and exit
# (checkpoint.save_on_signal), leaving <checkpoint.save>/RESUME when they stopped before train.train_iters.
# torchrun then exits non-zero even after a clean save (it re-raises the signal): whoever restarts the run should
# look at RESUME, not at the exit status.
#
# Examples:
#   bash launch/torchrun.sh                                           # the CPU demo, one process
#   NPROC_PER_NODE=2 bash launch/torchrun.sh parallel.tp=2 \
#       checkpoint.save=runs/demo_cpu_tp2/ckpt logging.tensorboard_dir=runs/demo_cpu_tp2/tb
#                                     # two gloo processes on CPU (a new checkpoint.save: in the demo's own the
#                                     # finished one-process run would be resumed, with nothing left to train)
#   CONFIG=configs/llama3.1_8b.yaml bash launch/torchrun.sh           # one 8-GPU node
#   NNODES=4 NODE_RANK=$i MASTER_ADDR=node0 CONFIG=configs/llama3.1_70b_tp8pp4.yaml bash launch/torchrun.sh
set -euo pipefail

CONFIG=${CONFIG:-configs/demo_cpu.yaml}
NNODES=${NNODES:-1}
MASTER_PORT=${MASTER_PORT:-29500}
SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-1800}
PYTHON=${PYTHON:-python3}
# NNODES is checked as a number before it is compared: bash's arithmetic reads a word as a variable name and stops
# on "2:4" (torchrun's elastic MIN:MAX, which this static rendezvous does not use) inside `if`, skipping the check.
if [[ ! $NNODES =~ ^[1-9][0-9]*$ ]]; then
  echo "torchrun.sh: NNODES=$NNODES must be a whole number of nodes >= 1" >&2
  exit 2
fi
# With several nodes, a default address or node rank does not fail: every node would rendezvous with itself at
# 127.0.0.1 (or two nodes would both be node 0) and wait until the rendezvous timeout. Ask instead.
if (( NNODES > 1 )); then
  missing=()
  [[ -n ${MASTER_ADDR:-} ]] || missing+=("MASTER_ADDR (node 0's address, the same on every node)")
  [[ -n ${NODE_RANK:-} ]] || missing+=("NODE_RANK (this node's index, 0..$((NNODES - 1)))")
  if (( ${#missing[@]} )); then
    joined=$(printf ' and %s' "${missing[@]}")
    echo "torchrun.sh: NNODES=$NNODES needs ${joined# and }" >&2
    exit 2
  fi
fi
NODE_RANK=${NODE_RANK:-0}
# A node rank outside 0..NNODES-1 would not fail either: node 0 would wait for a node that never joins.
if [[ ! $NODE_RANK =~ ^(0|[1-9][0-9]*)$ ]] || (( NODE_RANK >= NNODES )); then
  echo "torchrun.sh: NODE_RANK=$NODE_RANK must be one of 0..$((NNODES - 1)) (NNODES=$NNODES)" >&2
  exit 2
fi
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
if [[ -z ${NPROC_PER_NODE:-} ]]; then
  if [[ -n ${CUDA_VISIBLE_DEVICES+set} ]]; then
    # nvidia-smi lists every GPU of the node whatever CUDA_VISIBLE_DEVICES says: count the visible ones. CUDA
    # stops at the first invalid entry ("", -1, NoDevFiles from some schedulers), so this does too.
    NPROC_PER_NODE=0
    IFS=, read -ra visible <<< "$CUDA_VISIBLE_DEVICES"
    for dev in "${visible[@]}"; do
      [[ -n $dev && $dev != -* && $dev != NoDevFiles ]] || break
      NPROC_PER_NODE=$((NPROC_PER_NODE + 1))
    done
  else
    NPROC_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  fi
  [[ $NPROC_PER_NODE -gt 0 ]] || NPROC_PER_NODE=1
fi

# shellcheck source-path=SCRIPTDIR source=env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

[[ -f $CONFIG ]] || { echo "torchrun.sh: CONFIG=$CONFIG does not exist" >&2; exit 2; }

# torchrun's agent forwards only SIGTERM/SIGINT/SIGHUP/SIGQUIT by default (a SIGUSR1 kills the agent and orphans
# the ranks), and SIGKILLs the ranks 30 s after forwarding one, far too short for an exit save (a 70B checkpoint
# is ~1 TB: minutes). Recent torchrun (2.13 has both) takes options for these; an older one keeps its defaults,
# with a warning.
signal_args=()
torchrun_help=$("$PYTHON" -m torch.distributed.run --help 2>/dev/null || true)
if [[ $torchrun_help == *--signals-to-handle* ]]; then
  signal_args+=(--signals-to-handle "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1")
else
  echo "torchrun.sh: warning: this torchrun has no --signals-to-handle: SIGUSR1 kills it instead of the ranks" \
       "saving; use SIGTERM" >&2
fi
if [[ $torchrun_help == *--shutdown-timeout* ]]; then
  signal_args+=(--shutdown-timeout "$SHUTDOWN_TIMEOUT")
else
  echo "torchrun.sh: warning: this torchrun has no --shutdown-timeout: ranks get 30 s to save after a signal" >&2
fi

echo "torchrun.sh: node ${NODE_RANK}/${NNODES}, ${NPROC_PER_NODE} proc/node, master ${MASTER_ADDR}:${MASTER_PORT}, config ${CONFIG}" >&2

# Pre-flight, for the whole job's world size, before torchrun starts: a config error exits 2 here, on the node that
# has it (inside torchrun it ended as exit 1, and the other nodes waited for this one until their timeout). Node 0
# also checks the inputs on disk (--check, as slurm.sbatch does); the others the config alone (--dry-run: data may
# live on node 0 only). Their plan output is not shown.
preflight=--check
(( NODE_RANK == 0 )) || preflight=--dry-run
WORLD_SIZE=$((NNODES * NPROC_PER_NODE)) "$PYTHON" -m bft_megatron.train --config "$CONFIG" "$preflight" "$@" \
  > /dev/null || exit $?

exec "$PYTHON" -m torch.distributed.run \
  --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC_PER_NODE" \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" ${signal_args[@]+"${signal_args[@]}"} \
  -m bft_megatron.train --config "$CONFIG" "$@"
