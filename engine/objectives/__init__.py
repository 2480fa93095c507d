"""What a training stage optimises, as one small interface the loop (engine.trainer) calls.

A stage is a name, the kind of data its unprefixed `--data` files hold, and an objective. The
objective says what it needs beyond the trained model (a frozen reference, a teacher), how many
normalisation units a micro-batch holds (trained tokens for language-model losses, pairs for
preference losses), and the summed loss and metrics of a micro-batch.

Normalisation is the loop's job, once, for every objective: it counts the step's units over all
micro-batches and ranks before the first forward, and scales each micro-batch's summed loss by
that count (as torchtitan does), so the step's loss is the mean over every unit of the global
batch whatever the accumulation, the padding or the number of ranks.

Adding a stage = one objective file here + a launcher of a few lines calling
`engine.train.main(argv, STAGE)`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Literal

import torch

if TYPE_CHECKING:
    from engine.builders import Data, RunPlan
    from engine.config import Config

Batch = dict[str, torch.Tensor]

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")
"""The batch keys the model takes; the others (labels, a reference's or teacher's stored
log-probs, markers) are the objective's."""


def model_inputs(batch: Batch) -> Batch:
    return {k: v for k, v in batch.items() if k in MODEL_INPUTS}


@dataclass
class LossSums:
    """One micro-batch's loss and metrics, each summed over its units (never averaged)."""

    loss: torch.Tensor
    """Scalar with a graph to backpropagate through."""
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    """Extra detached scalars logged as their mean per unit (e.g. DPO's rewards/chosen)."""


class Objective(ABC):
    """The loss of one training stage."""

    unit: ClassVar[Literal["token", "pair"]]
    """What the loss is averaged over."""

    def check(self, cfg: Config, plan: RunPlan) -> None:
        """Checks of the objective's own inputs (a teacher's tokenizer, say) that need no process
        group, run with the plan's before any expensive work. Nothing by default."""

    def build(self, cfg: Config, plan: RunPlan, engine: Any, data: Data) -> None:
        """Build what the objective runs besides the trained model (a frozen reference, a
        teacher), once the trained model's DeepSpeed `engine` exists, sharded as the objective
        chooses (e.g. an engine of its own from `plan.ds_config` with ZeRO-3 and no optimizer).
        Such models never enter the optimizer or the checkpoint and run under no_grad. It may
        also add to the data what is computed once (DPO's precomputed reference log-probs).
        Nothing by default."""

    def step_batches(self, model: Any, batches: list[Batch], step: int) -> list[Batch]:
        """The micro-batches of optimizer step `step` as they are trained on, before their units
        are counted: an on-policy objective swaps the data's replies for `model`'s own samples.
        Every rank calls it for the same step (ZeRO-3 generation is collective). As given, by
        default."""
        return batches

    @abstractmethod
    def units(self, batch: Batch) -> int:
        """Normalisation units in a micro-batch (read from the batch alone, before any forward)."""

    @abstractmethod
    def loss(self, model: Callable[..., object], batch: Batch) -> LossSums:
        """Forward `batch` through `model` (the DeepSpeed engine, or a plain module) and return
        the sums of the loss and metrics over the micro-batch's units."""


@dataclass(frozen=True)
class Stage:
    """A training stage: its name (the run kind saved in checkpoints), the data kind of its
    unprefixed --data entries, and how to build its objective from the run config."""

    name: str
    data_kind: str
    """pretrain, sft or pref; auto: plain --data files are taken as what they hold (pretraining
    text or conversations)."""
    objective: Callable[[Config], Objective]
    config_sections: tuple[str, ...] = ()
    """The stage-specific config sections it reads (engine.config.STAGE_SECTIONS): flags of the
    other stages' sections are refused rather than silently ignored."""
