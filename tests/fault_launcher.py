"""launcher/pretrain.py with faults injected through the trainer's hooks, for the fault tests.

    python tests/fault_launcher.py [--fault-nan-steps 5,6,7] [--fault-kill-at 6:save [--fault-kill-rank 1]]
        PRETRAIN FLAGS...

--fault-nan-steps: these steps' (1-based) losses are made NaN on every rank.
--fault-kill-at STEP:WHERE: rank --fault-kill-rank (default 0) SIGKILLs itself, once, at step STEP:
  step[:M]  inside the loss of micro-batch M (0-based, default 0) of that step; M > 0 is between
            micro-batches, after the earlier ones' backward
  ds-save   inside DeepSpeed's save of that step's tag, once its first file on this rank is written
  save      once DeepSpeed has written the tag's shards, before zerotrain's own files (the half-done
            save a crash leaves)
  eval      as the evaluation after that step starts (model in eval mode, no batch reduced yet)
--fault-hang-at STEP: rank --fault-hang-rank (default 1) stops in the loss of step STEP's first
  micro-batch for good (in `hang_forever`, the site its stack file must name), once per run
  directory: it writes RUN/hang-began first, and a run that finds that file does not hang again.
"""

import argparse
import itertools
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.process import exit_process  # noqa: E402
from engine.objectives.causal_lm import PRETRAIN  # noqa: E402
from engine.training.main import main  # noqa: E402
from engine.training.trainer import Hooks

KILL_POINTS = ("step", "ds-save", "save", "eval")


def kill_point(text: str) -> tuple[int, str, int]:
    """'6:save' -> (6, 'save', 0); '6:step:1' -> (6, 'step', 1)."""
    step, where, *micro = text.split(":")
    if where not in KILL_POINTS or len(micro) > (where == "step"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected STEP:{{{','.join(KILL_POINTS)}}} or STEP:step:M")
    return int(step), where, int(micro[0]) if micro else 0


def hooks(argv: list[str]) -> tuple[Hooks, list[str]]:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--fault-nan-steps", type=lambda s: {int(x) for x in s.split(",") if x}, default=set())
    parser.add_argument("--fault-kill-at", type=kill_point)
    parser.add_argument("--fault-kill-rank", type=int, default=0)
    parser.add_argument("--fault-hang-at", type=int)
    parser.add_argument("--fault-hang-rank", type=int, default=1)
    faults, rest = parser.parse_known_args(argv)
    hang_began = Path(rest[rest.index("--output-dir") + 1]) / "hang-began" if "--output-dir" in rest else None
    hang_step = faults.fault_hang_at if hang_began and not hang_began.exists() else None
    if int(os.environ.get("RANK", 0)) != faults.fault_hang_rank:
        hang_step = None
    kill_step, where, micro = faults.fault_kill_at or (None, None, 0)
    if int(os.environ.get("RANK", 0)) != faults.fault_kill_rank:
        where = None
    tag = f"global_step{kill_step}"
    losses_of_step = itertools.count()

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def hang_forever() -> None:
        hang_began.write_text(str(time.time()))
        while True:
            time.sleep(1)

    def loss(step, loss):
        if where == "step" and step == kill_step and next(losses_of_step) == micro:
            die()
        if step == hang_step:
            hang_forever()
        return loss * float("nan") if step in faults.fault_nan_steps else loss

    if where == "ds-save":
        import torch

        real_save = torch.save

        def save_then_die(obj, f, *args, **kwargs):  # DeepSpeed's checkpoint engine writes through torch.save
            real_save(obj, f, *args, **kwargs)
            if isinstance(f, (str, os.PathLike)) and Path(f).parent.name == tag:
                die()

        torch.save = save_then_die

    def after_shards(tag_dir: Path) -> None:
        if where == "save" and tag_dir.name == tag:
            die()

    def evaluate(step: int) -> None:
        if where == "eval" and step == kill_step:
            die()

    return Hooks(loss=loss if faults.fault_nan_steps or where == "step" or hang_step else None,
                 after_checkpoint_shards=after_shards if where == "save" else None,
                 evaluate=evaluate if where == "eval" else None), rest


if __name__ == "__main__":
    injected, argv = hooks(sys.argv[1:])
    exit_process(main(argv, PRETRAIN, injected))
