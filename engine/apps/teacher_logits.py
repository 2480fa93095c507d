"""`zerotrain teacher-logits --top-k K [distill flags]`: fill the store of a distillation
teacher's top-k log-probs (engine.objectives.teacher) for the distill run those flags describe,
and train nothing; a distill run with the same flags and --teacher-top-k K then loads no teacher.
Runs under torchrun too, the ranks sharing the examples."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from engine.distributed import (
    init_distributed,
    local_device,
    log_on_rank0,
    quiet_output,
    shutdown_distributed,
    world,
)
from engine.objectives.distill import DISTILL
from engine.stages import config_for
from engine.training.build import build_data
from engine.training.plan import plan_run


def main(argv: list[str], top_k: int) -> int:
    """Compute (or find) the store; its directory is printed on stdout."""
    here = world()
    cfg = config_for(DISTILL, [*argv, "--teacher-top-k", str(top_k)])
    quiet_output(here.rank, cfg.train.verbose)
    with tempfile.TemporaryDirectory() as scratch:
        if not cfg.train.output_dir:  # the plan wants a run directory; nothing is written to it
            cfg.train.output_dir = str(Path(scratch) / "run")
        plan = plan_run(cfg, DISTILL, here.size)
        objective = DISTILL.objective(cfg)
        objective.check(cfg, plan)
        init_distributed(here.local_rank, cfg.distributed.dist_timeout)
        log = lambda message: log_on_rank0(here.rank, message)  # noqa: E731
        data = build_data(cfg, plan, here, log)
        target = objective.store_teacher(cfg, plan, local_device(here.local_rank), data, here, log)
        if here.rank == 0:
            print(target, file=sys.stdout, flush=True)
    shutdown_distributed()
    return 0
