"""Build a synthetic arithmetic set for RL tests and evidence: additions a + b (0 <= a, b < --limit)
as SFT conversations that show the answer format, and as GRPO prompts with their solution.

    python scripts/make_arithmetic.py --out DIR [--limit 20] [--held-out 0.2] [--seed 0]

No dataset can be downloaded here, and the question "did RL raise accuracy" needs answers that a
program can check, so the set is made: every pair (a, b) once, shuffled with --seed; a --held-out
share of the pairs is kept apart (never in SFT or GRPO training). Writes, in DIR:

    sft.jsonl             {"messages": [user "What is a + b?", assistant "<answer>a+b</answer>"]}, training pairs
    prompts.jsonl         {"prompt": [user "What is a + b?"], "solution": "a+b"}, training pairs (TRL's shape)
    held_out.jsonl        the same shape, the held-out pairs
    reasoning.jsonl       the first 32 training pairs as a reasoning model's SFT data: the assistant
                          turn's "reasoning_content" works the sum out column by column
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

REASONING_EXAMPLES = 32


def question(a: int, b: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"What is {a} + {b}?"}]


def working(a: int, b: int) -> str:
    """a + b added column by column, in words: what a reasoning model thinks before it answers."""
    ones = a % 10 + b % 10
    steps = [f"Ones: {a % 10} + {b % 10} = {ones}" + (f", write {ones % 10} and carry 1." if ones >= 10 else ".")]
    if max(a, b) >= 10 or ones >= 10:
        carried = " + 1 carried" if ones >= 10 else ""
        steps.append(f"Tens: {a // 10} + {b // 10}{carried} = {a // 10 + b // 10 + ones // 10}.")
    return "\n".join(steps + [f"So {a} + {b} = {a + b}."])


def build(out: Path, limit: int = 20, held_out: float = 0.2, seed: int = 0) -> dict[str, int]:
    pairs = [(a, b) for a in range(limit) for b in range(limit)]
    random.Random(seed).shuffle(pairs)
    cut = int(len(pairs) * held_out)
    held, train = pairs[:cut], pairs[cut:]
    out.mkdir(parents=True, exist_ok=True)

    def write(name: str, records) -> None:
        with open(out / name, "w") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")

    write("sft.jsonl", ({"messages": question(a, b) + [{"role": "assistant", "content": f"<answer>{a + b}</answer>"}]}
                        for a, b in train))
    write("prompts.jsonl", ({"prompt": question(a, b), "solution": str(a + b)} for a, b in train))
    write("held_out.jsonl", ({"prompt": question(a, b), "solution": str(a + b)} for a, b in held))
    write("reasoning.jsonl", ({"messages": question(a, b) + [{"role": "assistant", "reasoning_content": working(a, b),
                                                              "content": f"<answer>{a + b}</answer>"}]}
                              for a, b in train[:REASONING_EXAMPLES]))
    return {"train": len(train), "held_out": len(held)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--limit", type=int, default=20, help="operands are 0 .. limit - 1")
    p.add_argument("--held-out", type=float, default=0.2, help="share of the pairs kept apart")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    print(build(Path(args.out), args.limit, args.held_out, args.seed))


if __name__ == "__main__":
    main()
