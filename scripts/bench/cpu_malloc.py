"""CPU training and glibc's allocator: tokens/s with and without fixed malloc thresholds, both trainers.

    python scripts/bench/cpu_malloc.py [--preset tiny] [--rounds 4]

By default glibc serves large blocks (activations, gradients) with mmap and moves its mmap and trim
thresholds as blocks come and go, so a training step can hand tens of MB back to the kernel and
fault them in again, zeroed, on the next step. `MALLOC_MMAP_THRESHOLD_=33554432` (32 MiB, glibc's
maximum) with `MALLOC_TRIM_THRESHOLD_=17179869184` fixes both: the heap keeps its pages. The
script runs four variants in rotating order each round, each in its own subprocess with
scripts/bench/hf_trainer.py's settings (one rank): zerotrain and HF Trainer, each with the
default allocator and with the fixed thresholds. It prints the median tokens/s of each
(median window after the first, median over rounds) and ratios against HF Trainer with the
default allocator, i.e. as users run it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

FIXED = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "17179869184"}
VARIANTS = [("zerotrain", False), ("zerotrain", True), ("hf", False), ("hf", True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    import hf_trainer as bench  # scripts/bench/ is sys.path[0] when run as a script

    bench.add_run_flags(parser)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()

    rates: dict[tuple[str, bool], list[float]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bench.prepare_data(args, tmp)
        for round_ in range(args.rounds):
            for side, fixed in VARIANTS[round_ % 4:] + VARIANTS[:round_ % 4]:
                for key in FIXED:
                    os.environ.pop(key, None)
                if fixed:
                    os.environ.update(FIXED)
                run = bench.zerotrain_rates if side == "zerotrain" else bench.hf_rates
                wall = run(args, 1, tmp / f"{side}-{fixed}-{round_}")["wall"][1:]
                rates[(side, fixed)].append(statistics.median(wall))
                print(f"  round {round_} {side:9s} {'fixed thresholds' if fixed else 'default malloc':16s} "
                      f"{rates[(side, fixed)][-1]:8,.0f} tokens/s", flush=True)
    for key in FIXED:
        os.environ.pop(key, None)

    base = statistics.median(rates[("hf", False)])
    print(f"\n{args.preset}, ZeRO-{args.zero_stage}, {args.precision}, seq {args.seq_len}, micro batch "
          f"{args.micro_batch_size}, grad accum {args.grad_accum}, 1 rank, {args.threads} thread(s), {args.rounds} rounds")
    for side, fixed in VARIANTS:
        values = rates[(side, fixed)]
        rate = statistics.median(values)
        print(f"{side:9s} {'fixed thresholds' if fixed else 'default malloc':16s} {rate:8,.0f} tokens/s  "
              f"{rate / base:5.2f}x HF Trainer (default malloc)   rounds: " + ", ".join(f"{v:,.0f}" for v in values))


if __name__ == "__main__":
    main()
