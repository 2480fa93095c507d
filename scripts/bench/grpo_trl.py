"""zerotrain's launcher/grpo.py against TRL's GRPOTrainer, same DeepSpeed config: tokens/s and peak RSS.

    python scripts/bench/grpo_trl.py [--world-sizes 1 2] [--rounds 3] [--steps 16] [--quick] [--out FILE]

One step, on both sides and on each rank: take --micro-batch-size / G prompts, sample G
completions of each with the model's generate() (KV cache, no vLLM), score them with the reward
function, take the group-normalised advantages, then one forward + backward over prompt +
completion and an optimizer step (grad accum 1, so TRL's steps_per_generation is 1 and every step
generates afresh: on-policy, as zerotrain always is).

Both sides get
- the same model: the `--preset` (default debug) built by model.build.build_model with seed 0 and
  saved as an HF directory with zerotrain's shipped tokenizer (model/default_tokenizer, its ChatML
  template): zerotrain --init-from, TRL from_pretrained. The model is untrained, so its
  completions are near-uniform samples of the vocabulary and almost never end before
  --max-new-tokens: both sides generate (nearly) the same number of tokens, and the script
  reports how many each did;
- the same prompts: data/samples/arithmetic/prompts.jsonl (TRL's conversational shape with a
  `solution` column); before any run the script checks that TRL's tokenization of every prompt
  (apply_chat_template with the generation prompt) gives zerotrain's token ids;
- the same prompts at each step: TRL gets the dataset in zerotrain's ShardedSampler order (the
  seeded permutation) with shuffle_dataset=False, so its sampler yields each prompt G times in
  turn, which accelerate's batch sharding splits into exactly the prompts zerotrain's ranks take;
- the same reward: `text_length` below (TRL's reward signature), given to TRL as a function and
  to zerotrain as --reward-fn scripts/bench/grpo_trl.py:text_length;
- the same G, max new tokens, temperature (1, no top-k/top-p), stop token (the tokenizer's eos,
  <|im_end|>), loss (--rl-loss grpo / loss_type="grpo", epsilon 0.2, rewards scaled by the
  group's std), beta 0 (no reference model on either side), fp32, micro batch (completions a
  rank), steps, lr schedule, optimizer settings, threads per rank, attention implementation;
- the same DeepSpeed config: ds_configs/zero{stage}.json filled by zerotrain's fill_ds_config,
  handed to TRL as GRPOConfig(deepspeed=<dict>).
2 ranks run under torchrun (gloo) on both sides, 1 rank under plain python.

tokens/s: prompt + completion tokens (non-padding; completions up to and including their stop
token) over every rank, of the timed steps, over their wall time: zerotrain's tokens_seen, TRL's
state.num_input_tokens_seen, which count the same tokens. Generation, rewards, the loss's forward
and backward and the optimizer step are all inside a step. The timed steps are every optimizer
step after the first `--skip` (start-up and warm-up left out): from the end of step `skip` to the
end of the last step, stamped on rank 0 (zerotrain: Trainer.train_step wrapped; TRL: a
TrainerCallback's on_step_end). Also per rank-0 CPU-second (robust to other load on the
machine), and the mean completion length each side generated. Peak RSS: every rank's own
high-water mark (VmHWM, scripts/bench/peak_rss.py) summed over the ranks, over the whole process
(start-up, training and, for zerotrain, the export of final/). Rounds rotate the order of the
runs; figures are medians over rounds with the min-max spread, ratios zerotrain / TRL of the
medians.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
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

PROMPTS = ROOT / "data" / "samples" / "arithmetic" / "prompts.jsonl"
SIDES = ("zerotrain", "trl")
LABELS = {"zerotrain": "zerotrain launcher/grpo.py", "trl": "TRL GRPOTrainer"}


def text_length(prompts, completions, completion_ids=None, **kwargs) -> list[float]:
    """The reward both sides use (TRL's signature): the completion's length in characters / 100.
    Cheap, and it varies within a group even where every completion has --max-new-tokens tokens
    (tokens decode to different numbers of characters), so the advantages and the update are not 0."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [len(t) / 100.0 for t in texts]


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="debug")
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--num-generations", type=int, default=8, help="G, completions a prompt")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=64, help="zerotrain's row length (prompt + completion)")
    parser.add_argument("--micro-batch-size", type=int, default=32,
                        help="completions a rank a step (a multiple of G; TRL's per_device_train_batch_size)")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--skip", type=int, default=3, help="first optimizer steps left out of tokens/s")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--attn-implementation", default="sdpa")
    parser.add_argument("--threads", type=int, default=1, help="OMP threads a rank")


