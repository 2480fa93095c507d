"""Build data/samples/pref_pairs.jsonl, the demo's preference set, from the other shipped samples.

    python scripts/make_pref_samples.py [--out data/samples/pref_pairs.jsonl]

No preference data can be downloaded here, so the pairs are made the way many synthetic
preference sets are: the chosen response is the real answer to the prompt, the rejected one is
a real answer to a different prompt (fluent, but off-topic). Deterministic (seed 0):

- sharegpt_identity_500.json (English, multi-turn): the conversation up to its last assistant
  turn is the prompt; rejected = the last reply of a conversation whose last question differs.
- alpaca_seed_tasks.jsonl (English): instruction (+ input) -> output; rejected = another task's output.
- tang_poems_5k.jsonl (Chinese): "续写这首诗" + the title and first line -> the rest of the poem;
  rejected = the rest of another poem. The first 200 poems.

Written in MiniMind's dpo.jsonl shape: {"chosen": [messages], "rejected": [messages]}, the two
sharing their prompt turns.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SAMPLES = Path(__file__).resolve().parent.parent / "data" / "samples"
ROLES = {"human": "user", "gpt": "assistant"}


def _pair(prompt: list[dict[str, str]], chosen: str, rejected: str) -> dict:
    return {"chosen": prompt + [{"role": "assistant", "content": chosen}],
            "rejected": prompt + [{"role": "assistant", "content": rejected}]}


def _mismatched(rng: random.Random, answers: list[str], index: int, keys: list[str]) -> str:
    """An answer of another item whose key (question) differs from item `index`'s."""
    while True:
        j = rng.randrange(len(answers))
        if keys[j] != keys[index] and answers[j] != answers[index]:
            return answers[j]


def identity_pairs(rng: random.Random) -> list[dict]:
    chats = json.loads((SAMPLES / "sharegpt_identity_500.json").read_text())
    turns = [[{"role": ROLES[t["from"]], "content": t["value"]} for t in c["conversations"]] for c in chats]
    turns = [t[: max(i for i, m in enumerate(t) if m["role"] == "assistant") + 1] for t in turns]
    answers = [t[-1]["content"] for t in turns]
    questions = [t[-2]["content"] for t in turns]
    return [_pair(t[:-1], answers[i], _mismatched(rng, answers, i, questions)) for i, t in enumerate(turns)]


def alpaca_pairs(rng: random.Random) -> list[dict]:
    tasks = [json.loads(line) for line in (SAMPLES / "alpaca_seed_tasks.jsonl").read_text().splitlines()]
    prompts, answers = [], []
    for task in tasks:
        instance = task["instances"][0]
        prompts.append(task["instruction"] + (f"\n\n{instance['input']}" if instance["input"] else ""))
        answers.append(instance["output"])
    return [_pair([{"role": "user", "content": p}], answers[i], _mismatched(rng, answers, i, prompts))
            for i, p in enumerate(prompts)]


def poem_pairs(rng: random.Random, count: int = 200) -> list[dict]:
    poems = []
    for line in (SAMPLES / "tang_poems_5k.jsonl").read_text(encoding="utf-8").splitlines():
        title, _author, *lines = json.loads(line)["text"].split("\n")
        if len(lines) >= 2:
            poems.append((f"续写这首诗：《{title}》\n{lines[0]}", "\n".join(lines[1:])))
        if len(poems) == count:
            break
    prompts, answers = [p for p, _ in poems], [a for _, a in poems]
    return [_pair([{"role": "user", "content": p}], answers[i], _mismatched(rng, answers, i, prompts))
            for i, p in enumerate(prompts)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(SAMPLES / "pref_pairs.jsonl"))
    args = parser.parse_args()
    rng = random.Random(0)
    pairs = identity_pairs(rng) + alpaca_pairs(rng) + poem_pairs(rng)
    random.Random(1).shuffle(pairs)
    with open(args.out, "w", encoding="utf-8") as f:
        for pair in pairs:
            f.write(json.dumps(pair, ensure_ascii=False) + "\n")
    print(f"{len(pairs)} pairs -> {args.out}")


if __name__ == "__main__":
    main()
