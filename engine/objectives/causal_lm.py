"""Next-token cross-entropy: the objective of pretraining and SFT, which differ only in data.

The trained-token rule lives here, once: position i of a row predicts token i + 1, so a token
is trained where `labels[:, 1:]` is not IGNORE_INDEX (prompt tokens, padding and the first token
of each packed example are IGNORE_INDEX). Training, validation and `zerotrain eval` all count
and score tokens through `trained_tokens` and `token_nll_sum`.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from engine.data import IGNORE_INDEX
from engine.objectives import Batch, LossSums, Objective, Stage, model_inputs


def trained_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Boolean mask (rows x positions - 1) of the tokens a row is trained to predict."""
    return labels[:, 1:] != IGNORE_INDEX


def token_nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed negative log-likelihood of the trained tokens, computed in fp32 (as transformers'
    own causal-LM loss upcasts the logits)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")


class CausalLM(Objective):
    """Cross-entropy summed over trained tokens; the loop averages it per token."""

    unit = "token"

    def units(self, batch: Batch) -> int:
        return int(trained_tokens(batch["labels"]).sum())

    def loss(self, model: Callable[..., object], batch: Batch) -> LossSums:
        # No labels for the model: the loss is computed here, summed, for the loop to normalise.
        # use_cache=False also keeps transformers' packed-sequence masking (from position_ids).
        logits = model(**model_inputs(batch), use_cache=False).logits
        return LossSums(token_nll_sum(logits, batch["labels"]))


PRETRAIN = Stage("pretrain", data_kind="pretrain", objective=lambda cfg: CausalLM())
SFT = Stage("sft", data_kind="sft", objective=lambda cfg: CausalLM())
