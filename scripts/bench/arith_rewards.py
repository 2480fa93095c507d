"""A user's own reward function for the arithmetic prompts, with TRL's signature, as
`--reward-fn scripts/bench/arith_rewards.py:closeness` loads it (grpo_evidence.py --reward-fn).
It imports nothing from zerotrain: what a user would write."""

import re

_ANSWER = re.compile(r"<answer>\s*(-?\d+)\s*</answer>")


def closeness(prompts, completions, completion_ids, solution, **columns):
    """1 for the right sum inside <answer></answer>, less the further off it is (0.1 a unit, down
    to 0); 0 without an answer in that format; None for a prompt without a solution."""
    out = []
    for completion, truth in zip(completions, solution):
        if not truth:
            out.append(None)
            continue
        text = completion[-1]["content"] if isinstance(completion, list) else completion
        found = _ANSWER.search(text)
        out.append(max(0.0, 1.0 - 0.1 * abs(int(found.group(1)) - int(truth))) if found else 0.0)
    return out
