"""Reward functions for RL: the built-in ones, functions loaded from a user's file, and scoring a
batch of completions with all of them.

A reward function has TRL's signature,

    f(prompts, completions, completion_ids, **columns) -> list[float | None]

with one entry per completion: the prompts (a string, or {role, content} messages for a
conversational prompt) repeated for each of a prompt's completions, the completions (the text,
or [{"role": "assistant", "content": text}] for a conversational prompt), their token ids, and
every other column of the prompt data by name, as lists aligned with the completions. None means
"this function does not score that completion" (a math checker given a coding task, say).

--reward-fn NAME picks a built-in (REWARDS); --reward-fn PATH.py:NAME loads NAME from a file;
--reward-model DIR scores with a trained reward model (ModelReward).
"""

from __future__ import annotations

import importlib.util
import math
import numbers
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from common.errors import ZerotrainError

RewardFn = Callable[..., list]
ANSWER_COLUMNS = ("solution", "answer", "gt")
"""The columns `accuracy` reads the right answer from, the first present."""

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def completion_text(completion: Any) -> str:
    """The text of a completion: itself, or the content of its last message."""
    if isinstance(completion, list):
        return str(completion[-1].get("content", "")) if completion else ""
    return str(completion)


def _boxed(text: str) -> str | None:
    """The content of the last \\boxed{...}, braces balanced."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None


def extract_answer(text: str) -> str | None:
    """A completion's final answer: the last \\boxed{}, else the last <answer>...</answer>, else
    the last number; None if it gives none."""
    boxed = _boxed(text)
    if boxed is not None:
        return boxed.strip()
    answers = re.findall(r"<answer>(.*?)</answer>", text, flags=re.S)
    if answers:
        return answers[-1].strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _number(text: str) -> float | None:
    text = text.strip().replace(",", "").rstrip(".")
    try:
        if "/" in text:
            top, bottom = text.split("/")
            return float(top) / float(bottom)
        return float(text)
    except (ValueError, ZeroDivisionError):
        return None


def same_answer(given: str, truth: Any) -> bool:
    """Equal as numbers when both are (1e-6 relative), else as stripped strings. A ground truth
    with working (GSM8K's '... #### 42') is compared by its last number."""
    truth = str(truth)
    if "####" in truth:
        truth = truth.rsplit("####", 1)[1]
    a, b = _number(given), _number(truth)
    if b is None:
        numbers = _NUMBER.findall(truth)
        b = _number(numbers[-1]) if len(numbers) == 1 and len(truth.strip()) == len(numbers[0]) else None
    if a is not None and b is not None:
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
    return given.strip() == truth.strip()


def accuracy(prompts, completions, completion_ids, **columns) -> list[float | None]:
    """1.0 where the completion's final answer (extract_answer) equals the prompt's right answer
    (its `solution`, `answer` or `gt` column), else 0.0; None where that column is empty."""
    name = next((c for c in ANSWER_COLUMNS if c in columns), None)
    if name is None:
        raise ZerotrainError(f"the accuracy reward reads the right answer from a column named "
                             f"{' or '.join(ANSWER_COLUMNS)}; the prompt data has {sorted(columns) or 'no columns'}")
    out: list[float | None] = []
    for completion, truth in zip(completions, columns[name]):
        if truth is None or str(truth).strip() == "":
            out.append(None)
            continue
        given = extract_answer(completion_text(completion))
        out.append(float(given is not None and same_answer(given, truth)))
    return out


_THINK_ANSWER = re.compile(r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$", flags=re.S)


def format_reward(prompts, completions, completion_ids, **columns) -> list[float]:
    """MiniMind's reasoning-format rule: 0.5 when the whole completion is <think>...</think>
    then <answer>...</answer>, plus 0.25 for each of the four tags that appears exactly once
    (so partial credit on the way there; at most 1.5)."""
    out = []
    for completion in completions:
        text = completion_text(completion)
        score = 0.5 if _THINK_ANSWER.match(text) else 0.0
        score += 0.25 * sum(text.count(tag) == 1 for tag in ("<think>", "</think>", "<answer>", "</answer>"))
        out.append(score)
    return out


def length(prompts, completions, completion_ids, **columns) -> list[float]:
    """Brevity: -(completion tokens) / 100, so each 100 tokens cost 1 (weigh it with
    --reward-weights against the rewards it should not override)."""
    return [-len(ids) / 100.0 for ids in completion_ids]


REWARDS: dict[str, RewardFn] = {"accuracy": accuracy, "format": format_reward, "length": length}


@dataclass(frozen=True)
class Reward:
    """A reward function and the name its metrics and the rollout log use."""

    name: str
    fn: RewardFn


def load_reward(spec: str) -> Reward:
    """A built-in name, or PATH.py:NAME: the function NAME of that Python file."""
    if spec in REWARDS:
        return Reward(spec, REWARDS[spec])
    path, sep, name = spec.rpartition(":")
    if not sep or not path.endswith(".py"):
        raise ZerotrainError(f"--reward-fn {spec}: use a built-in ({', '.join(REWARDS)}) or PATH.py:NAME, a function "
                             "of a Python file")
    if not Path(path).is_file():
        raise ZerotrainError(f"--reward-fn {spec}: {path} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"zerotrain_reward_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        raise ZerotrainError(f"--reward-fn {spec}: importing {path} failed: {type(e).__name__}: {e}") from e
    fn = getattr(module, name, None)
    if not callable(fn):
        found = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise ZerotrainError(f"--reward-fn {spec}: {path} has no function {name} (it has {', '.join(found) or 'none'})")
    return Reward(name, fn)


class ModelReward:
    """A reward model's score as a reward function: any transformers sequence-classification model
    with one label (a launcher/reward.py run's final/), with its own tokenizer and chat template.
    A conversational prompt and its completion are rendered as one conversation by that template;
    a text prompt and its completion are scored as one text. Frozen, in eval mode, on `device`:
    whole on every rank, or partitioned over them by ZeRO-3 when `zero3_config` (the run's
    DeepSpeed config) is given, as a ZeRO-3 run's reference and teacher are."""

    def __init__(self, directory: str, device: torch.device, dtype: torch.dtype, batch_size: int = 16,
                 zero3_config: dict[str, Any] | None = None):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(directory)
            self.model = AutoModelForSequenceClassification.from_pretrained(directory, dtype=dtype).to(device).eval()
        except (OSError, ValueError) as e:
            raise ZerotrainError(f"--reward-model {directory}: not a transformers sequence-classification model with "
                                 f"its tokenizer ({e}); use a launcher/reward.py run's final/") from None
        if self.model.config.num_labels != 1:
            raise ZerotrainError(f"--reward-model {directory} has {self.model.config.num_labels} labels; a reward "
                                 "model has one (its score)")
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # Right-padded: the model scores each row at its last token that is not padding.
        self.tokenizer.padding_side = "right"
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        if zero3_config is not None:
            from engine.objectives.frozen import partitioned

            # Each rank scores as many batches as the others (each has the same completions per
            # micro-batch), as the collective forwards need.
            self.model = partitioned(self.model.requires_grad_(False), zero3_config)
        self.device, self.batch_size = device, batch_size
        self.__name__ = "reward_model"

    def text(self, prompt: Any, completion: Any) -> str:
        if isinstance(prompt, list):
            return self.tokenizer.apply_chat_template(prompt + completion, tokenize=False)
        return prompt + completion

    @torch.no_grad()
    def __call__(self, prompts, completions, completion_ids, **columns) -> list[float]:
        texts = [self.text(p, c) for p, c in zip(prompts, completions)]
        out: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[start:start + self.batch_size], add_special_tokens=False, padding=True,
                                   return_tensors="pt").to(self.device)
            out.extend(self.model(**batch).logits[:, 0].float().tolist())
        return out


def score(rewards: list[Reward], prompts: list, completions: list, completion_ids: list[list[int]],
          columns: dict[str, list], step: int) -> torch.Tensor:
    """Every function's scores [completions, functions] (float64, NaN where it returned None).
    A function that raises, or returns other than one number or None per completion, is an
    error naming it, the step and the input."""
    out = torch.full((len(completions), len(rewards)), math.nan, dtype=torch.float64)
    for j, reward in enumerate(rewards):
        where = f"reward function {reward.name} at step {step}"
        try:
            values = reward.fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
        except ZerotrainError:
            raise
        except Exception as e:
            raise ZerotrainError(f"{where} raised {type(e).__name__}: {e} (its first input: prompt "
                                 f"{_short(prompts[0])}, completion {_short(completions[0])})") from e
        if not isinstance(values, (list, tuple)) or len(values) != len(completions):
            got = f"{len(values)} values" if isinstance(values, (list, tuple)) else type(values).__name__
            raise ZerotrainError(f"{where} returned {got} for {len(completions)} completions; it must return a list "
                                 "with one float or None per completion")
        for i, value in enumerate(values):
            if value is None:
                continue
            if not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ZerotrainError(f"{where} returned {value!r} for completion {i} (prompt {_short(prompts[i])}, "
                                     f"completion {_short(completions[i])}); a reward is a finite number or None")
            out[i, j] = float(value)
    return out


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...'"
