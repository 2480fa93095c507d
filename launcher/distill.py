"""Run distill: `deepspeed [--num_gpus N | --hostfile H] launcher/distill.py --init-from STUDENT --teacher TEACHER
--data FILE... [--kd-loss forward_kl|reverse_kl|jsd] [--kd-alpha A] [--kd-temperature T] [--teacher-zero-stage 3]`
(also under `torchrun` or plain `python`). All flags: `python launcher/distill.py --help`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a clone without install

from engine.objectives.distill import DISTILL  # noqa: E402
from engine.training.main import run  # noqa: E402

if __name__ == "__main__":
    run(DISTILL)
