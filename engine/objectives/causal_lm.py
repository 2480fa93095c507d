"""Next-token cross-entropy: the objective of pretraining and SFT, which differ only in data.

The trained-token rule and the loss itself are engine.objectives.tokens'; training, validation
and `zerotrain eval` all count and score tokens through this objective.
"""

from __future__ import annotations

from typing import Callable

from engine.objectives.base import Batch, LossSums, Objective, Stage
from engine.objectives.tokens import lm_nll_sum, trained_tokens


class CausalLM(Objective):
    """Cross-entropy summed over trained tokens; the loop averages it per token."""

    unit = "token"

    def __init__(self, chunk: int = 0) -> None:
        self.chunk = chunk

    def units(self, batch: Batch) -> int:
        return int(trained_tokens(batch["labels"]).sum())

    def loss(self, model: Callable[..., object], batch: Batch) -> LossSums:
        # No labels for the model: the loss is computed here, summed, for the loop to normalise.
        # use_cache=False also keeps transformers' packed-sequence masking (from position_ids).
        return LossSums(lm_nll_sum(model, batch, self.chunk))


PRETRAIN = Stage("pretrain", objective=lambda cfg: CausalLM(cfg.train.loss_chunk_size),
                 data_kinds=("pretrain", "sft"), plain_data="pretrain", summary="pretraining (next-token prediction)")
SFT = Stage("sft", objective=lambda cfg: CausalLM(cfg.train.loss_chunk_size), data_kinds=("pretrain", "sft"),
            plain_data="sft",
            # Packed rows give the padded batches' loss and gradients (tests/unit/test_packing.py) in fewer,
            # shorter rows: faster on the shipped conversations (README), so on unless --no-pack.
            defaults=(("pack", True),),
            summary="supervised fine-tuning, full or LoRA (next-token prediction on the replies)")
