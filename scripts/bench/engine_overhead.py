"""Engine overhead on CPU: launcher/pretrain.py (1 rank, ZeRO-0 and ZeRO-2) against a bare PyTorch
loop training the same transformers model with the same batch, precision, optimizer (AdamW, same
param groups), schedule and clipping, in the same script run.

    python scripts/bench/engine_overhead.py [--preset tiny] [--steps 40] [--rounds 2]
    python scripts/bench/engine_overhead.py --in-process [--preset tiny] [--steps 30]
    python scripts/bench/engine_overhead.py --breakdown [--zero-stage 2] [--steps 30]

Default: tokens/s of whole runs. Each side runs in its own subprocess with the same thread
settings (--threads); each round runs every side once, the order rotating. Throughput is the
median over logged windows after the first (warm-up) window, and the figure reported per side is
the median over rounds. Also tokens per CPU-second of each process over the same windows, which
other processes on the machine change much less than wall time (with one thread a run: more
threads spin while they wait for a core).

--in-process: one process, one thread, holds a ZeRO-0 and a ZeRO-2 trainer built as the launcher
builds them (engine.training.main.setup, a world of one) and the bare loop over a copy of the same model;
each round runs one optimizer step of each (the order rotating), so another process on the machine
slows all three alike. The ratio is the median over rounds of the bare loop's step time over the
engine's in the same round (above 1: the engine is faster); per side, the median step time.
tests/distributed/test_overhead.py runs this as the guard of `make test`.

--breakdown: one trainer, stepped as Trainer.fit steps it (watchdog started, a metrics record
written every --log-interval steps), with the parts of a step timed where they are called: the
watchdog's marks and beat, the loop's reductions (all_reduce_sums), its metrics (batch_tokens,
the record and its write), and the loss over the logits (token_nll_sum, forward and backward, the
backward timed between gradient hooks on the loss and on the logits). The same logits are also
given, interleaved, to transformers' loss and to the sliced-logits formula this engine used
before (engine.objectives.tokens' docstring), as ratios in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
SAMPLE = ROOT / "data" / "samples" / "tinyshakespeare.txt"


def bare_loop(args) -> None:
    """The baseline: plain PyTorch, no DeepSpeed."""
    import torch

    from engine.config.parse import parse_config
    from engine.data.collate import collate_stack
    from engine.data.loader import BatchLoader, ShardedSampler
    from engine.data.text import PretrainDataset
    from engine.training.build import lr_lambda, param_groups
    from model.build import build_model

    cfg = parse_config(["--preset", args.preset, "--seq-len", str(args.seq_len), "--micro-batch-size",
                        str(args.micro_batch_size), "--max-steps", str(args.steps), "--warmup-steps", "5"])
    data = PretrainDataset(args.data, "train", args.seq_len)
    loader = BatchLoader(data, ShardedSampler(len(data), 0, 1, seed=cfg.train.seed), args.micro_batch_size, collate_stack)
    torch.manual_seed(cfg.train.seed)
    model = build_model(args.preset, vocab_size=args.vocab_size, max_seq_len=args.seq_len)
    opt = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                            betas=(cfg.optim.adam_beta1, cfg.optim.adam_beta2), eps=cfg.optim.adam_eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    rates, cpu, start, cpu_start, tokens = [], [], time.perf_counter(), time.process_time(), 0
    for step in range(1, args.steps + 1):
        batch = loader.next_batch()
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        tokens += batch["input_ids"].numel()
        if step % args.log_interval == 0:
            float(loss)
            rates.append(tokens / (time.perf_counter() - start))
            cpu.append(tokens / (time.process_time() - cpu_start))
            start, cpu_start, tokens = time.perf_counter(), time.process_time(), 0
    print(json.dumps({"rates": rates, "cpu": cpu}))


def subprocess_env(args, port: int) -> dict[str, str]:
    env = dict(os.environ, MASTER_PORT=str(port))
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    return env


def engine_run(args, stage: int, out: Path) -> dict[str, list[float]]:
    """launcher/pretrain.py's run (through hf_trainer.py's worker, which adds the process's CPU
    seconds to each metrics record): tokens/s per window, and tokens per CPU-second from the
    second window on (None for the first)."""
    cmd = [sys.executable, str(ROOT / "scripts" / "bench" / "hf_trainer.py"), "--zerotrain-worker", "--preset",
           args.preset, "--tokenizer", str(args.tokenizer), "--data", str(args.data), "--output-dir", str(out),
           "--seq-len", str(args.seq_len), "--micro-batch-size", str(args.micro_batch_size), "--max-steps",
           str(args.steps), "--warmup-steps", "5", "--precision", "fp32", "--zero-stage", str(stage), "--log-interval",
           str(args.log_interval), "--eval-interval", str(10 ** 6), "--save-interval", str(10 ** 6), "--resume",
           "never", "--seed", "42"]
    subprocess.run(cmd, check=True, env=subprocess_env(args, 29500 + stage), capture_output=True, text=True)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "tokens_per_sec" in r]
    cpu = [None] + [(b["tokens_seen"] - a["tokens_seen"]) / (b["cpu_seconds"] - a["cpu_seconds"])
                    for a, b in zip(records, records[1:])]
    # the last window also holds the end-of-run checkpoint and export: leave it out like the first
    return {"rates": [r["tokens_per_sec"] for r in records][:-1], "cpu": cpu[:-1]}


# --------------------------------------------------------------------------- in one process

def world_of_one() -> None:
    """Threads and port of a world of one for engine.training.main.setup: one thread (a shared machine slows
    a second one down unevenly), a free port (another run on the machine may hold the default)."""
    import torch
    from hf_trainer import (
        free_port,  # scripts/bench/ is sys.path[0] when run as a script
    )

    torch.set_num_threads(1)
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def setup_trainer(args, stage: int, out: Path):
    """A world-of-one pretraining Trainer built as launcher/pretrain.py builds it (zerotrain's default
    6400-token tokenizer, the English sample), its hang watchdog started as Trainer.fit starts it."""
    from engine.config.parse import parse_config
    from engine.distributed import World
    from engine.objectives.causal_lm import PRETRAIN
    from engine.training.main import setup
    from engine.training.watchdog import Watchdog

    cfg = parse_config(["--preset", args.preset, "--data", str(SAMPLE), "--output-dir", str(out / f"zero{stage}"),
                        "--data-cache-dir", str(out / "cache"), "--seq-len", str(args.seq_len), "--micro-batch-size",
                        str(args.micro_batch_size), "--max-steps", str(10 ** 6), "--warmup-steps", "5",
                        "--precision", "fp32", "--zero-stage", str(stage), "--log-interval", str(args.log_interval),
                        "--seed", "42"])
    trainer = setup(cfg, PRETRAIN, World())
    trainer.watchdog = Watchdog(trainer.plan.run.hang, 0, 1, cfg.train.hang_timeout).start(0)
    return trainer


def loop_step(trainer) -> Callable[[], None]:
    """One step of Trainer.fit's loop without evaluation or checkpoints: train_step, the watchdog's
    beat, and every log_interval steps the metrics record, written."""
    window = {"start": time.perf_counter(), "tokens": 0}

    def step() -> None:
        out = trainer.train_step()
        trainer.watchdog.beat(trainer.state.step)
        window["tokens"] += out["tokens"]
        if trainer.state.step % trainer.cfg.train.log_interval == 0:
            rate = window["tokens"] / (time.perf_counter() - window["start"])
            trainer.write_metrics(trainer._metrics(out, rate))
            window.update(start=time.perf_counter(), tokens=0)

    return step


def bare_step(trainer) -> Callable[[], None]:
    """The bare loop's step (as bare_loop's) over a copy of the trainer's model: the same weights,
    data, micro batch, AdamW groups, schedule and clipping; transformers computes the loss."""
    import torch

    from engine.data.loader import BatchLoader, ShardedSampler
    from engine.training.build import lr_lambda, param_groups
    from model.build import build_model

    cfg, module = trainer.cfg, trainer.engine.module
    model = build_model(cfg.model.preset, vocab_size=module.config.vocab_size, max_seq_len=cfg.data.seq_len)
    model.load_state_dict(module.state_dict())
    model.train()
    opt = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                            betas=(cfg.optim.adam_beta1, cfg.optim.adam_beta2), eps=cfg.optim.adam_eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    data = trainer.data
    loader = BatchLoader(data.train, ShardedSampler(len(data.train), 0, 1, seed=cfg.train.seed),
                         cfg.train.micro_batch_size, data.collate)

    def step() -> None:
        loss = model(**loader.next_batch(), use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

    return step


def interleaved(sides: dict[str, Callable[[], None]], steps: int, warmup: int) -> dict[str, list[float]]:
    """Seconds of each side's steps after `warmup` rounds; each round runs every side once, the
    order rotating, so a slow spell of the machine falls on every side alike."""
    names, times = list(sides), {name: [] for name in sides}
    for round_ in range(warmup + steps):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            start = time.perf_counter()
            sides[name]()
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def in_process(args) -> dict[str, Any]:
    """ZeRO-0, ZeRO-2 and the bare loop stepped in turn in this process: median step times and the
    engine's speed relative to the bare loop (bare median / engine median)."""
    world_of_one()
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {f"zero{stage}": setup_trainer(args, stage, Path(tmp)) for stage in (0, 2)}
        sides = {"bare": bare_step(trainers["zero0"]), **{name: loop_step(t) for name, t in trainers.items()}}
        times = interleaved(sides, args.steps, args.warmup)
        for trainer in trainers.values():
            trainer.watchdog.stop()
    medians = {name: statistics.median(values) for name, values in times.items()}
    # Each round's own ratio: a round's steps run back to back, under the same load.
    ratios = {name: statistics.median(b / e for b, e in zip(times["bare"], times[name])) for name in trainers}
    return {"preset": args.preset, "seq_len": args.seq_len, "micro_batch_size": args.micro_batch_size,
            "steps": args.steps, "median_step_ms": {k: 1000 * v for k, v in medians.items()},
            "ratio_to_bare": ratios, "ratio_of_medians": {name: medians["bare"] / medians[name] for name in trainers},
            "step_ms": {k: [round(1000 * v, 1) for v in values] for k, values in times.items()}}


