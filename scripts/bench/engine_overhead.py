"""Engine overhead on CPU: tokens/s of launcher/pretrain.py (1 rank, ZeRO-0 and ZeRO-2) against a
bare PyTorch loop training the same transformers model with the same batch, precision,
optimizer (AdamW, same param groups), schedule and clipping, in the same script run.

    python scripts/bench/engine_overhead.py [--preset tiny] [--steps 40] [--rounds 2]

Each side runs in its own subprocess with the same thread settings; rounds alternate the sides.
Throughput is the median over logged windows after the first (warm-up) window, and the
figure reported per side is the median over rounds.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


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
    rates, start, tokens = [], time.perf_counter(), 0
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
            start, tokens = time.perf_counter(), 0
    print(json.dumps({"rates": rates}))


def engine_run(args, stage: int, out: Path) -> list[float]:
    cmd = [sys.executable, str(ROOT / "launcher" / "pretrain.py"), "--preset", args.preset, "--tokenizer",
           str(args.tokenizer), "--data", str(args.data), "--output-dir", str(out), "--seq-len", str(args.seq_len),
           "--micro-batch-size", str(args.micro_batch_size), "--max-steps", str(args.steps), "--warmup-steps", "5",
           "--precision", "fp32", "--zero-stage", str(stage), "--log-interval", str(args.log_interval),
           "--eval-interval", str(10 ** 6), "--save-interval", str(10 ** 6), "--resume", "never",
           "--seed", "42"]
    env = dict(os.environ, MASTER_PORT=str(29500 + stage))
    subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    # the last window also holds the end-of-run checkpoint and export: leave it out like the first
    return [r["tokens_per_sec"] for r in records if "tokens_per_sec" in r][:-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--log-interval", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--bare", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", help=argparse.SUPPRESS)
    parser.add_argument("--vocab-size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare:
        return bare_loop(args)

    from hf_trainer import prepare_data  # scripts/bench/ is sys.path[0] when run as a script

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prepare_data(args, tmp)
        results: dict[str, list[float]] = {"bare": [], "zero0": [], "zero2": []}
        for round_ in range(args.rounds):
            bare = subprocess.run([sys.executable, __file__, "--bare", "--data", str(args.data), "--vocab-size",
                                   str(args.vocab_size), "--preset", args.preset, "--steps", str(args.steps),
                                   "--seq-len", str(args.seq_len), "--micro-batch-size", str(args.micro_batch_size),
                                   "--log-interval", str(args.log_interval)], check=True, capture_output=True, text=True)
            results["bare"].append(statistics.median(json.loads(bare.stdout.splitlines()[-1])["rates"][1:]))
            for stage in (0, 2):
                rates = engine_run(args, stage, tmp / f"run{stage}-{round_}")
                results[f"zero{stage}"].append(statistics.median(rates[1:]))
        base = statistics.median(results["bare"])
        print(f"preset {args.preset}, seq {args.seq_len}, micro batch {args.micro_batch_size}, fp32, 1 rank, "
              f"{args.steps} steps, {args.rounds} rounds")
        for name, values in results.items():
            rate = statistics.median(values)
            print(f"{name:6s} {rate:10,.0f} tokens/s  ratio to bare {rate / base:.3f}x  (rounds: "
                  + ", ".join(f"{v:,.0f}" for v in values) + ")")


if __name__ == "__main__":
    main()
