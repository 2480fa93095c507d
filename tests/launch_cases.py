"""Several runs of one stage, one after another, in one launch: the process start, the imports and
the process group are paid once. For tests whose cases differ only in flags (a matrix of ZeRO stages
and precisions): one `torchrun ... tests/launch_cases.py` instead of one launch a case.

    torchrun --nproc_per_node 2 tests/launch_cases.py STAGE CASES.json

CASES.json: {"name": [flag, ...], ...}. Each case runs through engine.training.main.main, as a
launcher runs it; its exit status goes to CASES.json's folder as status-NAME (on rank 0), and its
output is marked by `=== case NAME` lines. The launch exits 0 once every case has run.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.process import exit_process  # noqa: E402
import engine.training.main  # noqa: E402
from engine.distributed import shutdown_distributed, world  # noqa: E402
from engine.stages import all_stages  # noqa: E402

if __name__ == "__main__":
    stage_name, cases_file = sys.argv[1], Path(sys.argv[2])
    stage = all_stages()[stage_name]
    # One process group for every case: torchrun's store keeps the first group's keys, so a second
    # group made after the first is destroyed cannot connect. main() leaves it up; it ends after the last.
    engine.training.main.shutdown_distributed = lambda: None
    for name, argv in json.loads(cases_file.read_text()).items():
        print(f"=== case {name}", flush=True)
        print(f"=== case {name}", file=sys.stderr, flush=True)
        status = engine.training.main.main(argv, stage)
        if world().rank == 0:
            (cases_file.parent / f"status-{name}").write_text(str(status))
    shutdown_distributed()
    exit_process(0)
