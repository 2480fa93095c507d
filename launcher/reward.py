"""Run reward: `deepspeed [--num_gpus N | --hostfile H] launcher/reward.py --init-from SFT_RUN --data pairs.jsonl
[--center-rewards-coefficient C] [--flag value ...]` (also under `torchrun` or plain `python`): a reward model
for RL. All flags: `python launcher/reward.py --help`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a clone without install

from engine.objectives.reward_model import REWARD  # noqa: E402
from engine.training.main import run  # noqa: E402

if __name__ == "__main__":
    run(REWARD)