def loss_variants() -> dict[str, Callable[[Any, Any], Any]]:
    """The summed loss over full logits three ways: this engine's, transformers' (HF Trainer's and
    the bare loop's), and the sliced-logits formula the engine had before token_nll_sum shifted the
    labels instead."""
    import torch
    import torch.nn.functional as F
    from transformers.loss.loss_utils import ForCausalLMLoss

    from engine.objectives.tokens import token_nll_sum

    def transformers_loss(logits, labels):
        return ForCausalLMLoss(logits, labels, logits.shape[-1], num_items_in_batch=torch.tensor(1.0))

    def sliced(logits, labels):
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), reduction="sum")

    return {"token_nll_sum": token_nll_sum, "transformers": transformers_loss, "sliced logits": sliced}


CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}
"""Wall time, and the CPU time of the training thread (which does all of a one-thread step's work,
page faults included): other processes on the machine stretch the first, much less the second."""


def breakdown(args) -> dict[str, Any]:
    """The parts of a step's time (see the module docstring), on both CLOCKS: ms per step of each
    part and of the whole step (means over args.steps steps after args.warmup), calls per step,
    and the median CPU ms of the loss variants on the same logits."""
    import engine.objectives.tokens as tokens
    import engine.training.trainer as loop

    world_of_one()
    spent = {clock: defaultdict(float) for clock in CLOCKS}
    calls: dict[str, int] = defaultdict(int)

    def now() -> dict[str, float]:
        return {clock: read() for clock, read in CLOCKS.items()}

    def add(part: str, since: dict[str, float]) -> None:
        for clock, read in CLOCKS.items():
            spent[clock][part] += read() - since[clock]

    def timed(part: str, fn: Callable) -> Callable:
        def inner(*args, **kwargs):
            since = now()
            try:
                return fn(*args, **kwargs)
            finally:
                add(part, since)
                calls[part] += 1

        return inner

    last: dict[str, Any] = {}
    loss_sum, variants = tokens.token_nll_sum, loss_variants()  # before token_nll_sum is wrapped

    def loss_timed(logits, labels):
        since = now()
        loss = loss_sum(logits, labels)
        add("loss", since)
        calls["loss"] += 1
        last.update(logits=logits.detach(), labels=labels)
        if loss.requires_grad:  # its backward runs between the loss's gradient and the logits'
            began = {}
            loss.register_hook(lambda grad: began.update(now()))
            logits.register_hook(lambda grad: add("loss", began))
        return loss

    with tempfile.TemporaryDirectory() as tmp:
        trainer = setup_trainer(args, args.zero_stage, Path(tmp))
        watchdog = trainer.watchdog
        watchdog.mark, watchdog.beat = timed("watchdog", watchdog.mark), timed("watchdog", watchdog.beat)
        loop.all_reduce_sums = timed("reductions", loop.all_reduce_sums)
        loop.batch_tokens = timed("metrics", loop.batch_tokens)
        trainer._metrics = timed("metrics", trainer._metrics)
        trainer.write_metrics = timed("metrics", trainer.write_metrics)
        tokens.token_nll_sum = loss_timed
        step = timed("step", loop_step(trainer))
        for _ in range(args.warmup):
            step()
        for clock in CLOCKS:
            spent[clock].clear()
        calls.clear()
        for _ in range(args.steps):
            step()
        tokens.token_nll_sum = loss_sum
        # the loss alone, on the last step's logits, the variants interleaved
        names, variant_ms = list(variants), {name: [] for name in variants}
        for i in range(args.steps):
            for name in names[i % 3:] + names[:i % 3]:
                logits = last["logits"].clone().requires_grad_()
                since = now()
                variants[name](logits, last["labels"]).backward()
                variant_ms[name].append(1000 * (time.thread_time() - since["cpu"]))
        watchdog.stop()
    result: dict[str, Any] = {"zero_stage": args.zero_stage, "steps": args.steps,
                              "calls_per_step": {part: calls[part] / args.steps for part in calls if part != "step"},
                              "loss_variants_ms": {name: statistics.median(v) for name, v in variant_ms.items()}}
    for clock in CLOCKS:
        parts = {part: 1000 * spent[clock][part] / args.steps for part in ("watchdog", "reductions", "metrics", "loss")}
        step_ms = 1000 * spent[clock]["step"] / args.steps
        result[f"{clock}_ms"] = {**parts, "rest": step_ms - sum(parts.values()), "step": step_ms}
    return result