def zerotrain_flags(args, model_dir: Path, out: Path, cache: Path) -> list[str]:
    return ["--init-from", str(model_dir), "--tokenizer", str(model_dir), "--data", str(PROMPTS),
            "--data-cache-dir", str(cache), "--output-dir", str(out), "--seq-len", str(args.seq_len),
            "--micro-batch-size", str(args.micro_batch_size), "--grad-accum", "1", "--max-steps", str(args.steps),
            "--warmup-steps", "0", "--lr", str(args.lr), "--precision", "fp32", "--zero-stage", str(args.zero_stage),
            "--attn-implementation", args.attn_implementation, "--rl-loss", "grpo", "--reward-fn",
            f"{Path(__file__).resolve()}:text_length", "--num-generations", str(args.num_generations),
            "--max-new-tokens", str(args.max_new_tokens), "--temperature", "1.0", "--kl-beta", "0",
            "--val-fraction", "0", "--log-interval", str(args.steps), "--eval-interval", str(10 ** 6),
            "--save-interval", str(10 ** 6), "--resume", "never", "--seed", "42"]


# --------------------------------------------------------------------------- workers (one rank each)

def _rank() -> int:
    return int(os.environ.get("RANK", 0))


def _write_rank0(out: Path, record: dict) -> None:
    if _rank() == 0:
        (out / "timing.json").write_text(json.dumps(record))


def zerotrain_worker(argv: list[str]) -> int:
    """launcher/grpo.py's main, with Trainer.train_step wrapped to stamp time and the rollout
    statistics' reduction wrapped to keep each step's mean completion length."""
    from engine.objectives.grpo import GRPO, GroupRelative
    from engine.training import main as train
    from engine.training import trainer

    out = Path(os.environ["GRPO_BENCH_OUT"])
    write_peak_rss_at_exit(out / f"rss-rank{_rank()}.json")
    stamps: list[tuple[float, float, int]] = []  # (wall, rank-0 CPU, tokens so far over every rank) a step
    lengths: list[float] = []
    train_step, reduce_stats = trainer.Trainer.train_step, GroupRelative.reduce_stats

    def stamped_step(self):
        if not stamps:
            stamps.append((time.perf_counter(), time.process_time(), self.state.tokens_seen))
        result = train_step(self)
        stamps.append((time.perf_counter(), time.process_time(), self.state.tokens_seen))
        return result

    def kept_stats(self, *a, **k):
        metrics = reduce_stats(self, *a, **k)
        lengths.append(metrics["completions/mean_length"])
        return metrics

    trainer.Trainer.train_step = stamped_step
    GroupRelative.reduce_stats = kept_stats
    rc = train.main(argv, GRPO)
    _write_rank0(out, {"stamps": stamps, "lengths": lengths})
    return rc


