"""The process group of tensor parallelism: one group over all ranks (no pipeline stages).

    tp = init_distributed("gloo", world_size=2, rank=r, init_method="tcp://127.0.0.1:29500")
    tp = init_distributed()          # under torchrun: RANK, WORLD_SIZE, MASTER_ADDR/PORT from its env
    tp.rank, tp.size, tp.group_name  # group_name: what the functional collectives take

The device group runs the model's collectives (NCCL on CUDA, gloo on CPU); a second gloo group
carries the step broadcasts (pickled messages in a CPU buffer), so control messages never touch the
GPU stream. Both groups share the `timeout`: a collective waiting on a dead or hung peer raises
after it instead of blocking forever (the executor's watchdog usually notices first).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class TPGroup:
    rank: int
    size: int
    group_name: str  # of the device group (functional collectives take it)
    cpu_group: object  # gloo ProcessGroup of the step messages (worker.StepChannel)
    device: torch.device


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def torchrun_env() -> bool:
    """Whether this process was started by torchrun (or torch.distributed.run)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ
                                                   and "MASTER_ADDR" in os.environ)


def rank_device(device: torch.device, local_rank: int) -> torch.device:
    """Rank's device: cuda -> cuda:<local rank> (one GPU per process), cpu -> cpu."""
    if device.type == "cuda":
        return torch.device("cuda", local_rank)
    return device


def init_distributed(backend: str | None = None, world_size: int | None = None, rank: int | None = None,
                     init_method: str | None = None, device: torch.device | str = "cpu",
                     timeout_s: float = DEFAULT_TIMEOUT_S) -> TPGroup:
    """Join (or create) the default process group and return the TP group. Unset arguments come
    from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT)."""
    rank = int(os.environ["RANK"]) if rank is None else rank
    world_size = int(os.environ["WORLD_SIZE"]) if world_size is None else world_size
    local_rank = int(os.environ.get("LOCAL_RANK", rank)) if init_method is None else rank
    device = rank_device(torch.device(device), local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = backend or backend_for(device)
    timeout = datetime.timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend, init_method=init_method or "env://", world_size=world_size, rank=rank,
                                timeout=timeout, **kwargs)
    if dist.get_world_size() != world_size:
        raise ValueError(f"tensor_parallel_size={world_size} but the process group has {dist.get_world_size()} "
                         f"ranks (torchrun's WORLD_SIZE must equal --tensor-parallel-size)")
    world = dist.group.WORLD
    cpu_group = world if backend == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
    return TPGroup(rank=dist.get_rank(), size=world_size, group_name=world.group_name, cpu_group=cpu_group,
                   device=device)


def get_tp_rank() -> int:
    """This process's TP rank (0 outside a process group)."""
    return dist.get_rank() if dist.is_initialized() else 0


def get_tp_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def destroy_distributed(barrier: bool = False) -> None:
    """Leave the process group. barrier (a clean shutdown, every rank calling it): first wait until
    all ranks got here, so that no rank destroys its group while a collective of the last step (rank
    0's stop broadcast) is still in flight on gloo's threads: a rank that did so could die of SIGABRT
    at exit ("terminate called without an active exception"), as PyTorch's docs ask destroy to be
    collective."""
    if dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()
