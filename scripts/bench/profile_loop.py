"""Where a training step's time goes, zerotrain against HF Trainer: py-spy profiles of both loops.

    pip install py-spy
    python scripts/bench/profile_loop.py [--preset tiny] [--seq-len 64] [--steps 80] [--world-size 1]

The two runs are scripts/bench/hf_trainer.py's (same model, data, DeepSpeed config, micro batch,
accumulation, precision and steps), each recorded by `py-spy record --format raw` at `--rate`
samples a second (all ranks with --world-size > 1). Samples inside the training loop (zerotrain's
`Trainer.train_step`, HF's `Trainer._run_epoch`) are sorted by the first matching frame:

- loss forward: the loss over the logits, zerotrain's `token_nll_sum` (called after the model's
  forward) and transformers' `ForCausalLMLoss` (called inside it); its backward is in backward;
- model forward: `DeepSpeedEngine.forward` otherwise;
- DeepSpeed backward epilogue: `DeepSpeedEngine._backward_epilogue` (ZeRO's gradient reduction);
- backward: `DeepSpeedEngine.backward` otherwise (autograd, with ZeRO's gradient hooks);
- optimizer step: `DeepSpeedEngine.step` (clipping, AdamW, ZeRO's partition copies);
- data: zerotrain's `BatchLoader.next_batch`, HF's data loader and `get_batch_samples`;
- loop: everything else, i.e. the trainer's own code between those calls.

Reported as milliseconds per optimizer step (samples / steps / rate) and as shares of the loop.
A small model and short sequences (the defaults) make the loop's own overhead as visible as it
can be; with real sizes the same calls only grow.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

LOOP_FRAME = {"zerotrain": "Trainer.train_step (", "hf": "Trainer._run_epoch ("}
CATEGORIES = [
    # HF computes it inside the model's forward, zerotrain's objective after it: counted apart on both sides
    ("loss forward", ("token_nll_sum (", "ForCausalLMLoss (")),
    ("model forward", ("DeepSpeedEngine.forward (",)),
    ("DeepSpeed backward epilogue", ("DeepSpeedEngine._backward_epilogue (",)),
    ("backward", ("DeepSpeedEngine.backward (",)),
    ("optimizer step", ("DeepSpeedEngine.step (",)),
    ("data", ("BatchLoader.next_batch (", "DataLoaderShard.__iter__ (", "Trainer.get_batch_samples (")),
]


def breakdown(raw: Path, loop_frame: str) -> Counter:
    """Samples per category from a py-spy raw (collapsed stacks) file."""
    counts: Counter = Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if loop_frame not in stack:
            continue
        inside = stack[stack.index(loop_frame):]
        name = next((c for c, frames in CATEGORIES if any(f in inside for f in frames)), "loop")
        counts[name] += int(n)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    import hf_trainer as bench  # scripts/bench/ is sys.path[0] when run as a script

    bench.add_run_flags(parser)
    parser.set_defaults(seq_len=64, steps=80, log_interval=4)
    parser.add_argument("--world-size", type=int, default=1)
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--keep", help="copy the raw profiles into this directory")
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        raise SystemExit("py-spy is not installed: pip install py-spy")

    results = {}
    plain_run = bench.run
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bench.prepare_data(args, tmp)
        for side in ("zerotrain", "hf"):
            raw = tmp / f"{side}.txt"

            def under_py_spy(cmd, threads, what, raw=raw):
                record = [py_spy, "record", "--rate", str(args.rate), "--format", "raw", "--output", str(raw)]
                return plain_run(record + (["--subprocesses"] if args.world_size > 1 else []) + ["--"] + cmd,
                                 threads, what)

            bench.run = under_py_spy  # hf_trainer's runners start every job through its run()
            try:
                (bench.zerotrain_rates if side == "zerotrain" else bench.hf_rates)(args, args.world_size, tmp / side)
            finally:
                bench.run = plain_run
            results[side] = breakdown(raw, LOOP_FRAME[side])
            if args.keep:
                os.makedirs(args.keep, exist_ok=True)
                shutil.copy(raw, Path(args.keep) / raw.name)

    print(f"\n{args.preset}, ZeRO-{args.zero_stage}, {args.precision}, seq {args.seq_len}, micro batch "
          f"{args.micro_batch_size}, grad accum {args.grad_accum}, {args.world_size} rank(s), {args.steps} steps; "
          f"py-spy at {args.rate}/s{', all ranks summed' if args.world_size > 1 else ''}")
    print(f"{'':28s} {'zerotrain ms/step':>18s} {'share':>6s} {'HF Trainer ms/step':>19s} {'share':>6s}")
    names = [c for c, _ in CATEGORIES] + ["loop"]
    for name in names + ["total"]:
        cells = []
        for side in ("zerotrain", "hf"):
            counts = results[side]
            n = sum(counts.values()) if name == "total" else counts[name]
            cells.append(f"{1000 * n / args.steps / args.rate:18.1f} {n / max(1, sum(counts.values())):6.1%}")
        print(f"{name:28s} " + " ".join(cells))
    totals = {side: sum(counts.values()) for side, counts in results.items()}
    print(f"zerotrain's speed relative to HF Trainer (HF's samples a step over zerotrain's): "
          f"{totals['hf'] / max(1, totals['zerotrain']):.2f}x")


if __name__ == "__main__":
    main()
