"""Preference tuning: DPO (with cDPO label smoothing), IPO, ORPO and SimPO over chosen/rejected pairs.

A micro-batch holds B pairs as 2B sequences (engine.data.pairs): the chosen ones, then the
rejected ones, each labelled on its final response only, one padded row each or, with --pack,
packed into fewer rows with `sequence_ids` saying which token is whose. Both halves go through
the model in one forward. A sequence's log-probability is the sum over its response tokens (the
trained-token rule of engine.objectives.tokens); IPO, ORPO and SimPO use the mean per
response token, as their papers and TRL do.

The loop normalises per pair: `units` is B and `loss` returns sums over the pairs, so a step's
loss and rewards are means over every pair of the global batch.

The reference model of DPO and IPO is (engine.objectives.reference) a frozen copy of the --init-from model
(or --ref-from), the policy itself with its LoRA adapter disabled, or log-probs computed once
before training (--precompute-ref) and carried in the batch as `ref_logps`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch
import torch.nn.functional as F

from common.errors import ZerotrainError
from engine.config.sections import Given, choice, invalid, require_positive
from engine.objectives.base import Batch, LossSums, Objective, Stage, model_inputs
from engine.objectives.tokens import (
    chunk_count,
    decoder_states,
    language_model,
    summed_over_chunks,
    token_logps,
    trained_targets,
    trained_tokens,
)

if TYPE_CHECKING:
    from engine.config.tree import Config
    from engine.training.parts import Data, RunPlan


PREF_LOSSES = ("dpo", "ipo", "orpo", "simpo")


@dataclass
class PrefConfig:
    """Preference tuning (launcher/dpo.py): which loss, its strength, and the reference model."""

    SECTION: ClassVar[str] = "pref"

    pref_loss: str = choice("dpo", PREF_LOSSES)
    """dpo (sigmoid), ipo, orpo or simpo; orpo and simpo need no reference model."""
    beta: float = 0.1  # TRL's DPOConfig.beta
    """Strength: DPO/SimPO's beta, IPO's tau (the target margin is 1 / (2 beta)), ORPO's lambda."""
    label_smoothing: float = 0.0
    """cDPO: the probability that a pair's preference is flipped (dpo and simpo only)."""
    simpo_gamma: float = 0.5
    """SimPO's target reward margin (gamma; the logits are shifted by gamma / beta)."""
    sft_weight: float = 0.0
    """Add this times the chosen response's NLL per response token (RPO-style) to every loss."""
    ref_from: str = ""
    """Reference model, when not the --init-from model: an HF dir, run dir, .pth/.safetensors or DeepSpeed
    checkpoint (with LoRA, default: the base with the adapter disabled)."""
    precompute_ref: bool = False
    """Compute the reference log-probs once before training, cached with the prepared data, so training holds
    one model."""

    def __post_init__(self) -> None:
        require_positive(self, "beta")
        if not 0.0 <= self.label_smoothing < 0.5:
            invalid(self, "label_smoothing", self.label_smoothing, "a number in [0, 0.5)")
        if self.label_smoothing and self.pref_loss not in ("dpo", "simpo"):
            invalid(self, "label_smoothing", self.label_smoothing,
                    f"0 with --pref-loss {self.pref_loss} (dpo and simpo only)")
        if self.sft_weight < 0:
            invalid(self, "sft_weight", self.sft_weight, "0 (off) or more")
        if not self.needs_reference and (self.ref_from or self.precompute_ref):
            raise ZerotrainError(f"--pref-loss {self.pref_loss} uses no reference model: drop --ref-from / "
                                 "--precompute-ref")

    @property
    def needs_reference(self) -> bool:
        """Whether the loss compares the policy to a reference model (DPO and IPO do)."""
        return self.pref_loss in ("dpo", "ipo")


