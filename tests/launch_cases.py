"""Several training runs, one after another, in one launch: the process start, the imports and the
process group are paid once instead of once a run. For tests whose runs differ only in flags (a
matrix of ZeRO stages and precisions, a pair of runs to compare): one
`torchrun ... tests/launch_cases.py CASES.json` (or plain `python`, one rank) instead of a launch a run.

CASES.json: {"NAME": {"stage": "pretrain", "flags": ["--zero-stage", "3", ...]}, ...}. Each case
runs through engine.training.main.main, as launcher/<stage>.py runs it (with tests/fault_launcher.py's
faults where its flags name some); rank 0 writes its exit status to CASES.json's folder as
status-NAME, and its `=== case NAME` lines mark where the case's output starts (helpers.run_cases
splits the output there). The launch exits 0 once every case has run.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import engine.training.main  # noqa: E402
from common.process import exit_process  # noqa: E402
from engine.distributed import shutdown_distributed, world  # noqa: E402
from engine.stages import all_stages  # noqa: E402

if __name__ == "__main__":
    cases_file = Path(sys.argv[1])
    stages = all_stages()
    # One process group for every case: torchrun's store keeps the first group's keys, so a group
    # made after the first one is destroyed cannot connect. main() leaves it up; it ends after the last.
    engine.training.main.shutdown_distributed = lambda: None
    for name, case in json.loads(cases_file.read_text()).items():
        if world().rank == 0:  # once: the output that follows, every rank's, is this case's
            for stream in (sys.stdout, sys.stderr):
                print(f"=== case {name}", file=stream, flush=True)
        flags, hooks = case["flags"], None
        if any(flag.startswith("--fault-") for flag in flags):
            from tests.fault_launcher import hooks as fault_hooks

            hooks, flags = fault_hooks(flags)
        status = engine.training.main.main(flags, stages[case["stage"]], hooks)
        if world().rank == 0:
            (cases_file.parent / f"status-{name}").write_text(str(status))
    shutdown_distributed()
    exit_process(0)
