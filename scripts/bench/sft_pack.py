"""Padding-free SFT: `launcher/sft.py --pack` against HF Trainer's padding and flattening collators.

    python scripts/bench/sft_pack.py [--world-sizes 1 2] [--rounds 2] [--seq-len 2048] [--sides ...]

Up to four sides (--sides; the default leaves out zerotrain pad), each on 1 and 2 CPU ranks, in
one script run (rounds rotate which goes first):

- zerotrain --pack:  launcher/sft.py --pack: a micro-batch's examples packed greedily into rows of
                     at most --seq-len tokens, position_ids restarting per example, no padding
                     inside a row (rows padded to the longest row; with --seq-len at least a
                     micro-batch's tokens that is one row, as HF flatten makes);
- zerotrain pad:     launcher/sft.py --no-pack: padded to the longest example (the in-house
                     baseline, to tell the packing from the trainer);
- HF pad:            transformers' Trainer + DataCollatorForSeq2Seq(padding="longest",
                     label_pad_token_id=-100), what a user writes by default;
- HF flatten:        transformers' Trainer + DataCollatorWithFlattening() (the micro-batch as one
                     row, position_ids restarting per example).

Every side gets scripts/bench/hf_trainer.py's setup: the same model (`model.build.build_model`
of --preset, seeded alike, SDPA), the same DeepSpeed config (ds_configs/zero{stage}.json filled by
zerotrain's fill_ds_config, handed to HF as a dict), micro batch, grad accumulation, steps, warmup +
cosine, precision (fp32), one OpenMP thread a rank, torchrun (gloo) for 2 ranks.

The data: the shipped ShareGPT (500 multi-turn chats) and Alpaca seed (175 tasks, their instances)
samples, prepared once by zerotrain (`engine.data.prepare.prepare("sft")`, --seq-len, no validation split)
with the benchmarks' 6400-token BPE. HF reads the same prepared examples (input_ids and labels from
`engine.data.conversations.SFTDataset`, as lists), so every side trains on the same token ids and labels.

The same examples every step: zerotrain's ShardedSampler stream (the seeded permutation, epoch
after epoch) is written out in order as HF's dataset and read with
`train_sampling_strategy="sequential"`; accelerate deals consecutive micro-batches to the ranks in
turn, which is exactly zerotrain's sharding (rank r takes the r-th block of world x micro
positions). Each HF rank counts the trained tokens of every micro-batch its collator made, and the
script checks them against zerotrain's micro-batches before using the run.

Throughput: trained tokens (labels not -100 after the shift: what the loss is taken over; padding
and prompts excluded) per second over all ranks, per window of --log-interval optimizer steps. The
tokens of a window come from the sampler stream (identical on every side); its time is zerotrain's
own window (metrics.jsonl: window tokens / tokens_per_sec) or, for HF, a TrainerCallback's stamps
at every step end. The first window (start-up) is left out. Also: trained tokens per CPU-second of
rank 0 over the same windows (less sensitive to other jobs on a shared machine). A run's figure is
the median of its windows; a side's figure is the median over rounds; ratios are zerotrain --pack
over each other side.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import hf_trainer as bench  # noqa: E402  (the shared run flags, model, DeepSpeed config, launching, HF Trainer run)

SAMPLES = bench.ROOT / "data" / "samples"
SFT_SAMPLES = [str(SAMPLES / "sharegpt_identity_500.json"), str(SAMPLES / "alpaca_seed_tasks.jsonl")]
SIDES = ("zerotrain-pack", "zerotrain-pad", "hf-pad", "hf-flatten")
DEFAULT_SIDES = ("zerotrain-pack", "hf-pad", "hf-flatten")
BASELINE = "zerotrain-pack"
FIGURES = ("wall", "cpu")
BINS = (0, 64, 128, 192, 256, 384, 512, 1024, 2048, 4096)


def sample_order(args, dataset_len: int, world_size: int) -> list[int]:
    """zerotrain's ShardedSampler stream for the whole run: micro-batch k of rank r is positions
    (k x world + r) x micro ... + micro."""
    from engine.data.loader import ShardedSampler

    needed = args.steps * args.grad_accum * args.micro_batch_size * world_size
    return ShardedSampler(dataset_len, 0, 1, seed=42).next_indices(needed)  # 42: zerotrain_flags' --seed


def micro_batch_tokens(args, dataset, world_size: int) -> list[list[int]]:
    """Trained tokens of every micro-batch of every rank ([rank][micro-batch]), from the stream."""
    from engine.objectives.tokens import trained_tokens

    order, micro = sample_order(args, len(dataset), world_size), args.micro_batch_size
    per_example = [int(trained_tokens(dataset[i]["labels"][None]).sum()) for i in order]
    return [[sum(per_example[(k * world_size + r) * micro:(k * world_size + r + 1) * micro])
             for k in range(args.steps * args.grad_accum)] for r in range(world_size)]


def step_tokens(args, dataset, world_size: int) -> list[int]:
    """Trained tokens of every optimizer step, over all ranks."""
    per_rank, accum = micro_batch_tokens(args, dataset, world_size), args.grad_accum
    return [sum(sum(rank[s * accum:(s + 1) * accum]) for rank in per_rank) for s in range(args.steps)]


# --------------------------------------------------------------------------- the HF Trainer side

def hf_worker(args) -> None:
    """One rank of an HF Trainer SFT run; writes this rank's trained tokens a micro-batch and (rank 0)
    the step stamps."""
    import torch
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    from engine.data.conversations import SFTDataset
    from engine.objectives.tokens import trained_tokens
    from model.tokenizer import load_tokenizer

    world_size, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    prepared = SFTDataset(args.data, "train", args.seq_len)
    order = sample_order(args, len(prepared), world_size)

    class InZerotrainOrder(torch.utils.data.Dataset):
        """The prepared examples in zerotrain's sample order, as the lists HF's collators take."""

        def __len__(self):
            return len(order)

        def __getitem__(self, i):
            example = prepared[order[i]]
            return {"input_ids": example["input_ids"].tolist(), "labels": example["labels"].tolist()}

    if args.collator == "pad":
        collate = DataCollatorForSeq2Seq(load_tokenizer(str(args.tokenizer)), padding="longest",
                                         label_pad_token_id=-100)
    else:
        collate = DataCollatorWithFlattening()
    counted: list[int] = []

    def collate_and_count(features):
        batch = collate(features)
        counted.append(int(trained_tokens(batch["labels"]).sum()))
        return batch

    stamps = bench.hf_train(args, InZerotrainOrder(), collate_and_count, train_sampling_strategy="sequential")
    # accelerate may fetch one micro-batch ahead: only the trained ones count
    Path(args.out, f"tokens-rank{rank}.json").write_text(json.dumps(counted[:args.steps * args.grad_accum]))
    if rank == 0:
        Path(args.out, "stamps.json").write_text(json.dumps(stamps))


def hf_windows(args, world_size: int, out: Path, collator: str, expected: list[list[int]]) -> list[dict]:
    """Run HF Trainer with `collator`, check it trained the `expected` micro-batches; its windows' steps and times."""
    cmd = bench.launch([str(Path(__file__).resolve()), "--hf-worker", "--out", str(out), "--data", str(args.data),
                        "--tokenizer", str(args.tokenizer), "--vocab-size", str(args.vocab_size),
                        "--collator", collator] + bench.worker_flags(args), world_size)
    bench.run(cmd, args.threads, f"HF Trainer ({collator})")
    seen = [json.loads((out / f"tokens-rank{r}.json").read_text()) for r in range(world_size)]
    if seen != expected:
        raise SystemExit(f"HF Trainer ({collator}, {world_size} ranks) trained other micro-batches than zerotrain's "
                         f"sampler gives: {seen} vs {expected}")
    stamps = json.loads((out / "stamps.json").read_text())
    every = args.log_interval
    return [{"steps": (i, i + every), "wall_s": stamps[i + every][0] - stamps[i][0],
             "cpu_s": stamps[i + every][1] - stamps[i][1]} for i in range(0, len(stamps) - every, every)]


