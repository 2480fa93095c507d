"""GRPO and its siblings (dr_grpo, dapo, bnpo, cispo): the policy samples G completions of each
prompt, reward functions score them, and each completion is pushed up or down by its advantage
over its group (engine.objectives.policy_loss has the math, equal to TRL's GRPOTrainer).

A step, with TRL's conventions (the batch size counts completions; the global batch holds whole
groups): the step's C = --micro-batch-size x --grad-accum x ranks completions are the G samples
of each of its C / G prompts in turn, the prompts the same on every rank (the next C / G of the
loader's stream); rank r's micro-batch i is the (i x ranks + r)-th block of --micro-batch-size of
them, so a group may span micro-batches and ranks (with --micro-batch-size a multiple of G, each
micro-batch holds whole groups). Each rank samples its micro-batches' completions (one sampling
stream per step, rank and micro-batch, seeded by the run's seed, so a resumed run samples the
same); the reward functions score them; the scores of the whole step are gathered from every
rank and advantages taken within each group (batch scaling over the whole step); with
--kl-beta > 0 the reference (the --init-from model, or the policy with its LoRA adapter
disabled) scores the completion tokens. The loop then trains on the completions as on any
batch: rows of prompt then completion, the completion tokens trained.

Under ZeRO-3 generation runs on the partitioned weights with the ranks in step (each keeps
running forwards until every rank's completions are done: engine.objectives.rollout.sample).

With --num-iterations 1 (the default) the policy samples from its current weights, so the
ratio to the "old" policy is 1 and only the advantage's sign and size move it. With
--num-iterations N (TRL's num_iterations), a step's rollouts are trained on again by the next
N - 1 steps, which draw no prompts: their log-probs under the policy that sampled them are taken
once, after sampling, and the ratio to them is clipped by --epsilon / --epsilon-high. A checkpoint
in the middle of such a cycle saves each rank's rollouts with it, so the resumed run trains on
the same ones.

The rollout log, RUN/rollouts.jsonl, holds every completion of each logged step (all ranks',
written by rank 0): its step, group, prompt, completion text and tokens, each function's reward,
the weighted reward and the advantage, so anyone can recompute the rewards and advantages.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import numpy as np
import torch

from common.errors import ZerotrainError
from engine.config.sections import choice, invalid, require_positive
from engine.data.format import IGNORE_INDEX
from engine.objectives.base import Batch, LossSums, Objective, Stage, model_inputs
from engine.objectives.policy_loss import (
    LOSS_TYPES,
    SCALE_REWARDS,
    TOKEN_LEVEL,
    clipped,
    group_advantages,
    nanstd,
    per_token_loss,
    summed_loss,
)
from engine.objectives.rewards import Reward, load_reward, score
from engine.objectives.tokens import token_logps, trained_tokens

if TYPE_CHECKING:
    from engine.config.tree import Config
    from engine.training.parts import Data, RunPlan


@dataclass
class RLConfig:
    """Reinforcement learning with rewards (launcher/grpo.py): sampling, rewards and the loss. launcher/ppo.py
    reads the rewards, sampling, --epsilon and --num-iterations too (engine.objectives.ppo)."""

    SECTION: ClassVar[str] = "rl"

    rl_loss: str = choice("grpo", LOSS_TYPES)
    """TRL's loss types (they differ in how token losses are averaged)."""
    reward_fn: list[str] = field(default_factory=list)
    """Reward functions: built-in accuracy, format or length, or PATH.py:NAME (TRL's signature); repeatable."""
    reward_model: str = ""
    """A reward model (a launcher/reward.py run's final/, or any HF sequence-classification model, one label): its
    score of prompt + completion is one more reward, after the --reward-fn ones."""
    reward_weights: list[float] = field(default_factory=list)
    """One weight per reward (each --reward-fn, then --reward-model; default: 1 each); the reward is the weighted sum."""
    num_generations: int = 8
    """Completions sampled per prompt (G), the group its advantage is taken in; a step's completions (micro-batch
    size x grad accum x ranks) must be whole groups (a group may span micro-batches and ranks)."""
    max_new_tokens: int = 256
    """Longest completion, in tokens; prompts are cut from the left to leave it room within --seq-len."""
    temperature: float = 1.0
    """Sampling temperature; the log-probs trained on are taken at the same temperature, as TRL does."""
    top_p: float = 1.0
    """Nucleus sampling: sample from the smallest set of tokens whose probability reaches top_p (1 = all)."""
    kl_beta: float = 0.0
    """Weight of the k3 KL to the reference in the loss (TRL's beta); 0 builds no reference model."""
    epsilon: float = 0.2
    """The ratio's lower clip bound is 1 - epsilon."""
    epsilon_high: float = 0.0
    """The upper clip bound is 1 + epsilon_high (0: the same as epsilon; DAPO uses 0.28); cispo's cap on the ratio
    (0: 5, MiniMax-M1's)."""
    scale_rewards: str = choice("group", SCALE_REWARDS)
    """group: advantages divided by their group's std, batch: by the whole step's std, none: not divided (Dr. GRPO)."""
    mask_truncated_completions: bool = False
    """Leave completions that hit --max-new-tokens without an end out of the loss (DAPO)."""
    num_iterations: int = 1
    """Optimizer steps per rollout (TRL's num_iterations): the next N - 1 steps train on a step's completions again,
    clipped against the policy that sampled them; prompts are drawn every N steps."""

    def __post_init__(self) -> None:
        for name in ("num_generations", "max_new_tokens", "temperature", "num_iterations"):
            require_positive(self, name)
        if not 0.0 < self.top_p <= 1.0:
            invalid(self, "top_p", self.top_p, "a number in (0, 1]")
        if self.kl_beta < 0:
            invalid(self, "kl_beta", self.kl_beta, "0 (no reference) or more")
        if not 0.0 < self.epsilon < 1.0:
            invalid(self, "epsilon", self.epsilon, "a number in (0, 1)")
        if self.epsilon_high < 0:
            invalid(self, "epsilon_high", self.epsilon_high, "0 (the same as epsilon) or more")
        rewards = len(self.reward_fn) + bool(self.reward_model)
        if self.reward_weights and len(self.reward_weights) != rewards:
            invalid(self, "reward_weights", self.reward_weights,
                    f"one weight per reward ({rewards}: each --reward-fn, then --reward-model)")

    @property
    def clip_high(self) -> float:
        return self.epsilon_high or (5.0 if self.rl_loss == "cispo" else self.epsilon)


