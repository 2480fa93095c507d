"""zerotrain against HF Trainer with the same DeepSpeed config: tokens/s, measured in the same script run.

    python scripts/bench/hf_trainer.py --preset tiny --world-sizes 1 2 [--precision fp32] [--rounds 3]

The peer is what a user would write instead: transformers' `Trainer` with
`TrainingArguments(deepspeed=<dict>, use_cpu=True, ...)`, run under `torchrun` (plain python for
one rank). Both sides get

- the same model: `model.build.build_model(preset, vocab_size=..., max_seq_len=...)`, seeded alike;
- the same data: the windows of one prepared directory (`engine.data.text.PretrainDataset`; HF
  Trainer takes that torch Dataset as is and batches it with its own sampler and collator);
- the same DeepSpeed config: `ds_configs/zero{stage}.json` filled by zerotrain's
  `fill_ds_config` (micro batch, accumulation, clipping, AdamW settings, precision), handed to
  HF Trainer as a dict, whose own checks then confirm it agrees with the TrainingArguments;
- the same micro batch, grad accumulation, precision, steps, warmup + cosine to 0.1 x lr,
  logging interval, attention implementation, activation checkpointing and threads.

Throughput: per logged window of `--log-interval` optimizer steps, tokens / wall time, over all
ranks (zerotrain: `metrics.jsonl`'s tokens_per_sec; HF: a TrainerCallback stamping every step
end). The first window (start-up, first allocations) is left out on both sides; neither side
checkpoints or evaluates inside the measured steps. A run's figure is the median of its windows;
each side's figure is the median over `--rounds`, and the rounds alternate which side goes first.
Two more figures resist other processes on a shared machine: the best window of each run
(others can only pull a window down), and tokens per CPU-second of rank 0 (its
`time.process_time()` over the same windows; zerotrain's launcher runs with `write_metrics`
wrapped to add it to each record, the loop unchanged).
scripts/bench/gpu.py runs the same comparison on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

WARMUP_STEPS = 2
SIDES = ("zerotrain", "hf")


def add_run_flags(parser: argparse.ArgumentParser) -> None:
    """The settings both sides share (also the HF worker's flags)."""
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--log-interval", type=int, default=4)
    parser.add_argument("--attn-implementation", default="sdpa")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--threads", type=int, default=1,
                        help="OMP threads per rank (on a shared machine more than one thread a rank slows down "
                             "badly whenever another process takes a core)")


def zerotrain_flags(args) -> list[str]:
    """The zerotrain flags of a run (the DeepSpeed config of both sides is filled from these)."""
    return ["--preset", args.preset, "--seq-len", str(args.seq_len), "--micro-batch-size", str(args.micro_batch_size),
            "--grad-accum", str(args.grad_accum), "--max-steps", str(args.steps), "--warmup-steps", str(WARMUP_STEPS),
            "--precision", args.precision, "--zero-stage", str(args.zero_stage), "--log-interval",
            str(args.log_interval), "--attn-implementation", args.attn_implementation,
            "--gradient-checkpointing", str(args.gradient_checkpointing).lower(), "--seed", "42"]


def worker_flags(args) -> list[str]:
    flags = ["--preset", args.preset, "--precision", args.precision, "--zero-stage", str(args.zero_stage),
             "--seq-len", str(args.seq_len), "--micro-batch-size", str(args.micro_batch_size), "--grad-accum",
             str(args.grad_accum), "--steps", str(args.steps), "--log-interval", str(args.log_interval),
             "--attn-implementation", args.attn_implementation, "--threads", str(args.threads)]
    return flags + (["--gradient-checkpointing"] if args.gradient_checkpointing else [])


# --------------------------------------------------------------------------- the HF Trainer side

def hf_worker(args) -> None:
    """One rank of the HF Trainer run (under torchrun, or alone); rank 0 writes the window rates."""
    from engine.data.text import PretrainDataset

    world_size = int(os.environ.get("WORLD_SIZE", 1))
    tokens_per_step = args.micro_batch_size * args.grad_accum * args.seq_len * world_size
    stamps = hf_train(args, PretrainDataset(args.data, "train", args.seq_len))
    if int(os.environ.get("RANK", 0)) == 0:
        every, windows = args.log_interval, range(0, len(stamps) - args.log_interval, args.log_interval)
        wall = [every * tokens_per_step / (stamps[i + every][0] - stamps[i][0]) for i in windows]
        cpu = [every * tokens_per_step / world_size / (stamps[i + every][1] - stamps[i][1]) for i in windows]
        Path(args.out, "rates.json").write_text(json.dumps({"wall": wall, "cpu": cpu}))


