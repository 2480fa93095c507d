"""zerotrain's launcher/dpo.py against TRL's DPOTrainer, same DeepSpeed config: tokens/s and peak RSS.

    python scripts/bench/dpo_trl.py [--world-sizes 1 2] [--rounds 3] [--steps 24] [--quick]

Four configurations, each on 1 and 2 CPU ranks, in one script run:

- zerotrain live:        launcher/dpo.py --init-from MODEL --pref-loss dpo (frozen copy of the init model);
- zerotrain precomputed: the same with --precompute-ref (log-probs computed once before training);
- TRL live:              trl.DPOTrainer(model, ref_model=None) (TRL loads its reference from the same dir);
- TRL precomputed:       the same with DPOConfig(precompute_ref_log_probs=True).

Both sides get
- the same model: the `--preset` (default tiny) built by model.build.build_model with seed 0 and
  saved as an HF directory with the tokenizer (zerotrain --init-from, TRL from_pretrained);
- the same tokenizer: a 6400-token BPE trained on the shipped samples (scripts/bench/hf_trainer.py's);
- the same pairs: data/samples/pref_pairs.jsonl (875 MiniMind dpo.jsonl pairs), keeping the first
  --max-pairs (128; 0: all) that zerotrain encodes without truncation at --seq-len, written to one
  JSONL both sides read. zerotrain
  prepares it (--val-fraction 0, so its training pairs are the file's, in order); TRL tokenizes it
  itself with max_length = --seq-len. Before any run the script checks, pair by pair, that TRL's
  tokenization gives each chosen and rejected sequence exactly zerotrain's token count;
- the same batches: TRL's sampler is replaced by one yielding zerotrain's ShardedSampler stream
  (the seeded permutation), which accelerate's batch sharding splits into exactly the micro-batches
  zerotrain's ranks take; the script checks that the tokens of every step agree;
- the same DeepSpeed config: ds_configs/zero{stage}.json filled by zerotrain's fill_ds_config,
  handed to TRL as DPOConfig(deepspeed=<dict>);
- the same micro batch, accumulation, ranks, precision (fp32), steps, lr schedule, beta, loss
  (sigmoid DPO), threads per rank, attention implementation.
2 ranks run under torchrun (gloo) on both sides, 1 rank under plain python.

tokens/s: non-padding tokens (attention-mask sum over every rank: zerotrain's tokens_seen, TRL's
num_tokens) of the timed steps over their wall time. The timed steps are every optimizer step after
the first `--skip` (start-up and warm-up left out): time from the end of step `skip` to the end of
the last step, stamped on rank 0 (zerotrain: Trainer.train_step wrapped; TRL: a TrainerCallback's
on_step_end). Precomputing the reference happens before training and is timed separately (rank 0
wall time of engine.objectives.reference.precompute / DPOTrainer._precompute_ref_logps; each run precomputes
afresh, no cache). Peak RSS: every rank's own high-water mark (VmHWM, scripts/bench/peak_rss.py),
summed over the ranks. Rounds rotate the order of the configurations; figures are medians over
rounds with the min-max spread, ratios zerotrain / TRL of the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import hf_trainer as bench  # noqa: E402  (launch, run: torchrun / plain python with the same environment)
from peak_rss import summed_peak_rss, write_peak_rss_at_exit  # noqa: E402

CONFIGS = (("zerotrain", "live"), ("zerotrain", "precompute"), ("trl", "live"), ("trl", "precompute"))
LABELS = {("zerotrain", "live"): "zerotrain live ref", ("zerotrain", "precompute"): "zerotrain --precompute-ref",
          ("trl", "live"): "TRL live ref", ("trl", "precompute"): "TRL precompute_ref_log_probs"}


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=2, help="pairs a micro-batch (2x rows)")
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--skip", type=int, default=3, help="first optimizer steps left out of tokens/s")
    parser.add_argument("--max-pairs", type=int, default=128,
                        help="the first this many pairs that fit in --seq-len (0: all of them); both sides "
                             "train on these and precompute over all of them")
    parser.add_argument("--lr", type=float, default=5e-6)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--attn-implementation", default="sdpa")
    parser.add_argument("--threads", type=int, default=1, help="OMP threads a rank")


def ds_precision() -> str:
    return "fp32"


def zerotrain_flags(args, model_dir: Path, data: Path, out: Path, precompute: bool) -> list[str]:
    return ["--init-from", str(model_dir), "--tokenizer", str(model_dir), "--data", str(data),
            "--output-dir", str(out), "--seq-len", str(args.seq_len), "--micro-batch-size",
            str(args.micro_batch_size), "--grad-accum", str(args.grad_accum), "--max-steps", str(args.steps),
            "--warmup-steps", str(bench.WARMUP_STEPS), "--lr", str(args.lr), "--precision", ds_precision(),
            "--zero-stage", str(args.zero_stage), "--attn-implementation", args.attn_implementation,
            "--pref-loss", "dpo", "--beta", str(args.beta), "--precompute-ref", str(precompute).lower(),
            "--val-fraction", "0", "--log-interval", str(args.steps), "--eval-interval", str(10 ** 6),
            "--save-interval", str(10 ** 6), "--resume", "never", "--seed", "42",
            "--pack", "false"]  # padded pairs, as TRL's DPOTrainer batches them by default


# --------------------------------------------------------------------------- workers (one rank each)

def _rank() -> int:
    return int(os.environ.get("RANK", 0))


def _write_rank0(out: Path, record: dict) -> None:
    if _rank() == 0:
        (out / "timing.json").write_text(json.dumps(record))


def zerotrain_worker(argv: list[str]) -> int:
    """launcher/dpo.py's main, with Trainer.train_step and the precompute wrapped to stamp time."""
    import engine.objectives.reference
    from engine.objectives.preference import DPO
    from engine.training import main as train
    from engine.training import trainer

    out = Path(os.environ["DPO_BENCH_OUT"])
    write_peak_rss_at_exit(out / f"rss-rank{_rank()}.json")
    stamps: list[tuple[float, float, int]] = []  # (wall, rank-0 CPU, tokens so far over every rank) a step
    timing = {"precompute_s": None}
    train_step, precompute = trainer.Trainer.train_step, engine.objectives.reference.precompute

    def stamped_step(self):
        if not stamps:
            stamps.append((time.perf_counter(), time.process_time(), self.state.tokens_seen))
        result = train_step(self)
        stamps.append((time.perf_counter(), time.process_time(), self.state.tokens_seen))
        return result

    def timed_precompute(*a, **k):
        start = time.perf_counter()
        precompute(*a, **k)
        timing["precompute_s"] = time.perf_counter() - start

    trainer.Trainer.train_step = stamped_step
    engine.objectives.reference.precompute = timed_precompute  # Preference.build imports it at call time
    rc = train.main(argv, DPO)
    _write_rank0(out, {"stamps": stamps, **timing})
    return rc


