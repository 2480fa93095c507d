"""What a training stage is, and what it optimises: the one small interface the loop
(engine.training.trainer) calls, and the declaration that makes a stage.

A stage is declared in one place, a module of engine/objectives: its name (and so its launcher,
launcher/NAME.py), its config section, the data kinds it trains on (each kind brings its reading,
preparation, dataset and collate: engine.data.kinds), its checks and its objective. Config,
setup, the CLI's help and the docs learn about stages from these declarations alone
(engine.stages finds them); nothing else branches on a stage's name.

The objective says what it needs beyond the trained model (a frozen reference, a teacher), how
many normalisation units a micro-batch holds (trained tokens for language-model losses, pairs
for preference losses), and the summed loss and metrics of a micro-batch.

Normalisation is the loop's job, once, for every objective: it counts the step's units over all
micro-batches and ranks before the first forward, and scales each micro-batch's summed loss by
that count (as torchtitan does), so the step's loss is the mean over every unit of the global
batch whatever the accumulation, the padding or the number of ranks.

Adding a stage = one module here (its objective, its config section and its Stage) + a launcher
of a few lines calling `engine.training.main.main(argv, STAGE)` + a batch script.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Literal

import torch

if TYPE_CHECKING:
    from engine.config.tree import Config
    from engine.training.parts import Data, RunPlan

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

    unit: ClassVar[Literal["token", "pair", "sequence"]]
    """What the loss is averaged over (a token-level loss's validation also reports perplexity)."""

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

    def draws_data(self, step: int) -> bool:
        """Whether the loop takes step `step`'s micro-batches from the loader; False when
        step_batches makes them itself (given none): from batches it kept from an earlier step, or
        from the loader it was given at build (an RL step draws its prompts for every rank at
        once). True by default."""
        return True

    def state_dict(self) -> dict[str, Any]:
        """What this rank's objective carries to later steps (batches kept for them), saved with
        the checkpoint so a resumed run trains on them too: tensors and plain values. Empty by
        default."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take back what state_dict saved (given {} when it saved nothing)."""

    def step_metrics(self) -> dict[str, float | None]:
        """Metrics of the step's batches themselves, already reduced over ranks by step_batches
        (an RL step's rewards and completion lengths), logged beside the loss. None by default."""
        return {}

    @abstractmethod
    def units(self, batch: Batch) -> int:
        """Normalisation units in a micro-batch (read from the batch alone, before any forward)."""

    @abstractmethod
    def loss(self, model: Callable[..., object], batch: Batch) -> LossSums:
        """Forward `batch` through `model` (the DeepSpeed engine, or a plain module) and return
        the sums of the loss and metrics over the micro-batch's units."""


@dataclass(frozen=True)
class Stage:
    """A training stage, declared once in its objective's module."""

    name: str
    """The stage's name: its launcher is launcher/NAME.py, and checkpoints record it as their kind."""
    objective: Callable[[Config], Objective]
    """Builds the stage's objective from the run's config."""
    data_kinds: tuple[str, ...]
    """The data kinds it trains on (engine.data.kinds): a --data source of another kind is refused."""
    plain_data: str | None = None
    """What plain --data files (no KIND: prefix) hold: one of data_kinds, or None to tell from their
    records (engine.data.kinds.detect_kind)."""
    section: type | None = None
    """Its own config section (a dataclass with SECTION, checked like the common ones), if any: its
    flags are this stage's alone, and the other launchers refuse them."""
    shares: tuple[type, ...] = ()
    """Other stages' sections it reads too, their flags meaning the same here (PPO reads GRPO's
    rewards and sampling); the launchers of neither stage refuse them."""
    defaults: tuple[tuple[str, Any], ...] = ()
    """(field, value) defaults of its own for any field, of a common section or a shared one (DPO's
    lr; PPO samples 1 completion per prompt, GRPO 8; PPO's LoRA has no dropout); a value may be an
    engine.config.sections.Given (another default once the run sets a field: DPO's lr with
    --lora-r). Flags and YAML still override them, and the launcher's --help shows them."""
    mixes: bool = True
    """Several --data sources may be mixed by weight."""
    model: Callable[[torch.nn.Module, Config], torch.nn.Module] | None = None
    """Turns the causal LM built from --init-from (or the preset) into the module it trains, given
    the run's config, before LoRA and DeepSpeed (a reward model's scalar head on its trunk, PPO's
    actor beside its critic); None: the causal LM itself."""
    exported: str = ""
    """The submodule of the trained module that is the model: what final/ holds, what
    consolidation, extract-adapter and --init-from take from its checkpoints, and what --lora-r
    adapts (PPO's actor, not its critic, which trains in full); "" the whole module."""
    headline: tuple[tuple[str, str], ...] = ()
    """(label, metric) shown beside the loss on the progress bar, e.g. ("acc", "rewards/accuracies")."""
    summary: str = ""
    """One line saying what it trains, for --help."""

    @property
    def sections(self) -> tuple[type, ...]:
        """Its config sections: its own, if any, and those it shares."""
        return ((self.section,) if self.section is not None else ()) + self.shares

    @property
    def launcher(self) -> str:
        return f"launcher/{self.name}.py"


@torch.no_grad()
def summed_over(objective: Objective, model: Callable[..., object], batches: Iterable[Batch],
                device: torch.device, counts: Iterable[bool] | None = None) -> dict[str, float]:
    """The objective's loss, units and metrics each summed over `batches`, without gradients:
    validation's and `zerotrain eval`'s pass over held-out data (means are sums / units).
    `counts`: whether each batch's results count (one a rank runs only to keep a collective pass
    in step does not); all of them by default."""
    sums: dict[str, float] = {"units": 0.0, "loss": 0.0}
    for batch, counted in zip(batches, counts if counts is not None else itertools.repeat(True)):
        batch = {k: v.to(device) for k, v in batch.items()}
        out = objective.loss(model, batch)
        # A batch that does not count still adds its metrics' keys: every rank reduces the same ones.
        for name, value in out.metrics.items():
            sums[name] = sums.get(name, 0.0) + (float(value) if counted else 0.0)
        if counted:
            sums["units"] += objective.units(batch)
            sums["loss"] += float(out.loss)
    return sums
