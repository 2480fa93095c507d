"""Run dpo: `deepspeed [--num_gpus N | --hostfile H] launcher/dpo.py --init-from SFT_RUN --data pairs.jsonl
[--pref-loss dpo|ipo|orpo|simpo] [--beta B] [--ref-from PATH] [--precompute-ref] [--flag value ...]`
(also under `torchrun` or plain `python`). All flags: `python launcher/dpo.py --help`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a clone without install

from engine.objectives.preference import DPO  # noqa: E402
from engine.training.main import run  # noqa: E402

if __name__ == "__main__":
    run(DPO)
