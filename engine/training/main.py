"""The entry point every launcher calls: parse the stage's config, set the run up, train.

    run(PRETRAIN)      # launcher/pretrain.py

setup runs the steps in order, each checked before the next costs more: the plan (no process
group yet), the data (prepared once, compared with a resumed checkpoint's), the model and the
DeepSpeed engine, what the objective runs beside the model, and the checkpoint; config.yaml and
tokenizer/ are written only then, so a refused start leaves the run directory as it was.
"""

from __future__ import annotations

import signal
import sys
import warnings
from typing import NoReturn

from common.errors import ZerotrainError
from common.process import exit_process
from engine.checkpoint.checksums import wait_for_checksums
from engine.config.tree import Config
from engine.distributed import (
    World,
    init_distributed,
    log_on_rank0,
    quiet_output,
    shutdown_distributed,
    world,
)
from engine.objectives.base import Stage
from engine.stages import config_for
from engine.training.build import (
    build_data,
    build_engine,
    build_model,
    check_same_data,
    new_model_line,
    resume_point,
    write_run_files,
)
from engine.training.plan import plan_run
from engine.training.trainer import Hooks, Trainer


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
    model = build_model(cfg, plan, stage.model, stage.exported)
    if plan.init_source is None and plan.resume_tag is None:
        log_on_rank0(here.rank, new_model_line(cfg, model))
    engine = build_engine(cfg, plan, model)
    objective.build(cfg, plan, engine, data)
    trainer = Trainer(cfg, stage, plan, here, data, model, engine, objective, hooks or Hooks())
    if resume_tag is not None:
        trainer.restore(resume_tag)
    write_run_files(plan, cfg, here)
    return trainer


def main(argv: list[str] | None, stage: Stage, hooks: Hooks | None = None) -> int:
    """Train `stage` with the flags in `argv`; the exit status (2 for a ZerotrainError)."""
    here = world()
    try:
        cfg = config_for(stage, argv)
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


def run(stage: Stage) -> NoReturn:
    """A launcher's whole life: train `stage` with the process's flags, then end the process with
    its status (common.process.exit_process)."""
    exit_process(main(sys.argv[1:], stage))
