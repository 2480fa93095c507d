"""On-policy samples: the trained model's own completions of prompts (`sample`: RL's rollouts),
and its own replies to the prompts of an SFT batch (`sample_replies`: GKD, MiniLLM).

A row's prompt is everything before its last trained span (the final assistant reply of an SFT
conversation, with earlier turns as context); the model samples a new reply to it, and the row
becomes prompt + sample with only the sampled tokens trained. Sampling is pure (temperature
only, no top-k/top-p truncation) so the samples come from the student's own distribution, the
one whose divergence to the teacher is measured.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from common.errors import ZerotrainError
from engine.data.collate import collate_pad
from engine.data.format import IGNORE_INDEX
from engine.objectives.base import Batch


def prompts(batch: Batch) -> list[torch.Tensor]:
    """Each row's tokens before the start of its last trained span."""
    out = []
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        trained = (labels != IGNORE_INDEX).nonzero().flatten()
        if not len(trained):
            raise ZerotrainError("an on-policy row has no trained reply to replace: on-policy distillation needs "
                                 "SFT conversations that end with an assistant reply")
        start = int(trained[-1])
        while start > 0 and labels[start - 1] != IGNORE_INDEX:
            start -= 1
        out.append(ids[:start])
    return out


@dataclass
class Completions:
    """What `sample` drew: completion ids [rows, L] (pad after the end), the mask of their
    tokens up to and including the first stop id [rows, L], and which rows ran out of tokens
    before one [rows]."""

    ids: torch.Tensor
    mask: torch.Tensor
    truncated: torch.Tensor


@torch.no_grad()
def sample(model: Any, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, max_new_tokens: int,
           temperature: float, stop_ids: list[int], pad_id: int, seed: int, top_p: float = 1.0,
           synced: bool = False) -> Completions:
    """Completions of left-padded prompts [rows, width] sampled from `model` (its generate(),
    in eval mode, then back as it was).

    The sampling stream is seeded by `seed` alone and leaves the global RNG where it was, so a
    resumed run draws the same samples. Under ZeRO-3 `synced` keeps the ranks in step: every
    rank runs forwards until all are done (transformers' synced_gpus), since each forward gathers
    each layer's weights, a collective that ranks whose completions end at different lengths would
    otherwise not match. (Gathering the whole model once for the call is not enough: DeepSpeed's
    forward hooks release the weights after each layer, and removing those hooks takes its
    private API.)
    """
    devices = [prompt_ids.device] if prompt_ids.device.type == "cuda" else []
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=True,
                                 temperature=temperature, top_k=0, top_p=top_p, max_new_tokens=max_new_tokens,
                                 eos_token_id=stop_ids, pad_token_id=pad_id, synced_gpus=synced)
    finally:
        model.train(was_training)
    ids = out[:, prompt_ids.shape[1]:]
    is_stop = torch.isin(ids, torch.tensor(stop_ids, device=ids.device))
    # Up to and including the first stop id: nothing after it counts (generate pads there).
    before_stop = (is_stop.cumsum(-1) - is_stop.long()) == 0
    return Completions(ids.masked_fill(~before_stop, pad_id), before_stop, ~is_stop.any(-1))


def sample_replies(model: Any, batch: Batch, *, seq_len: int, max_new_tokens: int, temperature: float,
                   stop_ids: list[int], pad_id: int, seed: int, synced: bool) -> Batch:
    """`batch` with each row's last reply replaced by one `model` samples (right-padded rows,
    labels on the sampled tokens only, up to and including the first of `stop_ids`: the
    end-of-turn token). Sampling is `sample`'s: seeded by `seed` alone, `synced` under ZeRO-3.
    """
    heads = prompts(batch)
    device = batch["input_ids"].device
    width = max(len(p) for p in heads)
    budget = min(max_new_tokens, seq_len - width)
    if budget < 1:
        raise ZerotrainError(f"a prompt fills the whole --seq-len {seq_len}: no room to sample a reply")
    # Left padding: every prompt ends where generation starts.
    input_ids = torch.full((len(heads), width), pad_id, dtype=torch.long, device=device)
    attention = torch.zeros_like(input_ids)
    for r, head in enumerate(heads):
        input_ids[r, width - len(head):] = head
        attention[r, width - len(head):] = 1
    drawn = sample(model, input_ids, attention, max_new_tokens=budget, temperature=temperature, stop_ids=stop_ids,
                   pad_id=pad_id, seed=seed, synced=synced)
    examples = []
    for head, reply, kept in zip(heads, drawn.ids, drawn.mask):
        reply = reply[kept]
        examples.append({"input_ids": torch.cat([head, reply]),
                         "labels": torch.cat([torch.full_like(head, IGNORE_INDEX), reply])})
    return {**collate_pad(examples, pad_id), "on_policy": torch.ones(())}


def stop_ids(tokenizer) -> list[int]:
    """The tokens that end a sampled reply: eos, and ChatML's end-of-turn where the vocabulary
    has it apart from eos (Qwen-style tokenizers)."""
    ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
    return sorted(i for i in ids if isinstance(i, int) and i != tokenizer.unk_token_id)