@dataclass
class Drawn:
    """A micro-batch's completions as sampled and scored (GroupRelative.draw)."""

    train: Batch
    """Rows of prompt then completion (input_ids, attention_mask, position_ids, labels on the trained tokens)."""
    prompts: list
    texts: list[str]
    scores: torch.Tensor
    """Each reward's score [rows, rewards] (float64, NaN where a function gave None)."""
    lengths: torch.Tensor
    """Completion tokens of each row [rows], its stop token included."""
    truncated: torch.Tensor
    """Rows that hit --max-new-tokens without a stop token [rows]."""
    groups: torch.Tensor
    """Each row's prompt index [rows]."""


class GroupRelative(Objective):
    """The GRPO family's loss over sampled completions."""

    unit = "sequence"

    def __init__(self, rl: RLConfig, seed: int, seq_len: int):
        self.rl, self.seed, self.seq_len = rl, seed, seq_len
        self.rewards: list[Reward] = [load_reward(spec) for spec in rl.reward_fn]
        self.weights = torch.tensor(rl.reward_weights or [1.0] * (len(self.rewards) + bool(rl.reward_model)),
                                    dtype=torch.float64)
        self.reference: Callable[[Batch], torch.Tensor] | None = None
        self.prompts = None  # the training prompts' records (engine.data.prompts.PromptDataset)
        self.tokenizer = None
        self.metrics: dict[str, float] = {}
        self.log_path = None
        self.log_interval = 0
        # --num-iterations > 1: the rollouts of the cycle's first step, kept for its later steps.
        self.kept: list[Batch] | None = None
        self.last_step = 0
        self.loader = self.collate = None  # the prompts' stream (engine.data.loader.BatchLoader), its collate
        self.grad_accum = 1

    # ----------------------------------------------------------------------- set-up

    def check(self, cfg: Config, plan: RunPlan) -> None:
        rl, mbs = self.rl, cfg.train.micro_batch_size
        if not rl.reward_fn and not rl.reward_model:
            raise ZerotrainError("no reward: pass --reward-fn (accuracy, format, length or PATH.py:NAME; repeatable) "
                                 "or --reward-model DIR")
        completions = mbs * cfg.train.grad_accum * plan.world_size
        if completions % rl.num_generations:
            raise ZerotrainError(f"a step's {completions} completions (--micro-batch-size {mbs} x --grad-accum "
                                 f"{cfg.train.grad_accum} x {plan.world_size} ranks) must hold whole groups of "
                                 f"--num-generations {rl.num_generations}: make that product a multiple of it")
        if rl.max_new_tokens >= cfg.data.seq_len:
            raise ZerotrainError(f"--max-new-tokens {rl.max_new_tokens} leaves no room for a prompt within --seq-len "
                                 f"{cfg.data.seq_len}: raise --seq-len or lower --max-new-tokens")
        if cfg.data.pack:
            raise ZerotrainError("--pack: RL batches are prompts and their completions, one row each; drop --pack")

    def build(self, cfg: Config, plan: RunPlan, engine: Any, data: Data) -> None:
        from engine.config.deepspeed import zero_stage
        from engine.distributed import log_on_rank0, world
        from engine.objectives.reference import reference_logps
        from engine.objectives.rollout import stop_ids

        self.tokenizer, self.prompts = plan.tokenizer, data.train
        self.stop_ids, self.pad_id = stop_ids(plan.tokenizer), plan.tokenizer.pad_token_id
        self.zero3 = zero_stage(plan.ds_config) == 3
        self.log_path, self.log_interval = plan.run.rollouts, cfg.train.log_interval
        # Each step draws its prompts from the loader's stream itself (step_prompts).
        self.loader, self.collate = data.loader, data.collate
        self.micro_batch_size, self.grad_accum = cfg.train.micro_batch_size, cfg.train.grad_accum
        if data.val is not None:
            log_on_rank0(world().rank, "validation: none for RL runs (their held-out measure is a reward, not a loss)")
            data.val = None
        if "accuracy" in [reward.name for reward in self.rewards] and len(data.train):
            from engine.objectives.rewards import ANSWER_COLUMNS

            _, columns = data.train.record(0)
            if not any(name in columns for name in ANSWER_COLUMNS):
                raise ZerotrainError(f"--reward-fn accuracy reads the right answer from a column named "
                                     f"{' or '.join(ANSWER_COLUMNS)}, but the prompts' columns are {sorted(columns)}; "
                                     "add one to the data, or pick other reward functions")
        if self.rl.reward_model:
            from engine.config.precision import DTYPES
            from engine.objectives.rewards import ModelReward

            model = ModelReward(self.rl.reward_model, engine.device, DTYPES[plan.precision],
                                zero3_config=plan.ds_config if self.zero3 else None)
            self.rewards.append(Reward("reward_model", model))
            shards = sum(hasattr(p, "ds_id") for p in model.model.parameters())  # DeepSpeed marks what it partitions
            log_on_rank0(world().rank, f"reward model {self.rl.reward_model}: "
                         + (f"{shards} tensors partitioned over {world().size} ranks (ZeRO-3)" if shards
                            else "whole on every rank"))
        if self.uses_reference:
            self.reference = reference_logps(cfg, plan, engine, "", self.completion_logps)

    @property
    def uses_reference(self) -> bool:
        """Whether the objective needs the reference's log-probs (GRPO: for its KL term)."""
        return bool(self.rl.kl_beta)

    def completion_logps(self, model: Any, batch: Batch, chunk: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probs [rows, positions] of the completion tokens at the sampling temperature, 0
        elsewhere; the logits), the policy's and the reference's alike."""
        logits = model(**model_inputs(batch)).logits
        if self.rl.temperature != 1.0:
            logits = logits / self.rl.temperature
        return token_logps(logits, batch["labels"]), logits

    # ----------------------------------------------------------------------- rollouts

    def draws_data(self, step: int) -> bool:
        return False  # step_batches draws the step's prompts for every rank at once (step_prompts)

    def samples(self, step: int) -> bool:
        """Whether step `step` samples (the first of each --num-iterations cycle) or trains on the
        cycle's rollouts again."""
        return (step - 1) % self.rl.num_iterations == 0

    def step_prompts(self) -> list[Batch]:
        """This rank's micro-batches of the step's prompts, one row per completion to sample: the
        step's C completions are the G samples of each of the next C / G prompts of the loader's
        stream in turn, and micro-batch i of rank r is their (i x ranks + r)-th block of
        --micro-batch-size (TRL's order: with a micro-batch size that G divides, the blocks of
        whole groups the loader gave each rank and micro-batch before)."""
        from engine.distributed import world

        ranks, rank = world().size, world().rank
        mbs, g = self.micro_batch_size, self.rl.num_generations
        indices = self.loader.sampler.take(mbs * self.grad_accum * ranks // g)
        return [self.collate([self.prompts[indices[k // g]] for k in range(block * mbs, (block + 1) * mbs)])
                for block in (i * ranks + rank for i in range(self.grad_accum))]

    def step_batches(self, model: Any, batches: list[Batch], step: int) -> list[Batch]:
        from engine.distributed import world

        self.last_step = step
        if not self.samples(step):
            if self.kept is None:
                raise RuntimeError(f"step {step} reuses rollouts that were never made")
            return self.kept  # the metrics stay the rollout's: they describe what is trained on
        rank = world().rank
        module = getattr(model, "module", model)
        device = next(module.parameters()).device
        prompts = [{k: v.to(device) for k, v in batch.items()} for batch in self.step_prompts()]
        seeds = [int(np.random.default_rng([self.seed, 0x7270, step, rank, i]).integers(2 ** 62))
                 for i in range(len(prompts))]
        out, logged, stats = self.rollouts(module, prompts, step, seeds)
        self.metrics = self.reduce_stats(stats, device)
        if self.log_interval and step % self.log_interval == 0:
            self.write_log(logged, rank)
        self.kept = None
        if self.rl.num_iterations > 1:
            # The sampling policy's log-probs, for the ratio of this cycle's later updates (the
            # first's ratio is 1 all the same: the same weights score the same tokens).
            with torch.no_grad():
                for train in out:
                    if "old_logps" not in train:  # PPO's rollouts have them already
                        train["old_logps"] = self.completion_logps(model, train)[0]
            self.kept = out
        return out

    def rollouts(self, module: Any, prompts: list[Batch], step: int, seeds: list[int]
                 ) -> tuple[list[Batch], list[dict], list[dict]]:
        """This rank's micro-batches of prompts (a row per completion) -> their training batches,
        rollout-log rows and statistics. Advantages are taken over groups that may span
        micro-batches and ranks: every micro-batch is sampled and scored first, then the scores of
        the whole step are gathered from every rank."""
        from engine.distributed import world

        g, rank, ranks = self.rl.num_generations, world().rank, world().size
        drawn = [self.draw(module, batch, step, seed) for batch, seed in zip(prompts, seeds)]
        mine = torch.cat([d.scores for d in drawn])  # [micro-batches x mbs, rewards], block by block
        every = _all_gathered(mine)  # [ranks, ...]: micro-batch i of rank r is block i x ranks + r
        mbs = self.micro_batch_size
        blocks = every.view(ranks, len(drawn), mbs, -1).transpose(0, 1).reshape(-1, mine.shape[-1])
        rewards, advantages, _ = group_advantages(blocks, self.weights, g, self.rl.scale_rewards)
        # frac_reward_zero_std counts groups whose rewards are all equal, whatever the scaling (TRL).
        flat = torch.nan_to_num(nanstd(rewards.view(-1, g), dim=1), nan=0.0) == 0
        out, logged, stats = [], [], []
        for i, d in enumerate(drawn):
            ks = torch.arange((i * ranks + rank) * mbs, (i * ranks + rank + 1) * mbs)  # its completions' places
            train = {**d.train, "advantages": advantages[ks].to(d.train["input_ids"].device, torch.float32)}
            if self.reference is not None:
                train["ref_logps"] = self.reference(train)
            heads = ks[ks % g == 0]  # the groups counted here: those whose first completion this is
            stats.append({**self.draw_stats(d), "reward": float(torch.nansum(rewards[ks])),
                          "reward_sq": float(torch.nansum(rewards[ks] ** 2)),
                          "scored": float((~torch.isnan(rewards[ks])).sum()),
                          "zero_std_groups": float(flat[heads // g].sum()), "groups": len(heads)})
            logged.extend({**row, "reward": _finite(rewards[k]), "advantage": float(advantages[k])}
                          for k, row in zip(ks.tolist(), self.draw_rows(d, step)))
            out.append(train)
        return out, logged, stats

    def state_dict(self) -> dict[str, Any]:
        if self.kept is None or self.last_step % self.rl.num_iterations == 0:
            return {}  # the cycle is complete: the next step samples anew
        return {"rollouts": [{k: v.cpu() for k, v in batch.items()} for batch in self.kept],
                "metrics": self.metrics, "step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.kept, self.metrics, self.last_step = state["rollouts"], state["metrics"], state["step"]

    def draw(self, module: Any, batch: Batch, step: int, seed: int) -> Drawn:
        """One micro-batch of prompts, a row per completion, each sampled from `module` and scored
        by every reward: the rollout before its advantages, shared with PPO."""
        from engine.objectives.rollout import sample

        rl = self.rl
        room = self.seq_len - rl.max_new_tokens
        prompt_ids, prompt_mask = batch["prompt_ids"][:, -room:], batch["prompt_mask"][:, -room:]
        completions = sample(module, prompt_ids, prompt_mask, max_new_tokens=rl.max_new_tokens,
                             temperature=rl.temperature, top_p=rl.top_p, stop_ids=self.stop_ids, pad_id=self.pad_id,
                             seed=seed, synced=self.zero3)
        mask = completions.mask
        if rl.mask_truncated_completions:
            mask = mask & ~completions.truncated[:, None]
        records = [self.prompts.record(int(i)) for i in batch["index"]]
        prompts = [prompt for prompt, _ in records]
        names = sorted({name for _, columns in records for name in columns})
        columns = {name: [cols.get(name) for _, cols in records] for name in names}
        ids = [row[m].tolist() for row, m in zip(completions.ids, completions.mask)]
        texts = self.tokenizer.batch_decode([[t for t in row if t not in self.stop_ids] for row in ids],
                                            skip_special_tokens=True)
        given = [[{"role": "assistant", "content": text}] if isinstance(prompt, list) else text
                 for prompt, text in zip(prompts, texts)]
        scores = score(self.rewards, prompts, given, ids, columns, step)

        width = prompt_ids.shape[1]
        input_ids = torch.cat([prompt_ids, completions.ids], dim=1)
        attention = torch.cat([prompt_mask, completions.mask.long()], dim=1)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        labels[:, width:] = torch.where(mask, completions.ids, IGNORE_INDEX)
        # Positions as generate() gave them: counted from each row's first prompt token.
        position_ids = (attention.cumsum(-1) - 1).masked_fill(attention == 0, 1)
        train = {"input_ids": input_ids, "attention_mask": attention, "position_ids": position_ids, "labels": labels}
        return Drawn(train, prompts, texts, scores, completions.mask.sum(-1), completions.truncated, batch["index"])

    def draw_stats(self, drawn: Drawn) -> dict[str, float]:
        """A rollout's statistics that GRPO and PPO share: completions, their lengths, and each
        reward's sum and count."""
        stat = {"completions": len(drawn.texts), "length": float(drawn.lengths.sum()),
                "truncated": float(drawn.truncated.sum())}
        for j, reward in enumerate(self.rewards):
            fn = drawn.scores[:, j]
            stat[f"rewards/{reward.name}/sum"] = float(torch.nansum(fn))
            stat[f"rewards/{reward.name}/count"] = float((~torch.isnan(fn)).sum())
        return stat

    def draw_rows(self, drawn: Drawn, step: int) -> list[dict]:
        """The rollout log's rows of a rollout, before each objective's own fields."""
        return [{"step": step, "group": int(drawn.groups[r]), "prompt": drawn.prompts[r],
                 "completion": drawn.texts[r], "completion_tokens": int(drawn.lengths[r]),
                 "rewards": {reward.name: _finite(drawn.scores[r, j]) for j, reward in enumerate(self.rewards)}}
                for r in range(len(drawn.texts))]

    def reduce_stats(self, stats: list[dict], device: torch.device) -> dict[str, float]:
        """The step's rollout metrics (TRL's names), summed over micro-batches and ranks."""
        t = summed_stats(stats, device)
        scored = max(t["scored"], 1.0)
        mean = t["reward"] / scored
        return {"reward": mean,
                "reward_std": float(np.sqrt(max(t["reward_sq"] / scored - mean ** 2, 0.0)
                                            * scored / max(scored - 1.0, 1.0))),
                **self.draw_metrics(t), "frac_reward_zero_std": t["zero_std_groups"] / t["groups"]}

    def draw_metrics(self, t: dict[str, float]) -> dict[str, float | None]:
        """The metrics of draw_stats' sums over the step: completion lengths and each reward's mean."""
        metrics: dict[str, float | None] = {"completions/mean_length": t["length"] / t["completions"],
                                            "completions/clipped_ratio": t["truncated"] / t["completions"]}
        for reward in self.rewards:
            count = t[f"rewards/{reward.name}/count"]
            metrics[f"rewards/{reward.name}/mean"] = t[f"rewards/{reward.name}/sum"] / count if count else None
        return metrics

    def step_metrics(self) -> dict[str, float]:
        return self.metrics

    def write_log(self, rows: list[dict], rank: int) -> None:
        """Every rank's rows of this step, appended to the rollout log by rank 0."""
        import torch.distributed as dist

        if dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, rows)
            rows = [row for part in gathered for row in part]
        if rank == 0:
            with open(self.log_path, "a") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")

    # ----------------------------------------------------------------------- the loss

    def units(self, batch: Batch) -> int:
        mask = trained_tokens(batch["labels"])
        return int(mask.sum()) if self.rl.rl_loss in TOKEN_LEVEL else int(mask.shape[0])

    def loss(self, model: Callable[..., object], batch: Batch) -> LossSums:
        rl = self.rl
        logps, logits = self.completion_logps(model, batch)
        mask = trained_tokens(batch["labels"])
        losses, kl, ratio = per_token_loss(logps, batch.get("old_logps"), batch.get("ref_logps"),
                                           batch["advantages"], loss_type=rl.rl_loss, epsilon=rl.epsilon,
                                           epsilon_high=rl.clip_high, beta=rl.kl_beta)
        loss = summed_loss(losses, mask, rl.rl_loss, rl.max_new_tokens)
        with torch.no_grad():
            chosen = logits[mask].float()
            entropy = torch.zeros_like(logps)
            entropy[mask] = torch.logsumexp(chosen, -1) - (chosen.softmax(-1) * chosen).sum(-1)
            metrics = {"entropy": self.per_unit(entropy, mask)}
            metrics["clip_ratio/region_mean"] = self.per_unit(
                clipped(ratio, batch["advantages"], rl.rl_loss, rl.epsilon, rl.clip_high).float(), mask)
            if kl is not None:
                metrics["kl"] = self.per_unit(kl.detach(), mask)
        return LossSums(loss, metrics)

    def per_unit(self, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """A per-token quantity summed in the loss's units: over tokens for the token-level
        losses, as each completion's mean for the others (the loop divides by the units)."""
        values = values * mask
        if self.rl.rl_loss in TOKEN_LEVEL:
            return values.sum()
        return (values.sum(-1) / mask.sum(-1).clamp(min=1)).sum()


def _all_gathered(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` (the same shape on every rank) from every rank, stacked in rank order."""
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return tensor[None]
    from engine.distributed import comm_device

    local = tensor.to(comm_device())
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local)
    return torch.stack(parts).to(tensor.device)


def summed_stats(stats: list[dict], device: torch.device) -> dict[str, float]:
    """Rollout statistics summed over a step's micro-batches, then over the ranks."""
    from engine.distributed import all_reduce_sums

    sums: dict[str, float] = {}
    for stat in stats:
        for k, v in stat.items():
            sums[k] = sums.get(k, 0.0) + v
    return all_reduce_sums(sums, device)


def _finite(value: torch.Tensor) -> float | None:
    value = float(value)
    return None if np.isnan(value) else value


# lr: TRL's GRPOConfig.learning_rate. No LoRA dropout by default: with --num-iterations > 1 the
# sampling policy's log-probs and each update's would draw other dropout masks (PPO's reason too).
GRPO = Stage("grpo", defaults=(("lr", 1e-6), ("lora_dropout", 0.0)),
             objective=lambda cfg: GroupRelative(cfg.section(RLConfig), cfg.train.seed, cfg.data.seq_len),
             data_kinds=("prompt",), plain_data="prompt", section=RLConfig, mixes=False,
             headline=(("reward", "reward"),),
             summary="reinforcement learning with rewards: GRPO, Dr. GRPO, DAPO, BNPO, CISPO")
