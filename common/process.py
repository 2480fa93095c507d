"""Ending a process at once, its output flushed: for launchers after a finished run, and for a
watchdog whose main thread may be blocked in a collective for good."""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn


def exit_process(status: int, *, finish: bool = True) -> NoReturn:
    """End the process with `status` once its output is flushed, skipping interpreter teardown.

    After a finished multi-rank run that teardown sometimes aborted in a C++ destructor of the
    communication stack ("terminate called without an active exception", exit -6; seen in ZeRO-3
    CI runs even after the process group was destroyed), which torchrun and SLURM report as a
    failed run although its final model is saved. With `finish`, a wandb run (DeepSpeed's monitor)
    is finished and logging shut down first, as their exit hooks would; a watchdog ending a stalled
    process passes False, as either could wait on what is stalled."""
    if finish:
        wandb = sys.modules.get("wandb")
        if wandb is not None and getattr(wandb, "run", None) is not None:
            wandb.finish()
        logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