@dataclass
class PairLosses:
    """Per-pair terms, each a tensor of shape [pairs]."""

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor,
                   sequence_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: the summed log-probability of its trained tokens (fp32), and how many there
    are. A sequence is a row, or with `sequence_ids` (a packed batch, engine.data.pairs) the
    tokens marked with its index, in index order."""
    mask, logps = trained_tokens(labels), token_logps(logits, labels)
    if sequence_ids is None:
        return logps.sum(dim=1), mask.sum(dim=1)  # untrained positions hold 0
    # A trained position is its own sequence's, as is the token it predicts: the first label of
    # every packed sequence is -100, so no target is predicted across a boundary. Sequence i is
    # the one marked i, 0 <= i < count.
    owner, count = sequence_ids[mask], int(sequence_ids.max()) + 1
    return logps.new_zeros(count).index_add(0, owner, logps[mask]), torch.bincount(owner, minlength=count)


def batch_logps(logits: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """sequence_logps of a preference batch, padded or packed."""
    return sequence_logps(logits, batch["labels"], batch.get("sequence_ids"))


def model_logps(model: Callable[..., Any], batch: Batch, chunk: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """batch_logps of `model` on `batch`: from the full logits, or (--loss-chunk-size `chunk`) from
    the decoder's states of the trained tokens through the LM head `chunk` tokens at a time, each
    chunk's log-probs added to their sequences' sums at once (summed_over_chunks)."""
    if not chunk:
        return batch_logps(model(**model_inputs(batch), use_cache=False).logits, batch)
    labels, count = batch["labels"], sequence_count(batch)
    mask = trained_tokens(labels)
    rows = torch.arange(len(labels), device=labels.device)[:, None].expand_as(labels)
    owners = batch.get("sequence_ids", rows)[mask]
    states, targets = decoder_states(model, batch)[mask], trained_targets(labels)
    head = language_model(model).get_output_embeddings()

    def chunk_logps(states: torch.Tensor, targets: torch.Tensor, owners: torch.Tensor) -> torch.Tensor:
        logps = -F.cross_entropy(head(states).float(), targets, reduction="none")
        return logps.new_zeros(count).index_add(0, owners, logps)

    chunks = chunk_count([head], len(targets), chunk, states.device)
    return (summed_over_chunks(chunk_logps, [states, targets, owners], chunk, chunks),
            torch.bincount(owners, minlength=count))


def sequence_count(batch: Batch) -> int:
    """How many sequences (2 x pairs) a preference batch holds, padded or packed."""
    return int(batch["sequence_ids"].max()) + 1 if "sequence_ids" in batch else batch["input_ids"].shape[0]


def _sigmoid_loss(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """-log sigmoid(logits), with the conservative (cDPO) mix of the flipped preference."""
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def pair_losses(pref: PrefConfig, chosen_logps: torch.Tensor, rejected_logps: torch.Tensor,
                chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor,
                ref_chosen_logps: torch.Tensor | None = None,
                ref_rejected_logps: torch.Tensor | None = None) -> PairLosses:
    """The per-pair loss and rewards of `pref.pref_loss` from summed response log-probs.

    dpo    -(1-e) log s(b D) - e log s(-b D),  D = (c - c_ref) - (r - r_ref)       (Rafailov et al.)
    ipo    (D' - 1/(2b))^2, D' the same difference of per-token means            (Azar et al.)
    simpo  -(1-e) log s(b (c' - r') - g), c', r' per-token means                   (Meng et al.)
    orpo   -c' - b log s(log odds(c') - log odds(r')), odds(p) = p / (1 - p)       (Hong et al.)

    Rewards are b times the log-ratio to the reference (dpo, ipo), or b times the per-token
    mean log-prob where there is no reference (simpo, orpo), as TRL logs them.
    """
    beta, kind = pref.beta, pref.pref_loss
    chosen_mean = chosen_logps / chosen_tokens.clamp(min=1)
    rejected_mean = rejected_logps / rejected_tokens.clamp(min=1)
    if kind in ("dpo", "ipo"):
        if ref_chosen_logps is None or ref_rejected_logps is None:
            raise ValueError(f"{kind} needs the reference log-probs")
        chosen_ratio, rejected_ratio = chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps
        if kind == "dpo":
            loss = _sigmoid_loss(beta * (chosen_ratio - rejected_ratio), pref.label_smoothing)
        else:
            delta = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
            loss = (delta - 1 / (2 * beta)) ** 2
        return PairLosses(loss, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())
    if kind == "simpo":
        loss = _sigmoid_loss(beta * (chosen_mean - rejected_mean) - pref.simpo_gamma, pref.label_smoothing)
    elif kind == "orpo":
        # log odds(p) = log p - log(1 - p), from log p; log(-expm1(x)) stays exact as p -> 1, where
        # log1p(-exp(x)) cancels (fp32: off by 2e-4 at x = -1e-4, -inf at x = -1e-9).
        log_odds = (chosen_mean - rejected_mean) - (torch.log(-torch.expm1(chosen_mean))
                                                    - torch.log(-torch.expm1(rejected_mean)))
        loss = -chosen_mean - beta * F.logsigmoid(log_odds)
    else:
        raise ValueError(f"unknown preference loss {kind!r}")
    return PairLosses(loss, beta * chosen_mean.detach(), beta * rejected_mean.detach())


class Preference(Objective):
    """A preference loss summed over pairs; the loop averages it per pair."""

    unit = "pair"

    def __init__(self, pref: PrefConfig, chunk: int = 0):
        self.pref, self.chunk = pref, chunk  # --loss-chunk-size: trained tokens through the LM head at a time
        self.reference: Callable[[Batch], torch.Tensor] | None = None
        """Batch -> the reference's summed response log-probs per sequence [2B] (None: precomputed, or
        a loss that needs none)."""

    def build(self, cfg: Config, plan: RunPlan, engine: Any, data: Data) -> None:
        from engine.distributed import log_on_rank0, world
        from engine.objectives.reference import precompute, reference_logps

        if not self.pref.needs_reference:
            return
        if self.pref.precompute_ref:
            here = world()
            precompute(cfg, plan, engine, data, data.directories[0], here, lambda m: log_on_rank0(here.rank, m),
                       self.pref.ref_from, model_logps)
        else:
            self.reference = reference_logps(cfg, plan, engine, self.pref.ref_from, model_logps)

    def units(self, batch: Batch) -> int:
        return sequence_count(batch) // 2

    def loss(self, model: Callable[..., object], batch: Batch) -> LossSums:
        logps, tokens = model_logps(model, batch, self.chunk)
        if "ref_logps" in batch:
            ref = batch["ref_logps"]
        elif self.reference is not None:
            ref = self.reference(batch)
        else:
            ref = None
        chosen, rejected = logps.chunk(2)
        chosen_tokens, rejected_tokens = tokens.chunk(2)
        ref_chosen, ref_rejected = ref.chunk(2) if ref is not None else (None, None)
        terms = pair_losses(self.pref, chosen, rejected, chosen_tokens, rejected_tokens, ref_chosen, ref_rejected)
        loss = terms.loss
        if self.pref.sft_weight:
            loss = loss - self.pref.sft_weight * chosen / chosen_tokens.clamp(min=1)
        chosen_rewards, rejected_rewards = terms.chosen_rewards, terms.rejected_rewards
        metrics = {
            "rewards/chosen": chosen_rewards.sum(),
            "rewards/rejected": rejected_rewards.sum(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum(),
            "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
            "logps/chosen": chosen.detach().sum(),
            "logps/rejected": rejected.detach().sum(),
        }
        return LossSums(loss.sum(), metrics)


DPO = Stage("dpo", objective=lambda cfg: Preference(cfg.section(PrefConfig), cfg.train.loss_chunk_size),
            data_kinds=("pref",), plain_data="pref", section=PrefConfig, mixes=False,
            # lr: TRL's DPOConfig.learning_rate (1e-6) for full weights; with LoRA LLaMA-Factory's DPO
            # examples' 5e-6 (examples/train_lora/*_dpo.yaml), as an adapter's few weights take larger steps.
            # pack: packed pairs give the padded ones' loss and gradients (tests/unit/test_pref_pack.py).
            defaults=(("lr", Given(1e-6, "lora_r", 5e-6)), ("pack", True)),
            headline=(("acc", "rewards/accuracies"),),
            summary="preference tuning (DPO, IPO, ORPO, SimPO) of a policy")
