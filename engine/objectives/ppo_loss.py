"""PPO's math on tensors (RLHF with a learned critic, as TRL's PPOTrainer and OpenRLHF define it;
checked against a loop written from their formulas in tests/unit/test_ppo_loss.py).

Completions are rows of [B, T] tensors; their tokens are where `mask` is true (one contiguous
span a row). At completion token t, with logp the sampling policy's log-prob of the token, ref the
reference's and V the critic's value of the state before it:

    reward      r_t = -kl_coef (logp_t - ref_t)       + score, at the row's last completion token
    TD error    d_t = r_t + gamma V_{t+1} - V_t        (V = 0 after the last token)
    advantage   A_t = d_t + gamma lam A_{t+1}          (GAE; 0 after the last token)
    return      R_t = A_t + V_t
    whitened    A_t = (A_t - mean(A)) / sqrt(var(A) + 1e-8)   over the batch's completion tokens (var unbiased)

and the per-token losses, with ratio = exp(logp_new - logp) and v the critic's new value:

    policy      max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps))
    value       0.5 max((v - R)^2, (clip(v, V - cliprange_value, V + cliprange_value) - R)^2)
"""

from __future__ import annotations

import torch


def token_rewards(logps: torch.Tensor, ref_logps: torch.Tensor | None, scores: torch.Tensor, mask: torch.Tensor,
                  kl_coef: float) -> torch.Tensor:
    """Per-token rewards [B, T]: the KL penalty on each completion token, and each row's score
    [B] added at its last one (a row with no completion token gets nothing); 0 off the mask."""
    rewards = torch.zeros_like(logps)
    if kl_coef and ref_logps is not None:
        rewards = -kl_coef * (logps - ref_logps)
    rewards = rewards * mask
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask, positions, -1).amax(dim=1)
    has = last >= 0
    rows = torch.arange(mask.shape[0], device=mask.device)[has]
    rewards[rows, last[has]] += scores[has].to(rewards.dtype)
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) [B, T] by generalised advantage estimation, backwards over the
    positions; values and rewards off the mask count as 0 (so the state after a row's last
    token is worth nothing), and both results are 0 there."""
    values, rewards = values * mask, rewards * mask
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        following = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * following - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def masked_whiten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`values` centred and scaled to unit variance over the masked entries (unbiased variance,
    TRL's masked_whiten with shift_mean), 0 elsewhere; unchanged but centred when fewer than two."""
    mask = mask.to(values.dtype)
    count = mask.sum()
    mean = (values * mask).sum() / count.clamp(min=1.0)
    centred = (values - mean) * mask
    if count < 2:
        return centred
    variance = (centred ** 2).sum() / (count - 1)
    return centred * torch.rsqrt(variance + 1e-8)


def policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token clipped policy loss [B, T], where the clip took effect [B, T] bool)."""
    ratio = torch.exp(logps - old_logps)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - epsilon, 1.0 + epsilon)
    return torch.max(unclipped, clipped), clipped > unclipped


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               cliprange_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token clipped value loss [B, T], where the clipped term was the larger [B, T] bool)."""
    clipped_values = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    unclipped = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    return 0.5 * torch.max(unclipped, clipped), clipped > unclipped
