"""Process-group bootstrap: the only module that reads megatron's ``parallel_state`` globals.

:func:`initialize` brings up ``torch.distributed`` from the torchrun environment (NCCL on GPU,
gloo on CPU with :mod:`bft_megatron.parallel.cpu_compat` applied), builds megatron's model-parallel
groups and seeds every RNG, then returns :class:`ParallelGroups`, which the rest of the package
takes as an argument instead of reaching into globals.

Besides megatron's groups it makes one world-sized gloo group, ``control``, whose timeout is
:data:`RANK0_WAIT_HOURS` instead of ``parallel.timeout_minutes``: the ranks wait on it while global rank 0
alone does file work of unbounded length (first-use data preparation), which would otherwise trip the
NCCL/gloo timeout of the default group and kill the job.
"""

from __future__ import annotations

import os
from collections.abc import Callable
import random
import socket
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from bft_megatron.parallel import cpu_compat
from bft_megatron.utils.logging import get_logger

__all__ = ["ParallelGroups", "initialize", "destroy", "seed_everything", "free_port", "local_device_index",
           "RANK0_WAIT_HOURS"]

_log = get_logger(__name__)

# How long the other ranks wait for rank 0's file work (``ParallelGroups.control``). A rank 0 whose process
# dies ends the wait at once (its sockets close, and torchrun stops the job); a rank 0 that hangs (a stalled
# filesystem) or whose node drops off the network is waited for up to this long.
RANK0_WAIT_HOURS = 24
# (default group, its control group): made once per default process group and reused by later initialize()
# calls (a re-initialisation at another layout in tests, the converter inside a training process).
_CONTROL: tuple[object, dist.ProcessGroup] | None = None


def _control_group() -> dist.ProcessGroup:
    """World-sized gloo group with a RANK0_WAIT_HOURS timeout. Gloo connects it as a full mesh: world-1 sockets
    per rank (mind ``ulimit -n`` beyond ~1000 ranks)."""
    global _CONTROL
    if _CONTROL is None or _CONTROL[0] is not dist.group.WORLD:
        _CONTROL = (dist.group.WORLD, dist.new_group(backend="gloo", timeout=timedelta(hours=RANK0_WAIT_HOURS)))
    return _CONTROL[1]


@dataclass(frozen=True)
class ParallelGroups:
    """Process groups and this rank's coordinates. ``pg_collection`` is megatron's own container;
    ``control`` is the world over gloo with a :data:`RANK0_WAIT_HOURS` timeout (rank-0 file work)."""

    world_size: int
    rank: int
    tp: dist.ProcessGroup
    pp: dist.ProcessGroup
    dp: dist.ProcessGroup
    cp: dist.ProcessGroup
    dp_cp: dist.ProcessGroup
    mp: dist.ProcessGroup
    tp_size: int
    pp_size: int
    dp_size: int
    cp_size: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    cp_rank: int
    vp_size: int | None
    pg_collection: object
    device: torch.device
    control: dist.ProcessGroup

    @property
    def is_first_pp_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_pp_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def dp_cp_size(self) -> int:
        return self.dp_size * self.cp_size


def _init_process_group(backend: str, timeout_minutes: int) -> None:
    if dist.is_initialized():
        return
    for var, default in (("RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(var, default)
    if "MASTER_PORT" not in os.environ:  # without torchrun: one process, its own group on a free local port
        os.environ["MASTER_PORT"] = str(free_port()) if os.environ["WORLD_SIZE"] == "1" else "29500"
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_minutes))


def local_device_index(local_rank: int, device_count: int) -> int:
    """The CUDA device of this rank: ``LOCAL_RANK`` when every rank of the node sees all its GPUs (torchrun, and
    srun by default); device 0 when the scheduler binds one GPU per task (``srun --gpu-bind``,
    ``--gpus-per-task=1``, a site default), where ``LOCAL_RANK`` 1..7 would name devices that task cannot see."""
    if device_count == 1:
        return 0
    if local_rank < device_count:
        return local_rank
    raise RuntimeError(
        f"LOCAL_RANK={local_rank} but this process sees {device_count} GPUs (CUDA_VISIBLE_DEVICES="
        f"{os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')}): start at most one rank per visible GPU per node "
        "(torchrun --nproc-per-node, srun --ntasks-per-node)")


def free_port() -> int:
    """A currently free TCP port on localhost (two single-process runs on one host must not clash on 29500)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch; megatron's tensor-parallel streams are seeded in :func:`initialize`."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def initialize(tp: int = 1, pp: int = 1, vp: int | None = None, cp: int = 1, seed: int = 1234,
               timeout_minutes: int = 30, agree: Callable[[], None] | None = None) -> ParallelGroups:
    """Initialise distributed state for ``tp x pp x cp x dp`` (dp inferred from the world size).

    ``vp`` is the number of virtual pipeline chunks per rank (None or 1 = no interleaving). ``agree`` runs on every
    rank once the world group exists and before megatron's groups are made (ranks that disagree on the layout
    would wait in that creation until the timeout): the trainer's :func:`..consistency.check_job`. Every group gets
    ``timeout_minutes``.
    Seeding follows Megatron: the default stream gets ``seed + 100 * pp_rank`` (dropout outside
    TP regions), the tensor-parallel stream ``seed + 2718 + tp_rank`` (inside).
    """
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        cpu_compat.apply()
    else:
        torch.cuda.set_device(local_device_index(int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()))
    _init_process_group("nccl" if on_gpu else "gloo", timeout_minutes)
    if agree is not None:
        agree()

    from megatron.core import parallel_state as ps
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    vp = vp if vp and vp > 1 else None
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                     virtual_pipeline_model_parallel_size=vp, context_parallel_size=cp,
                                     create_gloo_process_groups=True, distributed_timeout_minutes=timeout_minutes)
    pp_rank = ps.get_pipeline_model_parallel_rank()
    seed_everything(seed + 100 * pp_rank)
    model_parallel_cuda_manual_seed(seed + 100 * pp_rank)
    groups = ParallelGroups(
        world_size=dist.get_world_size(), rank=dist.get_rank(),
        tp=ps.get_tensor_model_parallel_group(), pp=ps.get_pipeline_model_parallel_group(),
        dp=ps.get_data_parallel_group(), cp=ps.get_context_parallel_group(),
        dp_cp=ps.get_data_parallel_group(with_context_parallel=True), mp=ps.get_model_parallel_group(),
        tp_size=ps.get_tensor_model_parallel_world_size(), pp_size=ps.get_pipeline_model_parallel_world_size(),
        dp_size=ps.get_data_parallel_world_size(), cp_size=ps.get_context_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(), pp_rank=pp_rank,
        dp_rank=ps.get_data_parallel_rank(), cp_rank=ps.get_context_parallel_rank(),
        vp_size=vp, pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
        device=torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu"),
        control=_control_group(),
    )
    _log.info("parallel layout: world=%d tp=%d pp=%d vp=%s cp=%d dp=%d backend=%s", groups.world_size, tp, pp,
              vp, cp, groups.dp_size, dist.get_backend())
    return groups


def destroy(keep_process_group: bool = False) -> None:
    """Tear down megatron's groups and (unless kept, e.g. to re-initialise at another layout in
    tests) the default process group."""
    from megatron.core import parallel_state as ps

    global _CONTROL
    ps.destroy_model_parallel()
    if dist.is_initialized() and not keep_process_group:
        dist.destroy_process_group()  # every group, the control group too
        _CONTROL = None
