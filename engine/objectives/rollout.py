"""On-policy samples: the trained model's own replies to the prompts of a batch (GKD, MiniLLM).

A row's prompt is everything before its last trained span (the final assistant reply of an SFT
conversation, with earlier turns as context); the model samples a new reply to it, and the row
becomes prompt + sample with only the sampled tokens trained. Sampling is pure (temperature
only, no top-k/top-p truncation) so the samples come from the student's own distribution, the
one whose divergence to the teacher is measured.
"""

from __future__ import annotations

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


@torch.no_grad()
def sample_replies(model: Any, batch: Batch, *, seq_len: int, max_new_tokens: int, temperature: float,
                   stop_ids: list[int], pad_id: int, seed: int, synced: bool) -> Batch:
    """`batch` with each row's last reply replaced by one `model` samples (right-padded rows,
    labels on the sampled tokens only, up to and including the first of `stop_ids`: the
    end-of-turn token).

    The sampling stream is seeded by `seed` alone and leaves the global RNG where it was, so a
    resumed run draws the same samples. `synced` keeps ranks in step under ZeRO-3 (every rank
    runs forwards until all are done), as transformers needs for partitioned weights.
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
    was_training = model.training
    model.eval()
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            out = model.generate(input_ids=input_ids, attention_mask=attention, do_sample=True,
                                 temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=budget,
                                 eos_token_id=stop_ids, pad_token_id=pad_id, synced_gpus=synced)
    finally:
        model.train(was_training)
    examples = []
    for head, reply in zip(heads, out[:, width:]):
        ends = torch.isin(reply, torch.tensor(stop_ids, device=reply.device)).nonzero().flatten()
        reply = reply[:int(ends[0]) + 1] if len(ends) else reply
        examples.append({"input_ids": torch.cat([head, reply]),
                         "labels": torch.cat([torch.full_like(head, IGNORE_INDEX), reply])})
    return {**collate_pad(examples, pad_id), "on_policy": torch.ones(())}


def stop_ids(tokenizer) -> list[int]:
    """The tokens that end a sampled reply: eos, and ChatML's end-of-turn where the vocabulary
    has it apart from eos (Qwen-style tokenizers)."""
    ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
    return sorted(i for i in ids if isinstance(i, int) and i != tokenizer.unk_token_id)
