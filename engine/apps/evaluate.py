"""`zerotrain eval`: the loss and perplexity of a model on data files.

The data is read through the same preparation as training (engine.data.prepare) and scored by
the training objective (engine.objectives.causal_lm), so its windows, SFT label masks and token
counts are the ones the model was trained on, and its loss is comparable to a run's `val_loss`.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import torch

from common.errors import ZerotrainError
from engine.apps.generate import context_length


def eval_kind(data: list[str], kind: str, columns: str = "") -> str:
    """The data kind `zerotrain eval` reads `data` as (`auto`: what the files hold), refused
    unless it is one whose examples are scored token by token (engine.data.kinds)."""
    from engine.data.kinds import data_kind, detect_kind

    kind = detect_kind(data, columns) if kind == "auto" else kind
    if not data_kind(kind).language_modeling:
        raise ZerotrainError(f"{' '.join(data)}: {data_kind(kind).title}; eval measures language-model loss on "
                             "pretraining text or SFT conversations only. Evaluate on SFT data, or watch a DPO run's "
                             "val_rewards/* in its metrics.jsonl")
    return kind


@torch.no_grad()
def evaluate(model: torch.nn.Module, tokenizer, data: list[str], *, kind: str = "auto", seq_len: int = 512,
             batch_size: int = 8, max_batches: int | None = None, show_progress: bool = False,
             columns: str = "") -> dict[str, Any]:
    """Loss (total token NLL / trained tokens) and perplexity of `model` on raw data files
    (conversations read through a --columns mapping when one is given).

    Pretraining text: fixed windows of `seq_len` tokens (the tail that fills no window is left
    out), every next token counted. SFT: each conversation (truncated to `seq_len`), only the
    assistant's tokens counted. The same reading, encoding and masking as training.
    """
    from tqdm import tqdm

    from engine.data.kinds import data_kind
    from engine.data.prepare import prepare
    from engine.objectives.base import summed_over
    from engine.objectives.causal_lm import CausalLM

    kind = eval_kind(data, kind, columns)
    limit = context_length(model)
    if limit is not None and seq_len > limit:
        raise ZerotrainError(f"--seq-len {seq_len} is longer than the model's context of {limit} tokens")
    if seq_len < 2 or batch_size < 1 or (max_batches is not None and max_batches < 1):
        raise ZerotrainError("--seq-len must be at least 2, --batch-size and --max-batches at least 1")
    with tempfile.TemporaryDirectory(prefix="zerotrain-eval-") as tmp:
        meta = prepare(kind, data, tokenizer, Path(tmp) / "data", seq_len=seq_len, val_fraction=0.0,
                       show_progress=False, columns=columns)
        dataset = data_kind(kind).dataset(Path(tmp) / "data", "train", seq_len, document_eos=None)
        collate = data_kind(kind).collate(seq_len, tokenizer.pad_token_id, False)
        if len(dataset) == 0:
            raise ZerotrainError(f"{', '.join(data)}: {meta['splits']['train']['tokens']} tokens do not fill one "
                                 f"window of --seq-len {seq_len}; use a smaller --seq-len")
        starts = range(0, len(dataset), batch_size)[:max_batches]
        batches = (collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
                   for start in tqdm(starts, desc=f"eval {kind}", disable=not show_progress))
        # The training objective scores and counts exactly as training and validation do.
        sums = summed_over(CausalLM(), model, batches, model.device)
        nll, tokens = sums["loss"], int(sums["units"])
        sequences = min(len(dataset), len(starts) * batch_size)
    loss = nll / tokens
    return {"kind": kind, "loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf,
            "tokens": tokens, "sequences": sequences, "skipped": {k: v for k, v in meta["stats"].items() if v}}
