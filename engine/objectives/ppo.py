"""PPO with a learned critic (RLHF as in TRL's PPOTrainer and OpenRLHF): the policy samples a
completion of each prompt, the rewards score it (the same --reward-fn and --reward-model as
GRPO), and each completion token is pushed by its generalised advantage under a value model
trained beside the policy (engine.objectives.ppo_loss has the math).

The policy (actor) and the critic are one module (engine.objectives.actor_critic), so one
DeepSpeed engine and one optimizer train both, every checkpoint holds both, and final/ is the
actor alone; --lora-r adapts the actor alone (the critic trains in full). A step, on each rank,
is GRPO's (engine.objectives.grpo, whose rollout machinery this reuses: prompts per micro-batch,
seeded sampling, scoring, the rollout log, --num-iterations with its rollouts carried through
checkpoints), with the rollout's own part:

- the sampling policy's log-probs and the critic's values of the completion tokens, and with
  --kl-coef > 0 the reference's (the --init-from model) log-probs;
- per-token rewards: -kl_coef (logp - ref) on each token, plus the score (the weighted sum of
  the rewards; 0 for a completion no reward scored) at the last one;
- GAE (--gamma, --lam) into advantages and returns, the advantages whitened over the micro-batch's
  completion tokens (--whiten-advantages; TRL whitens over its rollout batch).

The loss per completion token is the clipped policy loss (--epsilon) plus --vf-coef times the
clipped value loss (--cliprange-value), averaged over every completion token of the step.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch

from common.errors import ZerotrainError
from engine.config.sections import flag, invalid
from engine.objectives.actor_critic import ACTOR, ActorCritic, actor_critic
from engine.objectives.base import Batch, LossSums, Stage, model_inputs
from engine.objectives.grpo import GroupRelative, RLConfig, summed_stats
from engine.objectives.ppo_loss import gae, masked_whiten, policy_loss, token_rewards, value_loss
from engine.objectives.tokens import token_logps, trained_tokens

if TYPE_CHECKING:
    from engine.config.tree import Config
    from engine.training.parts import RunPlan


@dataclass
class PPOConfig:
    """PPO (launcher/ppo.py): the critic, the KL penalty in the reward, GAE and the value loss. Rewards,
    sampling, --epsilon and --num-iterations are GRPO's flags (rl section)."""

    SECTION: ClassVar[str] = "ppo"

    kl_coef: float = 0.05
    """Per-token KL penalty in the reward, -kl_coef (logp - logp_ref) (TRL's kl_coef); 0 builds no reference model."""
    gamma: float = 1.0
    """Discount of later tokens' rewards in GAE."""
    lam: float = 0.95
    """GAE's lambda: 1 = Monte-Carlo returns (high variance), 0 = one-step TD (biased by the critic)."""
    vf_coef: float = 0.1
    """Weight of the value loss beside the policy loss."""
    cliprange_value: float = 0.2
    """The critic's new values are clipped to within this of the values at sampling in the value loss."""
    whiten_advantages: bool = True
    """Advantages centred and scaled to unit variance over the micro-batch's completion tokens."""
    critic_init: str = ""
    """The critic's weights: a reward model dir (a launcher/reward.py run's final/) with the run's tokenizer;
    default: the policy's own weights with a new value head."""

    def __post_init__(self) -> None:
        if self.kl_coef < 0:
            invalid(self, "kl_coef", self.kl_coef, "0 (no reference) or more")
        for name in ("gamma", "lam"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                invalid(self, name, getattr(self, name), "a number in [0, 1]")
        if self.vf_coef < 0:
            invalid(self, "vf_coef", self.vf_coef, "0 or more")
        if self.cliprange_value <= 0:
            invalid(self, "cliprange_value", self.cliprange_value, "a positive number")


GRPO_ONLY = ("rl_loss", "kl_beta", "epsilon_high", "scale_rewards", "mask_truncated_completions")
"""The rl section's fields PPO has no use for (its KL is --kl-coef, in the reward)."""


class Proximal(GroupRelative):
    """PPO's clipped policy and value losses over sampled completions, per completion token."""

    unit = "token"

    def __init__(self, rl: RLConfig, ppo: PPOConfig, seed: int, seq_len: int):
        super().__init__(rl, seed, seq_len)
        self.ppo = ppo
        self.engine: Any = None

    @property
    def uses_reference(self) -> bool:
        return bool(self.ppo.kl_coef)

    def check(self, cfg: Config, plan: RunPlan) -> None:
        defaults = RLConfig()
        given = [flag(f.name) for f in fields(RLConfig)
                 if f.name in GRPO_ONLY and getattr(self.rl, f.name) != getattr(defaults, f.name)]
        if given:
            raise ZerotrainError(f"{', '.join(given)}: GRPO's, not PPO's (its KL penalty is --kl-coef, in the reward; "
                                 "its loss is per token, clipped by --epsilon); drop them")
        super().check(cfg, plan)
        if self.ppo.critic_init:
            self.check_critic(plan)

    def check_critic(self, plan: RunPlan) -> None:
        """--critic-init names a model directory whose tokenizer, if it has one, maps text to the
        policy's ids (the critic reads the policy's tokens)."""
        from model.tokenizer import load_tokenizer, tokenizer_fingerprint

        directory = Path(self.ppo.critic_init)
        if not (directory / "config.json").is_file():
            raise ZerotrainError(f"--critic-init {directory}: no config.json there; use a reward model directory "
                                 "(a launcher/reward.py run's final/), or leave it out to start from the policy")
        if (directory / "tokenizer_config.json").is_file():
            theirs = tokenizer_fingerprint(load_tokenizer(str(directory)), chat_template=False)
            if theirs != tokenizer_fingerprint(plan.tokenizer, chat_template=False):
                raise ZerotrainError(f"--critic-init {directory} uses another tokenizer than the policy: the critic "
                                     "reads the policy's token ids, so both need the same tokenizer")

    def build(self, cfg: Config, plan: RunPlan, engine: Any, data) -> None:
        super().build(cfg, plan, engine, data)
        self.engine = engine

    def completion_logps(self, model: Any, batch: Batch, chunk: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        # The reference's: a frozen causal LM, or with LoRA the pair with the actor's adapter
        # disabled, of which only the actor runs (its values are not needed).
        lm = model.actor if isinstance(model, ActorCritic) else model
        return self.logps(lm(**model_inputs(batch)).logits, batch), torch.empty(0)

    def logps(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The completion tokens' log-probs at the sampling temperature, 0 elsewhere."""
        if self.rl.temperature != 1.0:
            logits = logits / self.rl.temperature
        return token_logps(logits, batch["labels"])

    # ----------------------------------------------------------------------- rollouts

    def rollouts(self, module: Any, prompts: list[Batch], step: int, seeds: list[int]
                 ) -> tuple[list[Batch], list[dict], list[dict]]:
        """Micro-batch by micro-batch: PPO's advantages are per token, within each completion."""
        done = [self.rollout(module, batch, step, seed) for batch, seed in zip(prompts, seeds)]
        return [train for train, _, _ in done], [row for _, rows, _ in done for row in rows], [s for *_, s in done]

    def rollout(self, module: Any, batch: Batch, step: int, seed: int) -> tuple[Batch, list[dict], dict]:
        """One micro-batch of prompts -> its training batch, rollout-log rows and statistics."""
        ppo = self.ppo
        drawn = self.draw(getattr(module, ACTOR), batch, step, seed)
        train = drawn.train
        mask = trained_tokens(train["labels"])
        with torch.no_grad():
            out = self.engine(**model_inputs(train))
            logps, values = self.logps(out.logits, train), out.state_values * mask
            ref = self.reference(train) if self.reference is not None else None
        # A completion no reward scored is worth 0.
        exact = (drawn.scores * self.weights).nansum(dim=1)
        scores = exact.to(logps)
        rewards = token_rewards(logps, ref, scores, mask, ppo.kl_coef)
        advantages, returns = gae(rewards, values, mask, ppo.gamma, ppo.lam)
        if ppo.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        train.update(old_logps=logps, old_values=values, advantages=advantages, returns=returns)

        kl = ((logps - ref) * mask).sum(-1) if ref is not None else torch.zeros_like(scores)
        first = mask.float().argmax(-1)  # each row's first completion token
        stat = {**self.draw_stats(drawn), "score": float(exact.sum()), "kl": float(kl.sum()),
                "tokens": float(mask.sum()), "values": float(values.sum()), "returns": float((returns * mask).sum())}
        rows = [{**row, "score": float(exact[r]), "kl": float(kl[r]), "value": float(values[r, first[r]]),
                 "return": float(returns[r, first[r]])} for r, row in enumerate(self.draw_rows(drawn, step))]
        return train, rows, stat

    def reduce_stats(self, stats: list[dict], device: torch.device) -> dict[str, float]:
        """The step's rollout metrics (TRL's PPO names), summed over micro-batches and ranks."""
        t = summed_stats(stats, device)
        n, tokens = t["completions"], max(t["tokens"], 1.0)
        return {"objective/scores": t["score"] / n, "objective/kl": t["kl"] / n,
                "objective/non_score_reward": -self.ppo.kl_coef * t["kl"] / n,
                "objective/rlhf_reward": (t["score"] - self.ppo.kl_coef * t["kl"]) / n,
                "val/values": t["values"] / tokens, "val/returns": t["returns"] / tokens, **self.draw_metrics(t)}

    # ----------------------------------------------------------------------- the loss

    def units(self, batch: Batch) -> int:
        return int(trained_tokens(batch["labels"]).sum())

    def loss(self, model: Callable[..., object], batch: Batch) -> LossSums:
        ppo = self.ppo
        out = model(**model_inputs(batch))
        logps = self.logps(out.logits, batch)
        mask = trained_tokens(batch["labels"])
        pg, pg_clipped = policy_loss(logps, batch["old_logps"], batch["advantages"], self.rl.epsilon)
        vf, vf_clipped = value_loss(out.state_values, batch["old_values"], batch["returns"], ppo.cliprange_value)
        weight = mask.float()
        loss = ((pg + ppo.vf_coef * vf) * weight).sum()
        with torch.no_grad():
            metrics = {"loss/policy": (pg * weight).sum(), "loss/value": (vf * weight).sum(),
                       "policy/clipfrac": (pg_clipped & mask).sum().float(),
                       "val/clipfrac": (vf_clipped & mask).sum().float(),
                       "policy/approxkl": (0.5 * (logps - batch["old_logps"]) ** 2 * weight).sum(),
                       "val/mean": (out.state_values * weight).sum()}
        return LossSums(loss, metrics)


PPO = Stage("ppo", objective=lambda cfg: Proximal(cfg.section(RLConfig), cfg.section(PPOConfig), cfg.train.seed,
                                                  cfg.data.seq_len),
            data_kinds=("prompt",), plain_data="prompt", section=PPOConfig, shares=(RLConfig,),
            # lr: TRL's on-policy configs' (GRPOConfig, RLOOConfig: 1e-6; TRL 1.16 has no PPOConfig left).
            # No LoRA dropout by default (TRL's PPO disables dropout): the rollout's forward, which
            # takes the old log-probs and values, and each update's would draw other masks, so a
            # rollout's first update would not have the ratio 1 it should.
            defaults=(("num_generations", 1), ("lr", 1e-6), ("lora_dropout", 0.0)), mixes=False,
            model=lambda model, cfg: actor_critic(model, cfg.section(PPOConfig).critic_init), exported=ACTOR,
            headline=(("score", "objective/scores"),),
            summary="reinforcement learning with a critic: PPO (GAE, clipped policy and value losses)")
