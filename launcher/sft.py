"""Run sft: `deepspeed [--num_gpus N | --hostfile H] launcher/sft.py --config X.yaml [--flag value ...]`
(also under `torchrun` or plain `python`). All flags: `python launcher/sft.py --help`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a clone without install

from engine.objectives.causal_lm import SFT  # noqa: E402
from engine.training.main import run  # noqa: E402

if __name__ == "__main__":
    run(SFT)
