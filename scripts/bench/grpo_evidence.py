"""Does GRPO raise accuracy? A `debug` model taught the answer format by SFT on synthetic additions,
then trained with GRPO and the built-in `accuracy` reward, measured on additions neither stage saw.

    python scripts/bench/grpo_evidence.py [--workdir runs/grpo-evidence] [--ranks 1] [--quick]
    python scripts/bench/grpo_evidence.py --ranks 2 --zero-stage 3 --micro-batch-size 32 \
        --reward-fn scripts/bench/arith_rewards.py:closeness      # a user's own reward, 2 ZeRO-3 ranks

1. Data: scripts/make_arithmetic.py (a + b for a, b < --limit; a --held-out share of the pairs
   kept apart): SFT conversations "What is a + b?" -> "<answer>a+b</answer>", the same training
   pairs as GRPO prompts with their solution, and the held-out pairs.
2. SFT: launcher/sft.py --preset debug from scratch (zerotrain's shipped tokenizer) for
   --sft-steps, so the model writes the format and some right answers.
3. GRPO: launcher/grpo.py --init-from the SFT run, --reward-fn accuracy (or --reward-fn's),
   --num-generations G, for --grpo-steps on the training prompts, on --ranks at --zero-stage.
4. Held-out accuracy of the SFT model and the GRPO model, by this script: greedy completions of
   every held-out prompt, and 8 completions of each sampled at temperature 1 (the distribution
   GRPO trains), scored by the same `accuracy` function (and the share that has the <answer>
   format at all). Also the training reward (sampled) over the first and last fifth of the steps.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import hf_trainer as bench  # noqa: E402  (launch, run: torchrun / plain python with the same environment)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/grpo-evidence")
    p.add_argument("--limit", type=int, default=20, help="operands are 0 .. limit - 1")
    p.add_argument("--held-out", type=float, default=0.2)
    p.add_argument("--sft-steps", type=int, default=300)
    p.add_argument("--sft-lr", type=float, default=3e-3)
    p.add_argument("--grpo-steps", type=int, default=100)
    p.add_argument("--grpo-lr", type=float, default=1e-4)
    p.add_argument("--num-generations", type=int, default=8)
    p.add_argument("--micro-batch-size", type=int, default=64, help="completions a micro-batch (a multiple of G)")
    p.add_argument("--rl-loss", default="grpo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ranks", type=int, default=1)
    p.add_argument("--zero-stage", type=int, default=0, help="of the GRPO run (SFT runs at ZeRO-0)")
    p.add_argument("--reward-fn", default="accuracy",
                   help="GRPO's reward: a built-in name or PATH.py:NAME (e.g. "
                        "scripts/bench/arith_rewards.py:closeness); held-out accuracy is `accuracy`'s whatever it is")
    p.add_argument("--threads", type=int, default=2, help="OpenMP threads a rank")
    p.add_argument("--quick", action="store_true", help="a smoke run: few steps")
    args = p.parse_args(argv)
    if args.quick:
        args.sft_steps, args.grpo_steps = 60, 6
    return args


def held_out_accuracy(model_dir: Path, records: list[dict], batch: int = 64, samples: int = 0,
                      seed: int = 0) -> dict[str, float]:
    """Greedy completions of the held-out prompts (or, with `samples`, that many sampled at
    temperature 1 each, as GRPO samples), scored by the `accuracy` reward."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.data.prompts import encode_prompt
    from engine.objectives.rewards import accuracy

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    end = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    right = formatted = 0
    if samples:
        records = [r for r in records for _ in range(samples)]
        torch.manual_seed(seed)
    for start in range(0, len(records), batch):
        part = records[start:start + batch]
        ids = [encode_prompt(r["prompt"], tokenizer) for r in part]
        width = max(map(len, ids))
        input_ids = torch.full((len(ids), width), tokenizer.pad_token_id)
        mask = torch.zeros_like(input_ids)
        for i, row in enumerate(ids):
            input_ids[i, width - len(row):], mask[i, width - len(row):] = torch.tensor(row), 1
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=bool(samples), top_k=0,
                                 temperature=1.0, max_new_tokens=16,
                                 eos_token_id=end, pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        scores = accuracy(None, texts, None, solution=[r["solution"] for r in part])
        right += sum(s == 1.0 for s in scores)
        formatted += sum("<answer>" in t and "</answer>" in t for t in texts)
    return {"accuracy": right / len(records), "formatted": formatted / len(records), "prompts": len(records)}


def main(argv: list[str] | None = None) -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    from make_arithmetic import build

    args = parse_args(argv)
    work = Path(args.workdir)
    if work.exists():
        shutil.rmtree(work)
    data = work / "data"
    sizes = build(data, args.limit, args.held_out, args.seed)
    started = time.perf_counter()
    sft = work / "sft"
    bench.run(bench.launch([str(ROOT / "launcher" / "sft.py"), "--preset", "debug", "--data", str(data / "sft.jsonl"),
                            "--output-dir", str(sft), "--seq-len", "48", "--micro-batch-size", "32",
                            "--max-steps", str(args.sft_steps), "--lr", str(args.sft_lr), "--warmup-steps", "20",
                            "--precision", "fp32", "--zero-stage", "0", "--eval-interval", "0", "--log-interval", "20",
                            "--save-interval", str(10 ** 6), "--val-fraction", "0", "--seed", str(args.seed),
                            "--data-cache-dir", str(work / "cache")], args.ranks), args.threads, "SFT")
    sft_seconds = time.perf_counter() - started
    grpo = work / "grpo"
    started = time.perf_counter()
    bench.run(bench.launch([str(ROOT / "launcher" / "grpo.py"), "--init-from", str(sft), "--data",
                            str(data / "prompts.jsonl"), "--output-dir", str(grpo), "--reward-fn", args.reward_fn,
                            "--rl-loss", args.rl_loss, "--num-generations", str(args.num_generations),
                            "--micro-batch-size", str(args.micro_batch_size), "--max-new-tokens", "16",
                            "--seq-len", "48", "--max-steps", str(args.grpo_steps), "--lr", str(args.grpo_lr),
                            "--warmup-steps", "0", "--precision", "fp32", "--zero-stage", str(args.zero_stage),
                            "--log-interval", "1", "--save-interval", str(10 ** 6), "--val-fraction", "0",
                            "--seed", str(args.seed), "--data-cache-dir", str(work / "cache")], args.ranks),
              args.threads, "GRPO")
    grpo_seconds = time.perf_counter() - started
    held = [json.loads(line) for line in (data / "held_out.jsonl").read_text().splitlines()]
    measured = {name: {"greedy": held_out_accuracy(run / "final", held),
                       "sampled": held_out_accuracy(run / "final", held, samples=8, seed=args.seed)}
                for name, run in (("sft", sft), ("grpo", grpo))}
    rewards = [json.loads(line)["reward"] for line in (grpo / "metrics.jsonl").read_text().splitlines()]
    window = max(1, len(rewards) // 5)
    result = {"settings": {k: v for k, v in vars(args).items() if k != "workdir"}, "pairs": sizes,
              "held_out": measured,
              "training_reward": {"first_steps_mean": sum(rewards[:window]) / window,
                                  "last_steps_mean": sum(rewards[-window:]) / window, "window": window},
              "seconds": {"sft": round(sft_seconds, 1), "grpo": round(grpo_seconds, 1)}}
    (work / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