def print_breakdown(args, result: dict[str, Any]) -> None:
    wall, cpu, calls = result["wall_ms"], result["cpu_ms"], result["calls_per_step"]
    labels = {
        "watchdog": f"watchdog: mark and beat ({calls.get('watchdog', 0):.0f} calls a step)",
        "reductions": f"reductions: all_reduce_sums ({calls.get('reductions', 0):.0f} a step)",
        "metrics": f"metrics: batch_tokens, the record and its write (every {args.log_interval} steps)",
        "loss": "loss over the logits: token_nll_sum forward + backward",
        "rest": "the rest: model forward and backward, DeepSpeed's backward and step",
        "step": "whole step",
    }
    print(f"preset {args.preset}, seq {args.seq_len}, micro batch {args.micro_batch_size}, fp32, ZeRO-"
          f"{result['zero_stage']}, 1 rank, 1 thread; means over {args.steps} steps after {args.warmup} warm-up")
    print("| part of a step | ms per step (wall) | CPU ms per step | share of the step (CPU) |\n"
          "| --- | ---: | ---: | ---: |")
    for part, label in labels.items():
        print(f"| {label} | {wall[part]:.3f} | {cpu[part]:.3f} | {cpu[part] / cpu['step']:.2%} |")
    losses = result["loss_variants_ms"]
    print("\nthe loss alone on the same logits, forward + backward, median CPU ms (ratio to token_nll_sum): "
          + ", ".join(f"{name} {ms:.1f} ({ms / losses['token_nll_sum']:.2f}x)" for name, ms in losses.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--log-interval", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, help="OMP threads of every run (default: torch's own choice)")
    parser.add_argument("--in-process", action="store_true", help="ZeRO-0, ZeRO-2 and the bare loop in one process")
    parser.add_argument("--breakdown", action="store_true", help="the parts of a step's time, one trainer")
    parser.add_argument("--zero-stage", type=int, default=2, help="--breakdown's trainer")
    parser.add_argument("--warmup", type=int, default=3, help="--in-process and --breakdown: untimed steps first")
    parser.add_argument("--json", help="--in-process and --breakdown: also write the results here")
    parser.add_argument("--bare", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", help=argparse.SUPPRESS)
    parser.add_argument("--vocab-size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare:
        return bare_loop(args)
    if args.in_process or args.breakdown:
        result = in_process(args) if args.in_process else breakdown(args)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
        if args.breakdown:
            return print_breakdown(args, result)
        medians = result["median_step_ms"]
        print(f"preset {args.preset}, seq {args.seq_len}, micro batch {args.micro_batch_size}, fp32, 1 rank, 1 thread, "
              f"{args.steps} steps a side after {args.warmup} warm-up, interleaved in one process")
        for name, ms in medians.items():
            ratio = result["ratio_to_bare"].get(name, 1.0)
            print(f"{name:6s} {ms:8.1f} ms a step (median)  ratio to bare {ratio:.3f}x (median of the rounds' ratios)")
        return None

    from hf_trainer import (
        prepare_data,  # scripts/bench/ is sys.path[0] when run as a script
    )

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prepare_data(args, tmp)
        sides = ("bare", "zero0", "zero2")
        results = {figure: {side: [] for side in sides} for figure in ("rates", "cpu")}
        for round_ in range(args.rounds):
            for side in sides[round_ % 3:] + sides[:round_ % 3]:
                if side == "bare":
                    bare = subprocess.run([sys.executable, __file__, "--bare", "--data", str(args.data), "--vocab-size",
                                           str(args.vocab_size), "--preset", args.preset, "--steps", str(args.steps),
                                           "--seq-len", str(args.seq_len), "--micro-batch-size",
                                           str(args.micro_batch_size), "--log-interval", str(args.log_interval)],
                                          check=True, capture_output=True, text=True, env=subprocess_env(args, 29500))
                    run = json.loads(bare.stdout.splitlines()[-1])
                else:
                    run = engine_run(args, int(side[-1]), tmp / f"run{side}-{round_}")
                for figure in results:
                    results[figure][side].append(statistics.median(run[figure][1:]))
        print(f"preset {args.preset}, seq {args.seq_len}, micro batch {args.micro_batch_size}, fp32, 1 rank, "
              f"{args.steps} steps, {args.rounds} rounds, {args.threads or 'default'} thread(s)")
        for figure, unit in (("rates", "tokens/s"), ("cpu", "tokens per CPU-second")):
            base = statistics.median(results[figure]["bare"])
            for name, values in results[figure].items():
                rate = statistics.median(values)
                print(f"{name:6s} {rate:10,.0f} {unit}  ratio to bare {rate / base:.3f}x  (rounds: "
                      + ", ".join(f"{v:,.0f}" for v in values) + ")")


if __name__ == "__main__":
    main()