# --------------------------------------------------------------------------- the zerotrain side

def zerotrain_worker(argv: list[str]) -> int:
    """launcher/sft.py, with rank 0's CPU seconds in each metrics record."""
    from engine.objectives.causal_lm import SFT

    return bench.zerotrain_worker(argv, SFT)


def zerotrain_windows(args, world_size: int, out: Path, pack: bool) -> list[dict]:
    """Run launcher/sft.py with or without --pack; its windows' steps and times."""
    records = bench.zerotrain_records(args, world_size, out, __file__, ("--pack", str(pack).lower()))
    windows, last = [], {"step": 0, "tokens_seen": 0, "cpu_seconds": float("nan")}
    for r in records:
        # the loop's own window: the tokens it fed the model over its tokens_per_sec
        windows.append({"steps": (last["step"], r["step"]), "wall_s": (r["tokens_seen"] - last["tokens_seen"])
                        / r["tokens_per_sec"], "cpu_s": r["cpu_seconds"] - last["cpu_seconds"]})
        last = r
    return windows


# --------------------------------------------------------------------------- running every side

def prepare_data(args, tmp: Path) -> None:
    """The benchmarks' tokenizer and the shipped SFT samples prepared with it, into args."""
    from engine.data.prepare import prepare

    tokenizer = bench.bench_tokenizer(tmp / "tok")
    args.tokenizer, args.data, args.vocab_size = tmp / "tok", tmp / "sft", len(tokenizer)
    args.meta = prepare("sft", SFT_SAMPLES, tokenizer, args.data, seq_len=args.seq_len, val_fraction=0.0,
                        show_progress=False)