def hf_train(args, train_dataset, data_collator=None, **training_args) -> list[tuple[float, float]]:
    """Train with HF Trainer on `train_dataset` (`training_args`: further TrainingArguments);
    the (wall, CPU) time of this rank at the start and at the end of every optimizer step."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

    from engine.config.deepspeed import fill_ds_config, load_ds_config
    from engine.config.parse import parse_config
    from model.build import build_model
    from model.presets import preset_config

    world_size = int(os.environ.get("WORLD_SIZE", 1))
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = parse_config(zerotrain_flags(args) + ["--output-dir", args.out])
    raw, source = load_ds_config(cfg)
    ds = fill_ds_config(raw, cfg, world_size=world_size, precision=args.precision, device_type=device_type,
                        source=source)

    class StepClock(TrainerCallback):
        """Wall and CPU time at the start of training and at the end of every optimizer step."""

        def __init__(self):
            self.stamps: list[tuple[float, float]] = []

        def _stamp(self):
            if device_type == "cuda":
                torch.cuda.synchronize()
            self.stamps.append((time.perf_counter(), time.process_time()))

        def on_train_begin(self, *_, **__):
            self._stamp()

        def on_step_end(self, *_, **__):
            self._stamp()

    set_seed(cfg.train.seed)
    context = preset_config(args.preset).max_position_embeddings
    model = build_model(args.preset, vocab_size=args.vocab_size, max_seq_len=max(context, args.seq_len),
                        attn_implementation=args.attn_implementation)
    # The peer runs transformers' own attention: model.build gives "sdpa" zerotrain's (model.attention).
    model.set_attn_implementation(args.attn_implementation)
    o, t = cfg.optim, cfg.train
    arguments = TrainingArguments(
        output_dir=args.out, deepspeed=ds, use_cpu=device_type == "cpu", bf16=args.precision == "bf16",
        per_device_train_batch_size=t.micro_batch_size, gradient_accumulation_steps=t.grad_accum,
        max_steps=t.max_steps, learning_rate=o.lr, warmup_steps=o.warmup_steps,
        lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": o.min_lr_ratio},
        weight_decay=o.weight_decay, adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_epsilon=o.adam_eps,
        max_grad_norm=o.grad_clip, logging_steps=t.log_interval, save_strategy="no", eval_strategy="no",
        report_to=[], dataloader_num_workers=0, seed=t.seed, data_seed=t.seed,
        gradient_checkpointing=args.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if args.gradient_checkpointing else None,
        **training_args)
    clock = StepClock()
    trainer = Trainer(model=model, args=arguments, train_dataset=train_dataset, data_collator=data_collator,
                      callbacks=[clock])
    trainer.train()
    return clock.stamps


def zerotrain_worker(argv: list[str], stage=None) -> int:
    """launcher/pretrain.py (or the launcher of `stage`), with rank 0's CPU seconds added to each metrics record."""
    from engine.objectives.causal_lm import PRETRAIN
    from engine.training import main as train
    from engine.training import trainer

    write_metrics = trainer.Trainer.write_metrics

    def with_cpu_time(self, record):
        write_metrics(self, {**record, "cpu_seconds": time.process_time()} if "tokens_per_sec" in record else record)

    trainer.Trainer.write_metrics = with_cpu_time
    return train.main(argv, stage or PRETRAIN)


# --------------------------------------------------------------------------- running both sides

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script_and_args: list[str], world_size: int) -> list[str]:
    if world_size == 1:
        return [sys.executable] + script_and_args
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world_size), "--master_addr",
            "127.0.0.1", "--master_port", str(free_port())] + script_and_args


def run(cmd: list[str], threads: int, what: str) -> None:
    # one rank under plain python: the world of one that torchrun would describe
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()))
    env.update(OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")


def zerotrain_records(args, world_size: int, out: Path, script: str = __file__,
                      extra: tuple[str, ...] = ()) -> list[dict]:
    """The throughput records of `script --zerotrain-worker` (this one: pretraining) run with the
    shared flags plus `extra`."""
    cmd = launch([str(Path(script).resolve()), "--zerotrain-worker"] + zerotrain_flags(args) + [
        "--tokenizer", str(args.tokenizer), "--data", str(args.data), "--output-dir", str(out),
        "--eval-interval", str(10 ** 6), "--save-interval", str(10 ** 6), "--resume", "never", *extra], world_size)
    run(cmd, args.threads, "zerotrain")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "tokens_per_sec" in r]


def zerotrain_rates(args, world_size: int, out: Path) -> dict[str, list[float]]:
    records = zerotrain_records(args, world_size, out)
    cpu = [(b["tokens_seen"] - a["tokens_seen"]) / world_size / (b["cpu_seconds"] - a["cpu_seconds"])
           for a, b in zip(records, records[1:])]
    return {"wall": [r["tokens_per_sec"] for r in records], "cpu": [float("nan")] + cpu}


def hf_rates(args, world_size: int, out: Path) -> dict[str, list[float]]:
    cmd = launch([str(Path(__file__).resolve()), "--hf-worker", "--out", str(out), "--data", str(args.data),
                  "--vocab-size", str(args.vocab_size)] + worker_flags(args), world_size)
    run(cmd, args.threads, "HF Trainer")
    return json.loads((out / "rates.json").read_text())


