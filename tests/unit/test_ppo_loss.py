"""PPO's math (engine.objectives.ppo_loss) against a plain loop over rows and tokens written from
the published formulas of TRL's PPOTrainer (trl/trainer/ppo_trainer.py, v0.11-0.19: rewards =
-kl_coef (logp - ref_logp) with the score at the last completion token, the GAE loop with
`lastgaelam`, returns = advantages + values, `masked_whiten`, the clipped policy and value
losses), on fixed random tensors with padding, in fp64; and the gradients' signs."""

from __future__ import annotations

import math

import pytest
import torch

from engine.objectives.ppo_loss import gae, masked_whiten, policy_loss, token_rewards, value_loss

GAMMA, LAM, KL_COEF, EPS, VCLIP = 0.97, 0.9, 0.05, 0.2, 0.2


def batch(seed: int = 0):
    """5 rows of 9 positions: a prompt, then completions of different lengths (one empty), padding after."""
    g = torch.Generator().manual_seed(seed)
    starts, ends = [2, 3, 1, 4, 2], [8, 5, 9, 4, 3]  # completion tokens at [start, end)
    mask = torch.zeros(5, 9, dtype=torch.bool)
    for r, (s, e) in enumerate(zip(starts, ends)):
        mask[r, s:e] = True
    rand = lambda: torch.randn(5, 9, generator=g, dtype=torch.float64)  # noqa: E731
    return (mask, rand() - 2, rand() - 2, rand(), torch.randn(5, generator=g, dtype=torch.float64), rand(), rand())


def reference(mask, logps, ref, values, scores):
    """Rewards, advantages and returns, one row and one token at a time."""
    rows, width = mask.shape
    rewards = torch.zeros(rows, width, dtype=torch.float64)
    advantages = torch.zeros_like(rewards)
    returns = torch.zeros_like(rewards)
    for r in range(rows):
        tokens = [t for t in range(width) if mask[r, t]]
        if not tokens:
            continue
        for t in tokens:
            rewards[r, t] = -KL_COEF * (float(logps[r, t]) - float(ref[r, t]))
        rewards[r, tokens[-1]] += float(scores[r])
        lastgaelam = 0.0
        for i in reversed(range(len(tokens))):
            t = tokens[i]
            next_value = float(values[r, tokens[i + 1]]) if i + 1 < len(tokens) else 0.0
            delta = float(rewards[r, t]) + GAMMA * next_value - float(values[r, t])
            lastgaelam = delta + GAMMA * LAM * lastgaelam
            advantages[r, t] = lastgaelam
            returns[r, t] = lastgaelam + float(values[r, t])
    return rewards, advantages, returns


def whitened(x, mask):
    picked = [float(v) for v, m in zip(x.flatten(), mask.flatten()) if m]
    mean = sum(picked) / len(picked)
    var = sum((v - mean) ** 2 for v in picked) / (len(picked) - 1)
    out = torch.zeros_like(x)
    out[mask] = (x[mask] - mean) / math.sqrt(var + 1e-8)
    return out


def test_rewards_gae_and_whitening_equal_the_loop():
    mask, logps, ref, values, scores, _, _ = batch()
    rewards = token_rewards(logps, ref, scores, mask, KL_COEF)
    advantages, returns = gae(rewards, values, mask, GAMMA, LAM)
    want_rewards, want_adv, want_ret = reference(mask, logps, ref, values, scores)
    torch.testing.assert_close(rewards, want_rewards, rtol=0, atol=1e-12)
    torch.testing.assert_close(advantages, want_adv, rtol=0, atol=1e-12)
    torch.testing.assert_close(returns, want_ret, rtol=0, atol=1e-12)
    torch.testing.assert_close(masked_whiten(advantages, mask), whitened(want_adv, mask), rtol=0, atol=1e-12)
    # fp32, as training runs it
    adv32, ret32 = gae(token_rewards(logps.float(), ref.float(), scores.float(), mask, KL_COEF), values.float(),
                       mask, GAMMA, LAM)
    torch.testing.assert_close(adv32.double(), want_adv, rtol=0, atol=1e-5)
    torch.testing.assert_close(ret32.double(), want_ret, rtol=0, atol=1e-5)


def test_padding_never_leaks_into_the_completion_tokens():
    """Values and rewards off the mask (garbage here) change nothing on it, and the results are 0 there."""
    mask, logps, ref, values, scores, _, _ = batch()
    noisy = values + 100.0 * (~mask)
    rewards = token_rewards(logps + 7.0 * (~mask), ref, scores, mask, KL_COEF)
    advantages, returns = gae(rewards, noisy, mask, GAMMA, LAM)
    want_adv, want_ret = gae(token_rewards(logps, ref, scores, mask, KL_COEF), values, mask, GAMMA, LAM)
    torch.testing.assert_close(advantages, want_adv)
    torch.testing.assert_close(returns, want_ret)
    assert not advantages[~mask].any() and not returns[~mask].any() and not rewards[~mask].any()


def test_the_clipped_losses_equal_the_loop():
    mask, logps, _, old_values, _, new_values, returns = batch(1)
    g = torch.Generator().manual_seed(2)
    old_logps = logps + 0.3 * torch.randn(logps.shape, generator=g, dtype=torch.float64)
    advantages = torch.randn(logps.shape, generator=g, dtype=torch.float64)
    pg, pg_clipped = policy_loss(logps, old_logps, advantages, EPS)
    vf, vf_clipped = value_loss(new_values, old_values, returns, VCLIP)
    for r, t in mask.nonzero().tolist():
        ratio = math.exp(float(logps[r, t] - old_logps[r, t]))
        a = float(advantages[r, t])
        want = max(-a * ratio, -a * min(max(ratio, 1 - EPS), 1 + EPS))
        assert float(pg[r, t]) == pytest.approx(want, abs=1e-12)
        assert bool(pg_clipped[r, t]) == (-a * min(max(ratio, 1 - EPS), 1 + EPS) > -a * ratio)
        v, v_old, ret = float(new_values[r, t]), float(old_values[r, t]), float(returns[r, t])
        v_clip = min(max(v, v_old - VCLIP), v_old + VCLIP)
        assert float(vf[r, t]) == pytest.approx(0.5 * max((v - ret) ** 2, (v_clip - ret) ** 2), abs=1e-12)
        assert bool(vf_clipped[r, t]) == ((v_clip - ret) ** 2 > (v - ret) ** 2)
    assert pg_clipped[mask].any() and vf_clipped[mask].any()  # the clips are exercised


def test_gradients_push_the_right_way():
    """A positive advantage raises its token's log-prob, the value moves toward the return, and a
    clipped term passes no gradient."""
    logps = torch.zeros(1, 3, dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[0.0, -0.5, 0.5]], dtype=torch.float64)  # ratios 1, e^0.5 (clipped for A > 0), e^-0.5
    advantages = torch.tensor([[1.0, 1.0, -1.0]], dtype=torch.float64)
    policy_loss(logps, old, advantages, EPS)[0].sum().backward()
    assert logps.grad[0, 0] < 0 and logps.grad[0, 1] == 0 and logps.grad[0, 2] == 0
    values = torch.tensor([[0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    value_loss(values, torch.tensor([[0.0, 0.1]], dtype=torch.float64), torch.tensor([[1.0, -1.0]],
               dtype=torch.float64), VCLIP)[0].sum().backward()
    assert values.grad[0, 0] < 0 and values.grad[0, 1] > 0  # descent moves each toward its return