def trl_worker(args) -> None:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback, set_seed
    from trl import GRPOConfig, GRPOTrainer

    from engine.config.deepspeed import fill_ds_config, load_ds_config
    from engine.objectives.grpo import GRPO
    from engine.stages import config_for

    out = Path(args.out)
    write_peak_rss_at_exit(out / f"rss-rank{_rank()}.json")
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    cfg = config_for(GRPO, zerotrain_flags(args, Path(args.model), out / "run", out / "cache"))
    raw, source = load_ds_config(cfg)
    ds = fill_ds_config(raw, cfg, world_size=world_size, precision="fp32", device_type="cpu", source=source)
    order = json.loads(Path(args.order).read_text())
    g = args.num_generations

    class Clock(TrainerCallback):
        def __init__(self):
            self.stamps, self.lengths = [], []

        def _stamp(self, state):
            self.stamps.append((time.perf_counter(), time.process_time(), int(state.num_input_tokens_seen)))

        def on_train_begin(self, args, state, control, **_):
            self._stamp(state)

        def on_step_end(self, args, state, control, **_):
            self._stamp(state)

        def on_log(self, args, state, control, logs=None, **_):  # logging_steps=1: a record a step
            if logs and "completions/mean_length" in logs:
                self.lengths.append(logs["completions/mean_length"])

    set_seed(42)
    o, t = cfg.optim, cfg.train
    config = GRPOConfig(
        output_dir=str(out / "run"), deepspeed=ds, use_cpu=True, bf16=False, fp16=False,
        per_device_train_batch_size=t.micro_batch_size, gradient_accumulation_steps=1, max_steps=t.max_steps,
        learning_rate=o.lr, warmup_steps=o.warmup_steps, lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": o.min_lr_ratio}, weight_decay=o.weight_decay, adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2, adam_epsilon=o.adam_eps, max_grad_norm=o.grad_clip, logging_steps=1,
        save_strategy="no", eval_strategy="no", report_to=[], dataloader_num_workers=0, seed=t.seed,
        data_seed=t.seed, num_generations=g, max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0,
        top_k=0, beta=0.0, num_iterations=1, loss_type="grpo", epsilon=0.2, scale_rewards="group", use_vllm=False,
        log_completions=False,
        # The dataset comes in zerotrain's ShardedSampler order (epoch 0's seeded permutation) and
        # TRL's sampler keeps it, each prompt G times in a row: accelerate hands batch k
        # (micro-batch-size completions) to rank k % world, as zerotrain's ranks take consecutive
        # blocks of prompts.
        shuffle_dataset=False)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32,
                                                 attn_implementation=args.attn_implementation)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    prompts = load_dataset("json", data_files=str(PROMPTS), split="train").select(order)
    clock = Clock()
    trainer = GRPOTrainer(model=model, reward_funcs=[text_length], args=config, train_dataset=prompts,
                          processing_class=tokenizer, callbacks=[clock])
    trainer.train()
    _write_rank0(out, {"stamps": clock.stamps, "lengths": clock.lengths})


# --------------------------------------------------------------------------- setup and checks

def make_inputs(args, tmp: Path) -> None:
    """The model dir (untrained preset + zerotrain's shipped tokenizer), the prompts' order, and a
    check that TRL tokenizes every prompt as zerotrain does."""
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    from engine.data.prompts import encode_prompt
    from model.build import build_model
    from model.tokenizer import load_tokenizer

    if args.micro_batch_size % args.num_generations:
        raise SystemExit(f"--micro-batch-size {args.micro_batch_size} counts completions: use a multiple of "
                         f"--num-generations {args.num_generations}")
    tokenizer = load_tokenizer(str(ROOT / "model" / "default_tokenizer"))
    torch.manual_seed(0)
    model = build_model(args.preset, vocab_size=len(tokenizer), attn_implementation=args.attn_implementation)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.config, name, getattr(tokenizer, name))
        setattr(model.generation_config, name, getattr(tokenizer, name))
    args.model = tmp / "model"
    model.save_pretrained(args.model)
    tokenizer.save_pretrained(args.model)
    args.params = sum(p.numel() for p in model.parameters())

    records = [json.loads(line) for line in PROMPTS.read_text(encoding="utf-8").splitlines()]
    theirs = AutoTokenizer.from_pretrained(args.model)
    ours = load_tokenizer(str(args.model))
    bad = []
    for i, record in enumerate(records):
        a = encode_prompt(record["prompt"], ours)
        b = list(theirs.apply_chat_template(record["prompt"], add_generation_prompt=True, tokenize=True,
                                            return_dict=True)["input_ids"])
        if a != b:
            bad.append((i, a, b))
    if bad:
        raise SystemExit(f"TRL tokenizes {len(bad)} of {len(records)} prompts otherwise than zerotrain "
                         f"(prompt, zerotrain's ids, TRL's ids): {bad[:3]}")
    lengths = [len(encode_prompt(r["prompt"], ours)) for r in records]
    if max(lengths) + args.max_new_tokens > args.seq_len:
        raise SystemExit(f"prompts of up to {max(lengths)} tokens + --max-new-tokens {args.max_new_tokens} do not "
                         f"fit in --seq-len {args.seq_len}: zerotrain would cut prompts; raise --seq-len")
    args.prompt_tokens = statistics.mean(lengths)
    print(f"tokenization check: TRL and zerotrain give the same ids for all {len(records)} prompts "
          f"(mean {args.prompt_tokens:.1f} tokens)", flush=True)
    # zerotrain's ShardedSampler stream: epoch 0's permutation of the prompts
    order = np.random.default_rng([42, 0]).permutation(len(records))
    needed = args.steps * args.micro_batch_size // args.num_generations * max(args.world_sizes)
    if needed > len(order):
        raise SystemExit(f"{needed} prompts needed, {len(order)} in one epoch: fewer steps or a smaller batch")
    args.order = tmp / "order.json"
    args.order.write_text(json.dumps([int(i) for i in order]))