PRETRAIN_SAMPLES = [str(ROOT / "data" / "samples" / "tinyshakespeare.txt"),
                    str(ROOT / "data" / "samples" / "tang_poems_5k.jsonl")]


def bench_tokenizer(out: Path):
    """The benchmarks' tokenizer: a 6400-token BPE trained on the English and Chinese samples, saved in `out`."""
    from engine.data.text import read_documents
    from model.tokenizer import load_tokenizer, train_tokenizer

    train_tokenizer((d for p in PRETRAIN_SAMPLES for d in read_documents(p)), 6400, str(out), show_progress=False)
    return load_tokenizer(str(out))


def prepare_data(args, tmp: Path) -> None:
    """A 6400-token BPE and the prepared shipped samples (English and Chinese) into args."""
    from engine.data.prepare import prepare

    tokenizer = bench_tokenizer(tmp / "tok")
    prepare("pretrain", PRETRAIN_SAMPLES, tokenizer, tmp / "data", val_fraction=0.01, show_progress=False)
    args.tokenizer, args.data, args.vocab_size = tmp / "tok", tmp / "data", len(tokenizer)


FIGURES = ("wall", "best", "cpu")  # median window, best window, median window of tokens per CPU-second


def compare(args, world_size: int, tmp: Path) -> dict:
    """Alternating rounds of both sides on `world_size` ranks: each figure per round, their medians, the ratios."""
    result = {"preset": args.preset, "world_size": world_size, "precision": args.precision,
              "zero_stage": args.zero_stage, **{f: {s: [] for s in SIDES} for f in FIGURES}}
    for round_ in range(args.rounds):
        for side in SIDES if round_ % 2 == 0 else SIDES[::-1]:
            out = tmp / f"{side}-{args.preset}-n{world_size}-r{round_}"
            rates = (zerotrain_rates if side == "zerotrain" else hf_rates)(args, world_size, out)
            shutil.rmtree(out, ignore_errors=True)  # checkpoints of big models fill a disk
            wall, cpu = rates["wall"][1:], rates["cpu"][1:]  # the first window is warm-up
            result["wall"][side].append(statistics.median(wall))
            result["best"][side].append(max(wall))
            result["cpu"][side].append(statistics.median(cpu))
            print(f"  n={world_size} round {round_} {side:9s} {result['wall'][side][-1]:10,.0f} tokens/s, "
                  f"{result['cpu'][side][-1]:8,.0f} tokens per CPU-second a rank "
                  f"(windows: {', '.join(f'{r:,.0f}' for r in wall)})", flush=True)
    for figure in FIGURES:
        median = {s: statistics.median(result[figure][s]) for s in SIDES}
        result[f"{figure}_median"] = median
        result[f"{figure}_ratio"] = median["zerotrain"] / median["hf"]
    return result


def run_settings(args) -> str:
    """The settings line above a results table."""
    return (f"preset {args.preset}, ZeRO-{args.zero_stage}, {args.precision}, seq {args.seq_len}, micro batch "
            f"{args.micro_batch_size}, grad accum {args.grad_accum}, {args.steps} steps (windows of "
            f"{args.log_interval}, first left out), {args.rounds} rounds, {args.threads} thread(s) a rank")


def print_table(args, results: list[dict]) -> None:
    print("\n" + run_settings(args))
    print("tokens/s over all ranks (median window; best window) and tokens per CPU-second of one rank; "
          "zerotrain | HF Trainer, ratio zerotrain / HF")
    print(f"{'ranks':>5s} {'median tok/s':>20s} {'ratio':>6s} {'best window tok/s':>20s} {'ratio':>6s} "
          f"{'tok per CPU-s':>20s} {'ratio':>6s}   median tok/s per round (zerotrain | HF)")
    for r in results:
        cells = " ".join(f"{r[f + '_median']['zerotrain']:9,.0f} {r[f + '_median']['hf']:9,.0f}  {r[f + '_ratio']:5.2f}x"
                         for f in FIGURES)
        print(f"{r['world_size']:5d} {cells}   " + ", ".join(f"{v:,.0f}" for v in r["wall"]["zerotrain"]) + " | "
              + ", ".join(f"{v:,.0f}" for v in r["wall"]["hf"]))


def main() -> None:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_flags(parser)
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--hf-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--vocab-size", type=int, help=argparse.SUPPRESS)
    if sys.argv[1:2] == ["--zerotrain-worker"]:
        sys.exit(zerotrain_worker(sys.argv[2:]))
    args = parser.parse_args()
    if args.hf_worker:
        return hf_worker(args)

    with tempfile.TemporaryDirectory() as tmp:
        prepare_data(args, Path(tmp))
        results = [compare(args, n, Path(tmp)) for n in args.world_sizes]
    print_table(args, results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
