"""launcher/pretrain.py with faults injected through the trainer's hooks, for the fault tests.

    python tests/fault_launcher.py [--fault-nan-steps 5,6,7] [--fault-kill-in-save 6] PRETRAIN FLAGS...

--fault-nan-steps: these steps' (1-based) losses are made NaN on every rank.
--fault-kill-in-save: rank 0 SIGKILLs itself once DeepSpeed has written that step's shards, before
zerotrain's own files (the half-done save a crash leaves).
"""

import argparse
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.objectives.causal_lm import PRETRAIN  # noqa: E402
from engine.train import exit_process, main  # noqa: E402
from engine.trainer import Hooks  # noqa: E402


def hooks(argv: list[str]) -> tuple[Hooks, list[str]]:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--fault-nan-steps", type=lambda s: {int(x) for x in s.split(",") if x}, default=set())
    parser.add_argument("--fault-kill-in-save", type=int)
    faults, rest = parser.parse_known_args(argv)

    def nan_loss(step, loss):
        return loss * float("nan") if step in faults.fault_nan_steps else loss

    def kill_in_save(tag_dir: Path) -> None:
        if tag_dir.name == f"global_step{faults.fault_kill_in_save}" and int(os.environ.get("RANK", 0)) == 0:
            os.kill(os.getpid(), signal.SIGKILL)

    return Hooks(loss=nan_loss if faults.fault_nan_steps else None,
                 after_checkpoint_shards=kill_in_save if faults.fault_kill_in_save is not None else None), rest


if __name__ == "__main__":
    injected, argv = hooks(sys.argv[1:])
    exit_process(main(argv, PRETRAIN, injected))
