# shellcheck shell=bash
# Environment shared by launch/torchrun.sh and launch/slurm.sbatch. Sourced, not executed; changes no shell options.
#
# Every variable is set only when the caller has not set it (`: "${VAR:=value}"`), so anything exported before
# launching wins: e.g. `NCCL_DEBUG=INFO sbatch ...` or `NCCL_NVLS_ENABLE=1 bash launch/torchrun.sh`.
# Under SLURM the batch script sources this on the first node and srun passes the exported values to every task.
# Uses $PYTHON (the interpreter the ranks run; default python3) to locate torch's cuDNN.

# Megatron orders its tensor/sequence-parallel communication kernels with compute through a single CUDA
# connection (required for SP and TP communication overlap); harmless elsewhere.
: "${CUDA_DEVICE_MAX_CONNECTIONS:=1}"
# A failed or timed-out collective aborts the communicators and ends the process, so the job fails instead of
# hanging on a dead rank (the value torchrun gives its workers when unset).
: "${TORCH_NCCL_ASYNC_ERROR_HANDLING:=1}"
# NCCL warnings (e.g. a network transport falling back) without the INFO flood; NCCL_DEBUG=INFO to debug.
: "${NCCL_DEBUG:=WARN}"
# One OpenMP thread per rank: a node's 8 ranks share its cores, and the data loader is not OpenMP-bound.
: "${OMP_NUM_THREADS:=1}"
# NeMo's default: no NVLink SHARP (NVLS) collectives. NVLS buffers cost GPU memory on every rank of an NVSwitch
# node (the recipes plan for 56-65 GiB of 80), and the trainer's all-reduces are not NVLS-bound.
: "${NCCL_NVLS_ENABLE:=0}"
# The installed torch, read without importing it (a login node may have no GPU): its version as major*100+minor
# and whether its flight recorder reads TORCH_FR_BUFFER_SIZE (its FlightRecorder header names it). Empty when
# the lookup fails; then the settings below take the choice that is safe on every torch.
_bft_probe="import importlib.metadata as m, importlib.util as u, os, re
major, minor = re.match(r'(\d+)\.(\d+)', m.version('torch')).groups()
header = os.path.join(u.find_spec('torch').submodule_search_locations[0],
                      'include/torch/csrc/distributed/c10d/FlightRecorder.hpp')
print(int(major) * 100 + int(minor), int(os.path.exists(header) and 'TORCH_FR_BUFFER_SIZE' in open(header).read()))"
# BFT_NO_HOST_PROBE=1 (slurm.sbatch with CONTAINER_IMAGE): the ranks run another Python than this shell's; no lookup.
_bft_torch=
[[ -n ${BFT_NO_HOST_PROBE:-} ]] || _bft_torch=$("${PYTHON:-python3}" -c "$_bft_probe" 2>/dev/null || true)
_bft_torch_version=${_bft_torch%% *} _bft_torch_fr=${_bft_torch##* }
[[ $_bft_torch_version =~ ^[0-9]+$ ]] || _bft_torch_version=0
# Free the memory of tensors used by asynchronous collectives when the collective finishes, instead of through
# the caching allocator's record_stream (which holds it longer and raises peak memory): NeMo's setting. Newer
# torch (2.8 on, by its nightlies of April 2025; 2.11 checked) does so by default and warns on every rank that the
# variable is deprecated, and NGC's PyTorch 25.04 (2.7.0a0) gave wrong losses with it at vp > 1
# (NVIDIA/Megatron-LM#1586): set only for torch < 2.7, never when the version is unknown. A caller's value is kept.
if [[ -z ${TORCH_NCCL_AVOID_RECORD_STREAMS:-} ]] && (( _bft_torch_version > 0 && _bft_torch_version < 207 )); then
  TORCH_NCCL_AVOID_RECORD_STREAMS=1
fi
if [[ -n ${TORCH_NCCL_AVOID_RECORD_STREAMS:-} ]]; then export TORCH_NCCL_AVOID_RECORD_STREAMS; fi
# Flight recorder: keep the last 20000 collectives of each rank (host memory) and dump them when the NCCL
# watchdog times out (parallel.timeout_minutes), to find the rank or collective that hung. Newer torch (2.11 and
# 2.13 do) reads the size from TORCH_FR_BUFFER_SIZE and warns on every rank that TORCH_NCCL_TRACE_BUFFER_SIZE is
# deprecated; older torch reads only the old name, which is also set when the lookup above failed. A size the
# caller set under either name is kept.
# Dumps go to TORCH_NCCL_DEBUG_INFO_TEMP_FILE<rank> (torch's default /tmp/nccl_trace_rank_; slurm.sbatch points
# it at logs/nccl_trace_<job id>/rank_). Analyse one dump directory with `torchfrtrace DIR --prefix rank_`
# (docs/launch.md, "Node failures and hangs").
: "${TORCH_NCCL_DUMP_ON_TIMEOUT:=1}"
export CUDA_DEVICE_MAX_CONNECTIONS TORCH_NCCL_ASYNC_ERROR_HANDLING NCCL_DEBUG OMP_NUM_THREADS NCCL_NVLS_ENABLE \
  TORCH_NCCL_DUMP_ON_TIMEOUT
if [[ -n ${TORCH_FR_BUFFER_SIZE:-} ]]; then
  export TORCH_FR_BUFFER_SIZE
elif [[ -n ${TORCH_NCCL_TRACE_BUFFER_SIZE:-} ]]; then
  export TORCH_NCCL_TRACE_BUFFER_SIZE
elif [[ ${_bft_torch_fr:-0} == 1 ]]; then
  export TORCH_FR_BUFFER_SIZE=20000
else
  export TORCH_NCCL_TRACE_BUFFER_SIZE=20000
fi
unset _bft_probe _bft_torch _bft_torch_version _bft_torch_fr

# Transformer Engine's fused attention must load torch's own cuDNN (the nvidia-cudnn wheel), not an older system
# copy found first on the library path: with the older one TE silently falls back to unfused attention (half the
# throughput, three times the activation memory). Skipped when CUDNN_HOME is set, the wheel is absent (CPU) or
# BFT_NO_HOST_PROBE is set.
if [[ -z ${CUDNN_HOME:-} && -z ${BFT_NO_HOST_PROBE:-} ]]; then
  _bft_cudnn_dir=$("${PYTHON:-python3}" -c "import nvidia.cudnn, os; print(list(nvidia.cudnn.__path__)[0])" \
                   2>/dev/null || true)
  if [[ -n $_bft_cudnn_dir && -d $_bft_cudnn_dir/lib ]]; then
    export CUDNN_HOME=$_bft_cudnn_dir LD_LIBRARY_PATH=$_bft_cudnn_dir/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  fi
  unset _bft_cudnn_dir
fi
