"""Batching: examples -> one micro-batch of tensors. The labels were made while preparing; these
only stack, pad (labels with IGNORE_INDEX) or pack."""

from __future__ import annotations

import torch

from engine.data.format import IGNORE_INDEX


def collate_stack(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Fixed-length examples (pretraining windows) stacked into a batch."""
    return {k: torch.stack([e[k] for e in examples]) for k in examples[0]}


def collate_pad(examples: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; labels are padded with -100, attention_mask marks real tokens."""
    length = max(len(e["input_ids"]) for e in examples)
    batch = {"input_ids": torch.full((len(examples), length), pad_id, dtype=torch.long),
             "labels": torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long),
             "attention_mask": torch.zeros((len(examples), length), dtype=torch.long)}
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        batch["input_ids"][row, :n] = e["input_ids"]
        batch["labels"][row, :n] = e["labels"]
        batch["attention_mask"][row, :n] = 1
    return batch


def collate_packed(examples: list[dict[str, torch.Tensor]], seq_len: int, pad_id: int,
                   sequence_ids: bool = False) -> dict[str, torch.Tensor]:
    """Pack examples greedily, in order, into rows of at most `seq_len` tokens.

    position_ids restart at 0 for every example and no attention_mask is passed, so
    transformers builds a block-diagonal causal mask from the position_ids: examples in one
    row never attend to each other (the forward must run with use_cache=False, as the
    engine's does: transformers ignores packing when a KV cache is in play). The first label of each example is -100, so no token is
    trained to predict across a boundary. Examples are never split across rows.
    With `sequence_ids`, the batch also says which example each token is (its index in
    `examples`, -1 on padding), for sums per example (engine.objectives.preference).
    """
    rows: list[list[dict[str, torch.Tensor]]] = [[]]
    used = 0
    for e in examples:
        n = len(e["input_ids"])
        if used + n > seq_len and rows[-1]:
            rows.append([])
            used = 0
        rows[-1].append(e)
        used += n
    length = max(sum(len(e["input_ids"]) for e in row) for row in rows)
    batch = {"input_ids": torch.full((len(rows), length), pad_id, dtype=torch.long),
             "labels": torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long),
             "position_ids": torch.zeros((len(rows), length), dtype=torch.long)}
    if sequence_ids:
        batch["sequence_ids"] = torch.full((len(rows), length), -1, dtype=torch.long)
    index = 0
    for r, row in enumerate(rows):
        at = 0
        for e in row:
            n = len(e["input_ids"])
            if sequence_ids:
                batch["sequence_ids"][r, at:at + n] = index
            index += 1
            batch["input_ids"][r, at:at + n] = e["input_ids"]
            batch["labels"][r, at:at + n] = e["labels"]
            batch["labels"][r, at] = IGNORE_INDEX
            # a pretraining window under --document-mask brings its own restarting positions
            batch["position_ids"][r, at:at + n] = e["position_ids"] if "position_ids" in e else torch.arange(n)
            at += n
        # Padding continues as its own "sequence" (positions restart), fully masked by labels.
        batch["position_ids"][r, at:] = torch.arange(length - at)
    return batch