def print_histogram(args, dataset) -> None:
    """Tokens an example of the prepared data, as a text histogram."""
    import numpy as np

    lengths = np.array([len(dataset[i]["input_ids"]) for i in range(len(dataset))])
    counts, _ = np.histogram(lengths, bins=BINS)
    print(f"{len(lengths)} examples (ShareGPT + Alpaca seed), tokens an example: mean {lengths.mean():.0f}, "
          f"median {np.median(lengths):.0f}, p90 {np.percentile(lengths, 90):.0f}, max {lengths.max()}; "
          f"while preparing: {args.meta['stats']}")
    for lo, hi, n in zip(BINS, BINS[1:], counts):
        if n or lo < lengths.max():
            print(f"  {lo:5d}-{hi - 1:<5d} {n:4d} {'#' * int(np.ceil(60 * n / counts.max()))}")


def compare(args, world_size: int, tmp: Path, dataset) -> dict:
    """Rotating rounds of every side on `world_size` ranks: trained tokens/s per round, medians, ratios."""
    tokens = step_tokens(args, dataset, world_size)
    expected = micro_batch_tokens(args, dataset, world_size)
    sides = args.sides
    result = {"world_size": world_size, "trained_tokens_per_step": statistics.mean(tokens),
              **{f: {s: [] for s in sides} for f in FIGURES}}
    for round_ in range(args.rounds):
        for side in sides[round_ % len(sides):] + sides[:round_ % len(sides)]:
            out = tmp / f"{side}-n{world_size}-r{round_}"
            if side.startswith("zerotrain"):
                windows = zerotrain_windows(args, world_size, out, pack=side == "zerotrain-pack")
            else:
                windows = hf_windows(args, world_size, out, side.removeprefix("hf-"), expected)
            shutil.rmtree(out, ignore_errors=True)
            windows = windows[1:]  # the first window is start-up
            trained = [sum(tokens[w["steps"][0]:w["steps"][1]]) for w in windows]
            wall = [n / w["wall_s"] for n, w in zip(trained, windows)]
            cpu = [n / world_size / w["cpu_s"] for n, w in zip(trained, windows)]
            result["wall"][side].append(statistics.median(wall))
            result["cpu"][side].append(statistics.median(cpu))
            print(f"  n={world_size} round {round_} {side:14s} {result['wall'][side][-1]:8,.0f} trained tokens/s, "
                  f"{result['cpu'][side][-1]:8,.0f} per CPU-second a rank (windows: "
                  f"{', '.join(f'{r:,.0f}' for r in wall)})", flush=True)
    for figure in FIGURES:
        median = {s: statistics.median(result[figure][s]) for s in sides}
        result[f"{figure}_median"] = median
        result[f"{figure}_ratio"] = {s: median[BASELINE] / median[s] for s in sides}
    return result


def print_table(args, results: list[dict]) -> None:
    print(f"\n{bench.run_settings(args)}; micro batch = examples")
    print("trained tokens/s over all ranks (median window, median of rounds) and trained tokens per CPU-second of "
          f"rank 0; ratio = {BASELINE} / side")
    print(f"{'ranks':>5s} {'side':14s} {'tok/s':>8s} {'ratio':>6s} {'tok/CPU-s':>9s} {'ratio':>6s}   tok/s per round")
    for r in results:
        for s in args.sides:
            print(f"{r['world_size']:5d} {s:14s} {r['wall_median'][s]:8,.0f} {r['wall_ratio'][s]:5.2f}x "
                  f"{r['cpu_median'][s]:9,.0f} {r['cpu_ratio'][s]:5.2f}x   "
                  + ", ".join(f"{v:,.0f}" for v in r["wall"][s]))


def main() -> None:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_run_flags(parser)
    parser.set_defaults(seq_len=2048, micro_batch_size=8, steps=10, log_interval=2)
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(DEFAULT_SIDES))
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--hf-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--collator", choices=["pad", "flatten"], help=argparse.SUPPRESS)
    for hidden in ("--out", "--data", "--tokenizer"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--vocab-size", type=int, help=argparse.SUPPRESS)
    if sys.argv[1:2] == ["--zerotrain-worker"]:
        sys.exit(zerotrain_worker(sys.argv[2:]))
    args = parser.parse_args()
    if args.hf_worker:
        return hf_worker(args)
    if BASELINE not in args.sides:
        parser.error(f"--sides must include {BASELINE}: the ratios are against it")

    from engine.data.conversations import SFTDataset

    with tempfile.TemporaryDirectory() as tmp:
        prepare_data(args, Path(tmp))
        dataset = SFTDataset(args.data, "train", args.seq_len)
        print_histogram(args, dataset)
        results = [compare(args, n, Path(tmp), dataset) for n in args.world_sizes]
    print_table(args, results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
