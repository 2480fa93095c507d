"""engine.objectives.rewards: the built-in reward functions, loading one from a file, and the
errors that name a reward function, its step and its input."""

from __future__ import annotations

import math

import pytest

from common.errors import ZerotrainError
from engine.objectives.rewards import (
    accuracy,
    extract_answer,
    format_reward,
    length,
    load_reward,
    same_answer,
    score,
)


@pytest.mark.parametrize("text, answer", [
    ("so 3 + 4 = 7. The answer is 7", "7"),
    ("the total is \\boxed{\\frac{1}{2}} and not 3", "\\frac{1}{2}"),
    ("<think>2 and 2</think><answer> 4 </answer> then 9", "4"),
    ("1,234 apples", "1,234"),
    ("no number here", None),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


@pytest.mark.parametrize("given, truth, same", [
    ("7", "7", True), ("7.0", 7, True), ("1,234", "1234", True), ("0.5", "1/2", True),
    ("8", "7", False), ("x+1", "x+1", True), ("x+1", "x + 1", False),
    ("72", "Natalia sold 48/2 = 24 clips in May.\n#### 72", True),
])
def test_same_answer(given, truth, same):
    assert same_answer(given, truth) is same


def test_accuracy_reads_the_solution_column_and_conversational_completions():
    completions = [[{"role": "assistant", "content": "it is <answer>12</answer>"}],
                   [{"role": "assistant", "content": "it is 13"}],
                   [{"role": "assistant", "content": "no idea"}],
                   [{"role": "assistant", "content": "5"}]]
    assert accuracy(["p"] * 4, completions, [[1]] * 4, solution=["12", "12", "12", ""]) == [1.0, 0.0, 0.0, None]
    with pytest.raises(ZerotrainError, match="column named solution or answer or gt; the prompt data has"):
        accuracy(["p"], ["1"], [[1]], level=["easy"])


def test_format_reward_is_minimind_rule():
    full = "<think>\nadd them\n</think>\n<answer>\n4\n</answer>"
    assert format_reward(None, [full, "<think>x</think> 4", "4", full + "<answer>"], None) == [1.5, 0.5, 0.0, 0.75]


def test_length_costs_one_per_hundred_tokens():
    assert length(None, ["a", "b"], [[1] * 50, [2] * 200]) == [-0.5, -2.0]


def test_a_reward_function_from_a_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text("def contains_level(prompts, completions, completion_ids, level, **kw):\n"
                    "    return [1.0 if l in c else None for c, l in zip(completions, level)]\n"
                    "def broken(prompts, completions, completion_ids, **kw):\n"
                    "    return [1 / 0 for c in completions]\n"
                    "def short(prompts, completions, completion_ids, **kw):\n"
                    "    return [1.0]\n"
                    "def text(prompts, completions, completion_ids, **kw):\n"
                    "    return ['good' for c in completions]\n")
    fn = load_reward(f"{path}:contains_level")
    scores = score([fn, load_reward("length")], ["p1", "p2"], ["easy one", "hard"], [[1, 2], [3]],
                   {"level": ["easy", "easy"]}, step=3)
    assert scores[0, 0] == 1.0 and math.isnan(scores[1, 0])
    assert scores[:, 1].tolist() == [-0.02, -0.01]
    with pytest.raises(ZerotrainError, match=r"reward function broken at step 7 raised ZeroDivisionError: division by "
                                             r"zero \(its first input: prompt 'p1', completion 'easy one'\)"):
        score([load_reward(f"{path}:broken")], ["p1", "p2"], ["easy one", "hard"], [[1], [2]], {}, step=7)
    with pytest.raises(ZerotrainError, match="short at step 1 returned 1 values for 2 completions"):
        score([load_reward(f"{path}:short")], ["p1", "p2"], ["a", "b"], [[1], [2]], {}, step=1)
    with pytest.raises(ZerotrainError, match="text at step 1 returned 'good' for completion 0"):
        score([load_reward(f"{path}:text")], ["p1"], ["a"], [[1]], {}, step=1)
    with pytest.raises(ZerotrainError, match=r"has no function nope \(it has broken, contains_level, short, text\)"):
        load_reward(f"{path}:nope")
    with pytest.raises(ZerotrainError, match="does not exist"):
        load_reward(f"{tmp_path}/missing.py:f")
    with pytest.raises(ZerotrainError, match="use a built-in \\(accuracy, format, length\\) or PATH.py:NAME"):
        load_reward("accuracyy")
