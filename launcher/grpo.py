"""Run grpo: `deepspeed [--num_gpus N | --hostfile H] launcher/grpo.py --init-from SFT_RUN --data prompts.jsonl
[--reward-fn accuracy|format|length|PATH.py:NAME ...] [--rl-loss grpo|dr_grpo|dapo|bnpo|cispo]
[--num-generations G] [--kl-beta B] [--flag value ...]` (also under `torchrun` or plain `python`).
All flags: `python launcher/grpo.py --help`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a clone without install

from engine.objectives.grpo import GRPO  # noqa: E402
from engine.training.main import run  # noqa: E402

if __name__ == "__main__":
    run(GRPO)