def trl_worker(args) -> None:
    import torch
    from datasets import load_dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        TrainerCallback,
        set_seed,
    )
    from trl import DPOConfig, DPOTrainer

    from engine.config.deepspeed import fill_ds_config, load_ds_config
    from engine.objectives.preference import DPO
    from engine.stages import config_for

    out = Path(args.out)
    write_peak_rss_at_exit(out / f"rss-rank{_rank()}.json")
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    precompute = args.mode == "precompute"
    cfg = config_for(DPO, zerotrain_flags(args, Path(args.model), Path(args.pairs), out, precompute))
    raw, source = load_ds_config(cfg)
    ds = fill_ds_config(raw, cfg, world_size=world_size, precision=ds_precision(), device_type="cpu", source=source)
    order = json.loads(Path(args.order).read_text())
    timing = {"precompute_s": None}

    class Clock(TrainerCallback):
        def __init__(self):
            self.trainer, self.stamps = None, []

        def _stamp(self):
            self.stamps.append((time.perf_counter(), time.process_time(), int(self.trainer._total_train_tokens)))

        def on_train_begin(self, *_, **__):
            self._stamp()

        def on_step_end(self, *_, **__):
            self._stamp()

    class ZerotrainOrder(torch.utils.data.Sampler):
        """zerotrain's ShardedSampler stream (epoch 0's seeded permutation): accelerate hands
        micro-batch k to rank k % world, as zerotrain's ranks take consecutive blocks."""

        def __len__(self):
            return len(order)

        def __iter__(self):
            return iter(order)

    class Trainer(DPOTrainer):
        def _get_train_sampler(self, train_dataset=None):
            return ZerotrainOrder()

        def _precompute_ref_logps(self, *a, **k):
            start = time.perf_counter()
            result = super()._precompute_ref_logps(*a, **k)
            timing["precompute_s"] = (timing["precompute_s"] or 0.0) + time.perf_counter() - start
            return result

    set_seed(42)
    o, t = cfg.optim, cfg.train
    config = DPOConfig(
        output_dir=str(out), deepspeed=ds, use_cpu=True, bf16=False, fp16=False,
        per_device_train_batch_size=t.micro_batch_size, gradient_accumulation_steps=t.grad_accum,
        max_steps=t.max_steps, learning_rate=o.lr, warmup_steps=o.warmup_steps,
        lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": o.min_lr_ratio},
        weight_decay=o.weight_decay, adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_epsilon=o.adam_eps,
        max_grad_norm=o.grad_clip, logging_steps=t.max_steps, save_strategy="no", eval_strategy="no", report_to=[],
        dataloader_num_workers=0, seed=t.seed, data_seed=t.seed, beta=args.beta, loss_type=["sigmoid"],
        max_length=args.seq_len, truncation_mode="keep_start", precompute_ref_log_probs=precompute,
        precompute_ref_batch_size=t.micro_batch_size)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32,
                                                 attn_implementation=args.attn_implementation)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    # From the file, as a user loads it: TRL's precompute caches into the dataset's cache directory
    # (HF_DATASETS_CACHE, set per run), which every rank must see (an in-memory dataset's is per process)
    pairs = load_dataset("json", data_files=str(args.pairs), split="train")
    clock = Clock()
    trainer = Trainer(model=model, args=config, train_dataset=pairs, processing_class=tokenizer, callbacks=[clock])
    clock.trainer = trainer
    trainer.train()
    _write_rank0(out, {"stamps": clock.stamps, **timing})


