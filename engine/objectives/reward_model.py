"""Reward models (launcher/reward.py): a scalar head on a causal LM's trunk, trained on the
preference pairs DPO reads with the Bradley-Terry loss, as TRL's RewardTrainer does.

The model is transformers' own sequence-classification class of the architecture (one label:
`AutoModelForSequenceClassification`), its trunk the --init-from model's and its head new. It
scores a sequence at its last token that is not padding (transformers finds it with the
config's pad_token_id, which the run sets from the tokenizer), so `final/` scores a conversation
rendered with `final/`'s chat template exactly as training scored it.

A micro-batch holds B pairs as 2B rows (engine.data.pairs: the chosen sequences, then the
rejected ones, right-padded); with r_c and r_r their scores,

    loss = -log sigmoid(r_c - r_r) + c (r_c + r_r)^2       (c: --center-rewards-coefficient)

summed over pairs and averaged by the loop per pair; `accuracy` is the share of pairs with
r_c > r_r and `margin` the mean r_c - r_r (TRL's names).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch
import torch.nn.functional as F

from common.errors import ZerotrainError
from engine.config.sections import invalid
from engine.objectives.base import Batch, LossSums, Objective, Stage, model_inputs

if TYPE_CHECKING:
    from engine.config.tree import Config
    from engine.training.parts import RunPlan


@dataclass
class RewardConfig:
    """Reward-model training (launcher/reward.py)."""

    SECTION: ClassVar[str] = "reward"

    center_rewards_coefficient: float = 0.0
    """Adds this times (r_chosen + r_rejected)^2 to the loss, keeping the scores centred on 0 (TRL's; 0: off)."""

    def __post_init__(self) -> None:
        if self.center_rewards_coefficient < 0:
            invalid(self, "center_rewards_coefficient", self.center_rewards_coefficient, "0 (off) or more")


def as_reward_model(model: torch.nn.Module, cfg: Config | None = None) -> torch.nn.Module:
    """The architecture's sequence-classification model with one label, its trunk `model`'s own
    weights and its score head newly initialised (the config's initializer_range); `cfg` is not
    needed (the Stage.model hook's signature)."""
    import copy

    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(model.config)
    config.num_labels = 1
    config.architectures = None
    # The copied config carries the causal LM's attention implementation along.
    scorer = AutoModelForSequenceClassification.from_config(config, dtype=model.dtype)
    prefix = model.base_model_prefix
    missing, unexpected = getattr(scorer, prefix).load_state_dict(getattr(model, prefix).state_dict(), strict=False)
    if missing or unexpected:
        raise ZerotrainError(f"the {type(model).__name__} trunk does not fit {type(scorer).__name__} (missing "
                             f"{missing[:3]}, unexpected {unexpected[:3]})")
    scorer.config.architectures = [type(scorer).__name__]  # what export and consolidation build it as
    return scorer


def pair_rewards(model: Callable[..., Any], batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) scores [B] of a batch of B pairs (2B rows)."""
    scores = model(**model_inputs(batch), use_cache=False).logits.squeeze(-1).float()
    return scores.chunk(2)


class RewardModel(Objective):
    """The Bradley-Terry loss summed over pairs; the loop averages it per pair."""

    unit = "pair"

    def __init__(self, reward: RewardConfig):
        self.reward = reward

    def check(self, cfg: Config, plan: RunPlan) -> None:
        if cfg.data.pack:
            raise ZerotrainError("--pack: a reward model scores each sequence at its own last token, one row each; "
                                 "drop --pack")
        if cfg.lora.enabled:
            raise ZerotrainError("--lora-r: reward models train every weight here (a LoRA reward model is not built "
                                 "yet); drop --lora-r")

    def units(self, batch: Batch) -> int:
        return batch["input_ids"].shape[0] // 2

    def loss(self, model: Callable[..., object], batch: Batch) -> LossSums:
        chosen, rejected = pair_rewards(model, batch)
        loss = -F.logsigmoid(chosen - rejected)
        if self.reward.center_rewards_coefficient:
            loss = loss + self.reward.center_rewards_coefficient * (chosen + rejected) ** 2
        with torch.no_grad():
            metrics = {"accuracy": (chosen > rejected).float().sum(), "margin": (chosen - rejected).sum(),
                       "rewards/chosen": chosen.sum(), "rewards/rejected": rejected.sum()}
        return LossSums(loss.sum(), metrics)


REWARD = Stage("reward", objective=lambda cfg: RewardModel(cfg.section(RewardConfig)), data_kinds=("pref",),
               plain_data="pref", section=RewardConfig, mixes=False,
               defaults=(("lr", 1e-4),),  # TRL's RewardConfig.learning_rate headline=(("acc", "accuracy"),),
               model=as_reward_model,
               summary="a reward model: a scalar head on a causal LM's trunk, Bradley-Terry on preference pairs")