# --------------------------------------------------------------------------- running

def run_config(args, side: str, world_size: int, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    os.environ["GRPO_BENCH_OUT"] = str(out)
    os.environ["HF_DATASETS_CACHE"] = str(out / "hf-datasets")
    script = str(Path(__file__).resolve())
    if side == "zerotrain":
        cmd = [script, "--zerotrain-worker"] + zerotrain_flags(args, args.model, out / "run", args.cache)
    else:
        cmd = [script, "--trl-worker", "--out", str(out), "--model", str(args.model), "--order", str(args.order),
               "--preset", args.preset, "--zero-stage", str(args.zero_stage), "--num-generations",
               str(args.num_generations), "--max-new-tokens", str(args.max_new_tokens), "--seq-len",
               str(args.seq_len), "--micro-batch-size", str(args.micro_batch_size), "--steps", str(args.steps),
               "--lr", str(args.lr), "--attn-implementation", args.attn_implementation]
    start = time.perf_counter()
    bench.run(bench.launch(cmd, world_size), args.threads, f"{side} on {world_size} rank(s)")
    total = time.perf_counter() - start
    timing = json.loads((out / "timing.json").read_text())
    stamps, lengths = timing["stamps"], timing["lengths"]
    if len(stamps) != args.steps + 1 or len(lengths) != args.steps:
        raise SystemExit(f"{side}: {len(stamps) - 1} steps stamped and {len(lengths)} completion lengths, "
                         f"{args.steps} expected")
    (t0, c0, k0), (t1, c1, k1) = stamps[args.skip], stamps[-1]
    rss, ranks = summed_peak_rss(out)
    if ranks != world_size:
        raise SystemExit(f"{side}: peak RSS from {ranks} of {world_size} ranks")
    timed = lengths[args.skip:]
    result = {"tokens_per_s": (k1 - k0) / (t1 - t0), "tokens_per_cpu_s": (k1 - k0) / world_size / (c1 - c0),
              "step_s": (t1 - t0) / (args.steps - args.skip), "completion_length": statistics.mean(timed),
              "peak_rss_mb": rss / 2 ** 20, "wall_s": total, "tokens": [s[2] for s in stamps],
              "step_times": [b[0] - a[0] for a, b in zip(stamps, stamps[1:])], "lengths": lengths}
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
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round of 4 steps (1 left out)")
    parser.add_argument("--out", help="also write the settings, every run's figures and the table here (JSON)")
    parser.add_argument("--trl-worker", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--model", "--order"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    if sys.argv[1:2] == ["--zerotrain-worker"]:
        sys.exit(zerotrain_worker(sys.argv[2:]))
    command = "python scripts/bench/grpo_trl.py " + shlex.join(sys.argv[1:])
    args = parser.parse_args()
    if args.trl_worker:
        return trl_worker(args)
    if args.quick:
        args.rounds, args.steps, args.skip = 1, 4, 1
    if not 0 <= args.skip < args.steps:
        raise SystemExit("--skip must be below --steps")

    runs: dict = {(n, side): [] for n in args.world_sizes for side in SIDES}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        args.cache = tmp / "cache"  # zerotrain's prepared prompts, shared by its runs
        make_inputs(args, tmp)
        print(f"{args.preset} ({args.params / 1e6:.2f}M parameters), G {args.num_generations}, "
              f"{args.micro_batch_size // args.num_generations} prompts a rank a step", flush=True)
        for round_ in range(args.rounds):
            for n in args.world_sizes:
                shift = (round_ + args.world_sizes.index(n)) % len(SIDES)
                for side in SIDES[shift:] + SIDES[:shift]:
                    r = run_config(args, side, n, tmp / "run")
                    runs[n, side].append(r)
                    print(f"  round {round_} n={n} {LABELS[side]:28s} {r['tokens_per_s']:8,.0f} tokens/s "
                          f"{r['tokens_per_cpu_s']:8,.0f} tokens/CPU-s a rank, {r['step_s']:.2f} s a step, "
                          f"completions {r['completion_length']:.1f} tokens, peak RSS {r['peak_rss_mb']:6,.0f} MB "
                          f"(run {r['wall_s']:.0f} s)", flush=True)
    # the two sides took the same prompts: the same prompt tokens at every step, so per-step
    # tokens differ only by the completions' lengths
    for n in args.world_sizes:
        a, b = runs[n, "zerotrain"][0], runs[n, "trl"][0]
        completions = args.micro_batch_size * n
        prompt_a = [y - x - round(length * completions) for x, y, length in zip(a["tokens"], a["tokens"][1:],
                                                                                 a["lengths"])]
        prompt_b = [y - x - round(length * completions) for x, y, length in zip(b["tokens"], b["tokens"][1:],
                                                                                 b["lengths"])]
        if prompt_a != prompt_b:
            print(f"WARNING: n={n}: the sides' per-step prompt tokens differ: {prompt_a} vs {prompt_b}")
    table = print_table(args, runs, time.perf_counter() - started, command)
    if args.out:
        settings = {k: v for k, v in vars(args).items() if k not in ("model", "order", "cache", "trl_worker")}
        Path(args.out).write_text(json.dumps({"command": command, "settings": settings, "table": table,
                                              "runs": {f"{n} {s}": v for (n, s), v in runs.items()}}, indent=1))


def print_table(args, runs: dict, elapsed: float, command: str) -> list[dict]:
    med = statistics.median
    print(f"\n{args.preset}, ZeRO-{args.zero_stage}, fp32, CPU, G {args.num_generations}, max new tokens "
          f"{args.max_new_tokens}, micro batch {args.micro_batch_size} completions a rank, grad accum 1, "
          f"{args.steps} steps ({args.skip} left out), {args.rounds} round(s), {args.threads} thread(s) a rank; "
          f"{elapsed / 60:.1f} min")
    print(f"command: {command}")
    print("medians over rounds (min-max); ratio = zerotrain / TRL of the medians (peak RSS: > 1 is more memory)\n")
    print("| ranks | side | tokens/s | spread | ratio | tokens/CPU-s a rank | ratio | s a step | completion tokens "
          "| peak RSS MB (sum) | ratio |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    rows = []
    for n in args.world_sizes:
        for side in SIDES:
            rs, peer = runs[n, side], runs[n, "trl"]
            fig = {k: med([r[k] for r in rs]) for k in ("tokens_per_s", "tokens_per_cpu_s", "step_s",
                                                         "completion_length", "peak_rss_mb")}
            ratio = {k: fig[k] / med([r[k] for r in peer]) for k in ("tokens_per_s", "tokens_per_cpu_s",
                                                                     "peak_rss_mb")}
            rows.append({"ranks": n, "side": side, **fig, "ratio": ratio})
            cells = [str(n), LABELS[side], f"{fig['tokens_per_s']:,.0f}", spread([r["tokens_per_s"] for r in rs]),
                     f"{ratio['tokens_per_s']:.2f}x", f"{fig['tokens_per_cpu_s']:,.0f}",
                     f"{ratio['tokens_per_cpu_s']:.2f}x", f"{fig['step_s']:.2f}", f"{fig['completion_length']:.1f}",
                     f"{fig['peak_rss_mb']:,.0f}", f"{ratio['peak_rss_mb']:.2f}x"]
            print("| " + " | ".join(cells) + " |")
    return rows


if __name__ == "__main__":
    main()