# --------------------------------------------------------------------------- setup and checks

def make_inputs(args, tmp: Path) -> None:
    """Tokenizer, model dir, the pairs that fit (JSONL), zerotrain's prepared copy, the sample order."""
    import numpy as np
    import torch

    from engine.data.pairs import encode_pair, read_pairs
    from engine.data.prepare import prepare
    from engine.data.text import read_documents
    from model.build import build_model
    from model.tokenizer import load_tokenizer, train_tokenizer

    samples = ROOT / "data" / "samples"
    texts = [str(samples / "tinyshakespeare.txt"), str(samples / "tang_poems_5k.jsonl")]
    train_tokenizer((d for p in texts for d in read_documents(p)), 6400, str(tmp / "tok"), show_progress=False)
    tokenizer = load_tokenizer(str(tmp / "tok"))
    torch.manual_seed(0)
    model = build_model(args.preset, vocab_size=len(tokenizer), attn_implementation=args.attn_implementation)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.config, name, getattr(tokenizer, name))
    args.model = tmp / "model"
    model.save_pretrained(args.model)
    tokenizer.save_pretrained(args.model)
    args.params = sum(p.numel() for p in model.parameters())

    source = samples / "pref_pairs.jsonl"
    lines = source.read_text(encoding="utf-8").splitlines()
    kept, lengths = [], []
    for (where, pair), line in zip(read_pairs(source), lines, strict=True):
        (chosen, _), (rejected, _), truncated = encode_pair(pair, tokenizer, args.seq_len, where)
        if not truncated and pair.chosen != pair.rejected and len(kept) < (args.max_pairs or len(lines)):
            kept.append(line)
            lengths.append((len(chosen), len(rejected)))
    args.pairs = tmp / "pairs.jsonl"
    args.pairs.write_text("\n".join(kept) + "\n", encoding="utf-8")
    args.pair_count, args.pair_total, args.lengths = len(kept), len(lines), lengths
    args.data = tmp / "prepared"
    prepare("pref", [str(args.pairs)], load_tokenizer(str(args.model)), args.data, seq_len=args.seq_len,
            val_fraction=0.0, show_progress=False)
    # zerotrain's ShardedSampler stream: epoch 0's permutation of the training pairs
    order = np.random.default_rng([42, 0]).permutation(len(kept))
    needed = args.steps * args.grad_accum * args.micro_batch_size * max(args.world_sizes)
    if needed > len(order):
        raise SystemExit(f"{needed} pairs needed, {len(order)} in one epoch: fewer steps")
    args.order = tmp / "order.json"
    args.order.write_text(json.dumps([int(i) for i in order]))


