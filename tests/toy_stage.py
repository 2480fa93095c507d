"""A toy training stage declared the way every stage is (engine.objectives.base.Stage): its own
config section, the data kind it trains on, and its objective. Tests register it
(engine.stages.register) to show that a declaration alone makes a stage: nothing else in
zerotrain names it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from engine.config.sections import require_positive
from engine.objectives.base import LossSums, Stage
from engine.objectives.causal_lm import CausalLM


@dataclass
class ToyConfig:
    """The toy stage's own flags."""

    SECTION: ClassVar[str] = "toy"

    toy_weight: float = 1.0
    """What the next-token loss is multiplied by."""

    def __post_init__(self) -> None:
        require_positive(self, "toy_weight")


class ToyLoss(CausalLM):
    """SFT's loss times --toy-weight, with a metric of its own."""

    def __init__(self, toy: ToyConfig, chunk: int = 0) -> None:
        super().__init__(chunk)
        self.weight = toy.toy_weight

    def loss(self, model, batch) -> LossSums:
        nll = super().loss(model, batch).loss
        return LossSums(self.weight * nll, {"toy/nll": nll.detach()})


TOY = Stage("toy", objective=lambda cfg: ToyLoss(cfg.section(ToyConfig), cfg.train.loss_chunk_size),
            data_kinds=("sft",), plain_data="sft", section=ToyConfig, headline=(("nll", "toy/nll"),),
            summary="a toy: SFT's loss, weighted")
