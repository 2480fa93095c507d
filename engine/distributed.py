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


def log_on_rank0(rank: int, message: str) -> None:
    """A progress line on rank 0 only, as every zerotrain run prints them."""
    if rank == 0:
        print(f"[zerotrain] {message}", flush=True)


def device_type() -> str:
    """What a run computes on: cuda where torch sees a GPU, else cpu."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def local_device(local_rank: int | None = None) -> torch.device:
    """This process's device: the GPU of its local rank (default: the current one), or the CPU."""
    if device_type() == "cpu":
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device() if local_rank is None else local_rank)


def comm_device() -> torch.device:
    """Where tensors for collectives live: the current GPU under nccl, else the CPU."""
    return local_device()


def quiet_output(rank: int, verbose: bool) -> None:
    """One copy of a run's output: Python warnings, the libraries' log records (transformers, peft,
    datasets, DeepSpeed) and transformers' progress bars come from rank 0 alone, each distinct
    warning once; the other ranks still print errors. `verbose` leaves every rank as it was.

    Call it before DeepSpeed is imported: its import logs "Setting accelerator to CPU" on every rank.
    """
    import logging
    import warnings

    if verbose:
        return
    if rank == 0:
        _show_each_warning_once()
        return
    warnings.simplefilter("ignore")
    # Every logger at once, DeepSpeed's too (it sets its own level when imported); ERROR and above pass.
    logging.disable(logging.WARNING)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


def _show_each_warning_once() -> None:
    """Python's own "default" and "once" actions forget what they showed whenever any code changes
    the warning filters (every `warnings.catch_warnings` block does, in torch, transformers and
    peft), so a warning raised again later is printed again; remember by message instead. The
    filters (-W, PYTHONWARNINGS) still decide what is shown at all."""
    import warnings

    shown: set[tuple[str, type[Warning]]] = set()
    show = warnings.showwarning

    def show_once(message, category, filename, lineno, file=None, line=None) -> None:
        if (str(message), category) not in shown:
            shown.add((str(message), category))
            show(message, category, filename, lineno, file, line)

    warnings.showwarning = show_once


def init_distributed(local_rank: int, timeout_s: int) -> None:
    """Start the process group (DeepSpeed picks nccl or gloo); a collective fails after `timeout_s`
    seconds of waiting for the other ranks (--dist-timeout)."""
    import contextlib
    import datetime
    import io
    import logging

    import deepspeed

    # DeepSpeed logs every engine detail at INFO; ZEROTRAIN_DS_LOG=info brings that back.
    deepspeed.utils.logger.setLevel(getattr(logging, os.environ.get("ZEROTRAIN_DS_LOG", "warning").upper()))

    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500"), ("RANK", "0"),
                       ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)  # plain `python launcher/...`: a world of one
    if device_type() == "cuda":
        torch.cuda.set_device(local_rank)
    # DeepSpeed print()s "... deepspeed_shm_comm_op built successfully" on every rank as it starts
    # the CPU backend; it goes only where DeepSpeed's own warnings go (not to ranks quiet_output silenced).
    shown = deepspeed.utils.logger.isEnabledFor(logging.WARNING)
    with contextlib.nullcontext() if shown else contextlib.redirect_stdout(io.StringIO()):
        deepspeed.init_distributed(timeout=datetime.timedelta(seconds=timeout_s))


def rendezvous_store(prefix: str):
    """A client of the job's rendezvous store (MASTER_ADDR:MASTER_PORT: torchrun's agent, or rank
    0's process under the deepspeed launcher and plain env:// starts), keys under `prefix`. Its own
    connection, so a thread can use it while the process group is busy."""
    import datetime

    import torch.distributed as dist

    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=datetime.timedelta(seconds=30))
    return dist.PrefixStore(prefix, store)


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


def all_reduce_max(value: int, device: torch.device) -> int:
    """The largest of one integer over every rank."""
    import torch.distributed as dist

    packed = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(packed, op=dist.ReduceOp.MAX)
    return int(packed.item())


def all_reduce_sums(values: dict[str, float | torch.Tensor], device: torch.device) -> dict[str, float]:
    """Sum named numbers (floats, or scalar tensors left on the device until now, so the caller
    never waited for them) over every rank in one collective, float64 so token counts stay exact."""
    import torch.distributed as dist

    packed = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(()) for v in values.values()])
    if dist.get_world_size() > 1:  # a world of one has nothing to add; gloo's all_reduce still costs ~0.5 ms
        dist.all_reduce(packed)
    return dict(zip(values, packed.tolist()))
