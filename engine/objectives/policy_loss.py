"""The GRPO family's math on tensors: group-relative advantages from rewards, and the per-token
clipped policy objective of each --rl-loss, with TRL's GRPOTrainer definitions (checked against
it in tests/unit/test_policy_loss.py).

Completions are rows; their completion tokens are where `mask` is true. For one completion of
a prompt's group of G, with r its reward:

    advantage  A = (r - mean(group)) / (std(group) + 1e-4)     --scale-rewards group (std unbiased)
                   (r - mean(group)) / (std(batch) + 1e-4)     batch
                    r - mean(group)                            none

and, per completion token t, with ratio = exp(logp - logp_old) (1 on the first update of a
rollout, where the old policy is the current one) and KL_t = exp(ref - logp) - (ref - logp) - 1
(the k3 estimator of KL(policy || reference)):

    grpo, dr_grpo, dapo, bnpo   l_t = -min(ratio A, clip(ratio, 1 - eps, 1 + eps_high) A) + beta KL_t
    cispo                       l_t = -min(ratio, eps_high).detach() A logp + beta KL_t

They differ in what the token losses are averaged over:

    grpo      each completion's mean over its tokens, then the mean over completions
    bnpo      the mean over the micro-batch's tokens (then over micro-batches)
    dr_grpo   the sum over a completion's tokens / --max-new-tokens, mean over completions
    dapo      the mean over every completion token of the step (all micro-batches and ranks)
    cispo     as dapo

The loop (engine.training.trainer) divides a step's summed loss by its units, counted over all
micro-batches and ranks; so dapo and cispo count completion tokens and the others completions,
and `summed_loss` returns the micro-batch's share in those units. With micro-batches of equal
size, each equals TRL's loss.
"""

from __future__ import annotations

import torch

LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo")
SCALE_REWARDS = ("group", "batch", "none")
TOKEN_LEVEL = ("dapo", "cispo")
"""The losses whose unit is a completion token; the others' is a completion."""


def nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Unbiased standard deviation ignoring NaNs (TRL's nanstd)."""
    mean = torch.nanmean(x, dim=dim, keepdim=dim is not None)
    count = (~torch.isnan(x)).sum(dim=dim) if dim is not None else (~torch.isnan(x)).sum()
    variance = torch.nanmean((x - mean) ** 2, dim=dim) * count / (count - 1)
    return variance.sqrt()


def group_advantages(rewards_per_fn: torch.Tensor, weights: torch.Tensor, group: int,
                     scale: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rewards [N], advantages [N], std [N]) of N completions in groups of `group` consecutive
    rows, from each reward function's scores [N, F] (NaN where a function returned None).

    A completion's reward is its weighted sum of the scores it has; one no function scored is
    left out of its group's mean and std and gets advantage 0. `std` is the one the advantage is
    scaled by (its group's, or the batch's), 0 for a group whose rewards are all equal."""
    if rewards_per_fn.shape[0] % group:
        raise ValueError(f"{rewards_per_fn.shape[0]} completions are not whole groups of {group}")
    unscorable = torch.isnan(rewards_per_fn).all(dim=1)
    rewards = (rewards_per_fn * weights.to(rewards_per_fn)).nansum(dim=1)
    rewards[unscorable] = torch.nan
    grouped = rewards.view(-1, group)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(group)
    if scale == "batch":
        std = (nanstd(rewards) if rewards.numel() > 1 else torch.zeros(())).expand_as(rewards)
    else:
        std = nanstd(grouped, dim=1).repeat_interleave(group) if group > 1 else torch.zeros_like(rewards)
    advantages = rewards - mean
    if scale != "none":
        advantages = advantages / (std + 1e-4)
    advantages = torch.nan_to_num(advantages, nan=0.0)
    return rewards, advantages, torch.nan_to_num(std, nan=0.0)


def per_token_loss(logps: torch.Tensor, old_logps: torch.Tensor | None, ref_logps: torch.Tensor | None,
                   advantages: torch.Tensor, *, loss_type: str, epsilon: float, epsilon_high: float,
                   beta: float) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(loss [B, T], KL [B, T] or None when beta is 0, ratio [B, T]) for log-probs [B, T] of the
    completion tokens under the policy being trained, the policy that sampled them (None: the
    same, detached) and the reference; advantages [B]."""
    old = logps.detach() if old_logps is None else old_logps
    ratio = torch.exp(logps - old)
    a = advantages[:, None]
    if loss_type == "cispo":
        loss = -torch.clamp(ratio, max=epsilon_high).detach() * a * logps
    elif loss_type in LOSS_TYPES:
        loss = -torch.min(ratio * a, torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high) * a)
    else:
        raise ValueError(f"unknown loss type {loss_type!r}: use {', '.join(LOSS_TYPES)}")
    kl = None
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta > 0 needs the reference's log-probs")
        kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
        loss = loss + beta * kl
    return loss, kl, ratio


def units(mask: torch.Tensor, loss_type: str) -> int:
    """A micro-batch's normalisation units: its completion tokens (dapo, cispo) or completions."""
    return int(mask.sum()) if loss_type in TOKEN_LEVEL else int(mask.shape[0])


def summed_loss(loss: torch.Tensor, mask: torch.Tensor, loss_type: str, max_new_tokens: int) -> torch.Tensor:
    """The micro-batch's loss summed over its units (see `units`), from per-token losses [B, T]
    and the completion-token mask [B, T]."""
    mask = mask.to(loss.dtype)
    per_token = loss * mask
    if loss_type == "grpo":
        return (per_token.sum(-1) / mask.sum(-1).clamp(min=1.0)).sum()
    if loss_type == "bnpo":
        return per_token.sum() / mask.sum().clamp(min=1.0) * mask.shape[0]
    if loss_type == "dr_grpo":
        return per_token.sum() / max_new_tokens
    return per_token.sum()


def clipped(ratio: torch.Tensor, advantages: torch.Tensor, loss_type: str, epsilon: float,
            epsilon_high: float) -> torch.Tensor:
    """Where the clip bound takes the gradient away [B, T] (bool): TRL's clip_ratio/region (and
    cispo's clip ratio)."""
    a = advantages[:, None]
    if loss_type == "cispo":
        return (ratio > epsilon_high) & (a > 0)
    return ((ratio < 1 - epsilon) & (a < 0)) | ((ratio > 1 + epsilon_high) & (a > 0))