def check_tokenization(args) -> None:
    """TRL's tokenization of the pairs (its own _prepare_dataset) gives each chosen and rejected
    sequence zerotrain's token count, and zerotrain's prepared pairs are the file's, in order."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from engine.data.pairs import PrefDataset

    prepared = PrefDataset(args.data, "train", args.seq_len)
    ours = [(len(prepared[i]["chosen_input_ids"]), len(prepared[i]["rejected_input_ids"]))
            for i in range(len(prepared))]
    if ours != args.lengths:
        raise SystemExit("zerotrain's prepared pairs are not the encoded file's, in order")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    pairs = Dataset.from_list([json.loads(line) for line in Path(args.pairs).read_text().splitlines()])
    config = DPOConfig(output_dir=str(args.data / "trl-check"), max_length=args.seq_len, use_cpu=True, bf16=False,
                       report_to=[])
    tokenized = DPOTrainer._prepare_dataset(DPOTrainer.__new__(DPOTrainer), pairs, tokenizer, config, "train")
    theirs = [(min(len(p) + len(c), args.seq_len), min(len(p) + len(r), args.seq_len))
              for p, c, r in zip(tokenized["prompt_ids"], tokenized["chosen_ids"], tokenized["rejected_ids"])]
    if theirs != ours:
        bad = [(i, a, b) for i, (a, b) in enumerate(zip(ours, theirs)) if a != b]
        raise SystemExit(f"TRL tokenizes {len(bad)} pairs to other lengths than zerotrain (pair, ours, TRL): "
                         f"{bad[:5]}; {len(theirs)} pairs from TRL, {len(ours)} from zerotrain")
    args.tokens_per_pair = statistics.mean(a + b for a, b in ours)
    print(f"tokenization check: TRL and zerotrain give the same lengths for all {len(ours)} pairs "
          f"(mean {args.tokens_per_pair:.1f} tokens a pair, chosen + rejected)", flush=True)


# --------------------------------------------------------------------------- running

def run_config(args, side: str, mode: str, world_size: int, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    shutil.rmtree(args.data / "reference", ignore_errors=True)  # zerotrain's precompute cache: compute afresh
    os.environ["DPO_BENCH_OUT"] = str(out)
    os.environ["HF_DATASETS_CACHE"] = str(out / "hf-datasets")  # nor a TRL cache from an earlier run
    script = str(Path(__file__).resolve())
    if side == "zerotrain":
        cmd = [script, "--zerotrain-worker"] + zerotrain_flags(args, args.model, args.data, out / "run",
                                                                 mode == "precompute")
    else:
        cmd = [script, "--trl-worker", "--mode", mode, "--out", str(out), "--model", str(args.model), "--pairs",
               str(args.pairs), "--order", str(args.order), "--preset", args.preset, "--zero-stage",
               str(args.zero_stage), "--seq-len", str(args.seq_len), "--micro-batch-size", str(args.micro_batch_size),
               "--grad-accum", str(args.grad_accum), "--steps", str(args.steps), "--lr", str(args.lr), "--beta",
               str(args.beta), "--attn-implementation", args.attn_implementation]
    start = time.perf_counter()
    bench.run(bench.launch(cmd, world_size), args.threads, f"{side} {mode} on {world_size} rank(s)")
    total = time.perf_counter() - start
    timing = json.loads((out / "timing.json").read_text())
    stamps = timing["stamps"]
    if len(stamps) != args.steps + 1:
        raise SystemExit(f"{side} {mode}: {len(stamps) - 1} steps stamped, {args.steps} expected")
    (t0, c0, k0), (t1, c1, k1) = stamps[args.skip], stamps[-1]
    rss, ranks = summed_peak_rss(out)
    if ranks != world_size:
        raise SystemExit(f"{side} {mode}: peak RSS from {ranks} of {world_size} ranks")
    result = {"tokens_per_s": (k1 - k0) / (t1 - t0), "tokens_per_cpu_s": (k1 - k0) / world_size / (c1 - c0),
              "peak_rss_mb": rss / 2 ** 20, "precompute_s": timing["precompute_s"], "wall_s": total,
              "tokens": [s[2] for s in stamps], "step_s": [b[0] - a[0] for a, b in zip(stamps, stamps[1:])]}
    shutil.rmtree(out, ignore_errors=True)
    return result


def spread(values: list[float]) -> str:
    return f"{min(values):,.0f}-{max(values):,.0f}"


def main() -> None:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(parser)
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round of 6 steps (2 left out)")
    parser.add_argument("--json", help="also write every run's figures here")
    parser.add_argument("--trl-worker", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--mode", "--out", "--model", "--pairs", "--order"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    if sys.argv[1:2] == ["--zerotrain-worker"]:
        sys.exit(zerotrain_worker(sys.argv[2:]))
    args = parser.parse_args()
    if args.trl_worker:
        return trl_worker(args)
    if args.quick:
        args.rounds, args.steps, args.skip = 1, 6, 2
    if not 0 <= args.skip < args.steps:
        raise SystemExit("--skip must be below --steps")

    runs: dict = {(n, c): [] for n in args.world_sizes for c in CONFIGS}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_inputs(args, tmp)
        check_tokenization(args)
        print(f"{args.preset} ({args.params / 1e6:.1f}M parameters), {args.pair_count} of {args.pair_total} pairs "
              f"(the first that fit in {args.seq_len} tokens)", flush=True)
        for round_ in range(args.rounds):
            for n in args.world_sizes:
                shift = (round_ + args.world_sizes.index(n)) % len(CONFIGS)
                for config in CONFIGS[shift:] + CONFIGS[:shift]:
                    r = run_config(args, *config, n, tmp / "run")
                    runs[n, config].append(r)
                    pre = f", precompute {r['precompute_s']:.1f} s" if r["precompute_s"] is not None else ""
                    print(f"  round {round_} n={n} {LABELS[config]:30s} {r['tokens_per_s']:8,.0f} tokens/s "
                          f"{r['tokens_per_cpu_s']:8,.0f} tokens/CPU-s a rank, peak RSS {r['peak_rss_mb']:6,.0f} MB"
                          f"{pre} (run {r['wall_s']:.0f} s)", flush=True)
    # the two sides took the same batches: the same tokens at every step
    for n in args.world_sizes:
        for mode in ("live", "precompute"):
            a, b = runs[n, ("zerotrain", mode)][0]["tokens"], runs[n, ("trl", mode)][0]["tokens"]
            if [y - x for x, y in zip(a, a[1:])] != [y - x for x, y in zip(b, b[1:])]:
                print(f"WARNING: n={n} {mode}: the sides' per-step tokens differ: {a} vs {b}")
    print_table(args, runs, time.perf_counter() - started)
    if args.json:
        Path(args.json).write_text(json.dumps({f"{n} {s} {m}": v for (n, (s, m)), v in runs.items()}, indent=1))


def print_table(args, runs: dict, elapsed: float) -> None:
    med = statistics.median
    print(f"\n{args.preset}, ZeRO-{args.zero_stage}, fp32, CPU, seq-len {args.seq_len}, micro batch "
          f"{args.micro_batch_size} pairs, grad accum {args.grad_accum}, {args.steps} steps ({args.skip} left out), "
          f"{args.rounds} round(s), {args.threads} thread(s) a rank; {elapsed / 60:.1f} min")
    print("medians over rounds (min-max); ratio = zerotrain / TRL of the medians\n")
    head = ("| ranks | configuration | tokens/s | spread | ratio | tokens/CPU-s a rank | ratio | peak RSS MB (sum) "
            "| ratio | precompute s |")
    print(head)
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for n in args.world_sizes:
        for mode in ("live", "precompute"):
            for side in ("zerotrain", "trl"):
                rs = runs[n, (side, mode)]
                peer = runs[n, ("trl", mode)]
                tps, cpu, rss = ([r[k] for r in rs] for k in ("tokens_per_s", "tokens_per_cpu_s", "peak_rss_mb"))
                ratio = lambda k: med([r[k] for r in rs]) / med([r[k] for r in peer])  # noqa: E731
                pre = [r["precompute_s"] for r in rs if r["precompute_s"] is not None]
                cells = [str(n), LABELS[side, mode], f"{med(tps):,.0f}", spread(tps), f"{ratio('tokens_per_s'):.2f}x",
                         f"{med(cpu):,.0f}", f"{ratio('tokens_per_cpu_s'):.2f}x", f"{med(rss):,.0f}",
                         f"{ratio('peak_rss_mb'):.2f}x", f"{med(pre):.1f} ({min(pre):.1f}-{max(pre):.1f})" if pre else "-"]
                print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
