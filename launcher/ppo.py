"""Run ppo: `deepspeed [--num_gpus N | --hostfile H] launcher/ppo.py --init-from SFT_RUN --data prompts.jsonl
--reward-model RM_DIR | --reward-fn accuracy|format|length|PATH.py:NAME [--critic-init RM_DIR] [--kl-coef C]
[--gamma G] [--lam L] [--vf-coef V] [--flag value ...]` (also under `torchrun` or plain `python`).
All flags: `python launcher/ppo.py --help`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a clone without install

from engine.objectives.ppo import PPO  # noqa: E402
from engine.training.main import run  # noqa: E402

if __name__ == "__main__":
    run(PPO)
