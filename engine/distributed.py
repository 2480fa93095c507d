"""Process-group plumbing shared by the loop and checkpointing: who am I, where do collective
tensors live, and how rank 0 does one-off work while the others wait."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from common.errors import ZerotrainError


@dataclass(frozen=True)
class World:
    """This process's place among the ranks."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1


def world() -> World:
    """The launcher's environment (torchrun, deepspeed, srun via the sbatch scripts); a world of one
    under plain python."""
    return World(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
                 int(os.environ.get("WORLD_SIZE", 1)))


def comm_device() -> torch.device:
    """Where tensors for collectives live: the current GPU under nccl, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def init_distributed(local_rank: int) -> None:
    """Start the process group (DeepSpeed picks nccl or gloo)."""
    import logging

    import deepspeed

    # DeepSpeed logs every engine detail at INFO; ZEROTRAIN_DS_LOG=info brings that back.
    deepspeed.utils.logger.setLevel(getattr(logging, os.environ.get("ZEROTRAIN_DS_LOG", "warning").upper()))

    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500"), ("RANK", "0"),
                       ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)  # plain `python launcher/...`: a world of one
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    deepspeed.init_distributed()


def shutdown_distributed() -> None:
    """Leave the process group before the interpreter exits, as torch asks: tearing it down in
    interpreter shutdown instead races the backend's threads (seen here once as a C++
    "terminate called without an active exception" after a finished run)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def on_rank0(work, rank: int, what: str):
    """Run `work` on (local) rank 0 while the others wait; its result on rank 0, None elsewhere.

    Any exception on rank 0 reaches every rank at once (instead of leaving them blocked in a
    collective until the process-group timeout): rank 0 re-raises it, the others raise a
    ZerotrainError that points at rank 0's log.
    """
    import torch.distributed as dist

    error, result = None, None
    if rank == 0:
        try:
            result = work()
        except BaseException as e:  # noqa: BLE001 - every failure must be announced, then re-raised
            error = e
    failed = torch.tensor([float(error is not None)], device=comm_device())
    dist.all_reduce(failed)  # doubles as the barrier
    if error is not None:
        raise error
    if failed.item():
        raise ZerotrainError(f"{what} failed on another rank; its log has the error")
    return result


def all_reduce_sums(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Sum named numbers over every rank in one collective (float64, so token counts stay exact)."""
    import torch.distributed as dist

    packed = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(packed)
    return dict(zip(values, packed.tolist()))
