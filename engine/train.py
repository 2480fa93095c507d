"""The entry point every launcher calls: parse the config, build the run's parts, train.

    sys.exit(main(sys.argv[1:], PRETRAIN))      # launcher/pretrain.py
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import warnings
from typing import NoReturn

from common.errors import ZerotrainError
from engine.builders import (build_data, build_engine, build_model, check_same_data, plan_run, resume_point,
                             write_run_files)
from engine.checksums import wait_for_checksums
from engine.config import Config, parse_config
from engine.distributed import World, init_distributed, quiet_output, shutdown_distributed, world
from engine.objectives import Stage
from engine.trainer import Hooks, Trainer, log_on_rank0


def setup(cfg: Config, stage: Stage, here: World, hooks: Hooks | None = None) -> Trainer:
    """Check, then build data, model, objective and engine, and restore a checkpoint if resuming."""
    plan = plan_run(cfg, stage, here.size)
    objective = stage.objective(cfg)
    objective.check(cfg, plan)
    init_distributed(here.local_rank, cfg.distributed.dist_timeout)
    data = build_data(cfg, plan, here, lambda message: log_on_rank0(here.rank, message))
    if plan.resume_tag is not None:
        check_same_data(data, plan.resume_tag)
    resume_tag = resume_point(plan, here)
    model = build_model(cfg, plan)
    engine = build_engine(cfg, plan, model)
    objective.build(cfg, plan, engine, data)
    trainer = Trainer(cfg, plan, here, data, model, engine, objective, hooks or Hooks())
    if resume_tag is not None:
        trainer.restore(resume_tag)
    write_run_files(plan, cfg, here)
    return trainer


def exit_process(status: int) -> NoReturn:
    """End a launcher's process with `status` once its output is flushed, skipping interpreter
    teardown. After a finished multi-rank run that teardown sometimes aborted in a C++ destructor
    of the communication stack ("terminate called without an active exception", exit -6; seen in
    ZeRO-3 CI runs even after the process group was destroyed), which torchrun and SLURM report as
    a failed run although its final model is saved. A wandb run (DeepSpeed's monitor) is finished
    first, as its exit hook would."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def main(argv: list[str] | None, stage: Stage, hooks: Hooks | None = None) -> int:
    """Train `stage` with the flags in `argv`; the exit status (2 for a ZerotrainError)."""
    here = world()
    try:
        cfg = parse_config(argv, description=f"zerotrain {stage.name}")
        # Before anything imports DeepSpeed (setup does): every rank would log its accelerator line.
        quiet_output(here.rank, cfg.train.verbose)
        trainer: Trainer | None = None
        pending: list[int] = []
        # From here on SIGTERM/SIGUSR1 (SLURM preemption) mean: finish the step, save, exit 0.
        # A signal that arrives during setup is kept and handed to the trainer once it exists.
        def on_signal(signum, frame) -> None:
            if trainer is not None:
                trainer.stop_signal = signum
            else:
                pending.append(signum)

        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, on_signal)
        # DeepSpeed still calls collectives torch has renamed: one FutureWarning a call, every step.
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.distributed\.")
        trainer = setup(cfg, stage, here, hooks)
        if pending:
            trainer.stop_signal = pending[-1]
        status = trainer.fit()
        wait_for_checksums()  # the last checkpoint's digests, before exit_process' os._exit
        # The run is saved; a notice that comes now has nothing left to stop. Python restores the
        # default action (terminate) while the interpreter shuts down, which would turn a
        # finished run into a failed one for torchrun and SLURM.
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_IGN)
        shutdown_distributed()
        return status
    except ZerotrainError as e:
        print(f"zerotrain {stage.name}: error{f' (rank {here.rank})' if here.size > 1 else ''}: {e}", file=sys.stderr,
              flush=True)
        return 2
