"""engine.objectives.policy_loss against TRL's GRPOTrainer: the same log-probs, advantages and
masks give the same loss and gradient for every --rl-loss, with and without the KL term and old
log-probs; group advantages as TRL's reward normalisation defines them."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from engine.objectives.policy_loss import (
    LOSS_TYPES,
    clipped,
    group_advantages,
    per_token_loss,
    summed_loss,
    units,
)

B, T = 6, 7


def trl_loss(loss_type: str, beta: float, logps, old, ref, advantages, mask, eps=0.2, eps_high=0.28):
    """TRL's GRPOTrainer._compute_loss on these tensors: a trainer with only the attributes that
    method reads (one process, no accumulation), its model forward replaced by the log-probs."""
    from trl import GRPOTrainer

    t = GRPOTrainer.__new__(GRPOTrainer)
    t.__dict__.update(
        loss_type=loss_type, beta=beta, epsilon_low=eps, epsilon_high=eps_high, top_entropy_quantile=1.0,
        off_policy_mask_threshold=None, importance_sampling_level="token", use_vllm=False,
        vllm_importance_sampling_correction=False, _entropy_bonus_enabled=False, aux_loss_enabled=False,
        current_gradient_accumulation_steps=1, max_completion_length=T, model=SimpleNamespace(training=True),
        args=SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1),
        accelerator=SimpleNamespace(num_processes=1, gather=lambda x: x, gather_for_metrics=lambda x: x,
                                    reduce=lambda x, reduction: x),
        _metrics={"train": defaultdict(list)})
    t._get_per_token_logps_and_entropies = lambda *args, **kwargs: (logps, torch.zeros_like(logps), None)
    inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask.long(),
              "advantages": advantages, "num_items_in_batch": mask.sum()}
    if old is not None:
        inputs["old_per_token_logps"] = old
    if beta:
        inputs["ref_per_token_logps"] = ref
    return t._compute_loss(None, inputs), t._metrics["train"]


def tensors(seed: int):
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = logps + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)  # ratios well outside the clip
    ref = logps + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    advantages = torch.randn(B, generator=g, dtype=torch.float64)
    lengths = torch.tensor([7, 3, 1, 5, 7, 2])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return logps, old, ref, advantages, mask


@pytest.mark.parametrize("with_old", [False, True], ids=["first-update", "old-logps"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_and_gradient_equal_trl(loss_type, beta, with_old):
    logps, old, ref, advantages, mask = tensors(3)
    old = old if with_old else None
    ours_in = logps.clone().requires_grad_()
    theirs_in = logps.clone().requires_grad_()
    loss, kl, ratio = per_token_loss(ours_in, old, ref, advantages, loss_type=loss_type, epsilon=0.2,
                                     epsilon_high=0.28, beta=beta)
    # One micro-batch on one rank: the loop divides the summed loss by the micro-batch's units.
    ours = summed_loss(loss, mask, loss_type, max_new_tokens=T) / units(mask, loss_type)
    theirs, metrics = trl_loss(loss_type, beta, theirs_in, old, ref, advantages, mask)
    assert float(ours.detach()) == pytest.approx(float(theirs.detach()), rel=1e-6, abs=1e-9)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours_in.grad, theirs_in.grad, rtol=1e-6, atol=1e-9)
    if with_old:
        assert ours_in.grad.abs().sum() > 0  # clipping leaves some gradient
    share = float(clipped(ratio, advantages, loss_type, 0.2, 0.28)[mask].double().mean())
    name = "cispo_clip_ratio" if loss_type == "cispo" else "clip_ratio/region_mean"
    assert share == pytest.approx(metrics[name][0], rel=1e-6)  # TRL counts in float32
    if with_old and loss_type != "cispo":
        assert 0 < share < 1  # the ratios are spread over both sides of the clip
    if beta:
        assert float(kl[mask].mean()) == pytest.approx(metrics["kl"][0], rel=1e-6)


def test_summed_losses_over_micro_batches_are_the_step_loss():
    """The loop sums micro-batches' losses and divides once by the step's units: for dapo that is
    the mean over all the step's completion tokens, however the tokens fall into micro-batches."""
    logps, old, ref, advantages, mask = tensors(5)
    loss, _, _ = per_token_loss(logps, old, ref, advantages, loss_type="dapo", epsilon=0.2, epsilon_high=0.28, beta=0.0)
    halves = [slice(0, 2), slice(2, B)]
    summed = sum(summed_loss(loss[h], mask[h], "dapo", T) for h in halves) / sum(units(mask[h], "dapo") for h in halves)
    assert float(summed) == pytest.approx(float((loss * mask).sum() / mask.sum()), rel=1e-12)


def test_group_advantages():
    """Rewards of two functions weighted and summed; each group of 3 normalised by its own mean
    and unbiased std (+1e-4); a group of equal rewards gets advantage 0 and std 0; a completion no
    function scored is out of its group's statistics and gets 0."""
    nan = float("nan")
    scores = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0],     # rewards 1, 0, 1.5
                           [2.0, 0.0], [2.0, 0.0], [2.0, 0.0],     # all 2
                           [1.0, nan], [nan, nan], [3.0, nan]])    # 1, unscored, 3
    rewards, advantages, std = group_advantages(scores, torch.tensor([1.0, 0.5]), 3, "group")
    first = torch.tensor([1.0, 0.0, 1.5])
    expected = (first - first.mean()) / (first.std() + 1e-4)
    torch.testing.assert_close(advantages[:3], expected)
    assert advantages[3:6].abs().max() == 0 and std[3:6].abs().max() == 0
    last = torch.tensor([1.0, 3.0])
    torch.testing.assert_close(advantages[[6, 8]], (last - 2.0) / (last.std() + 1e-4))
    assert advantages[7] == 0 and torch.isnan(rewards[7])
    _, none, _ = group_advantages(scores, torch.tensor([1.0, 0.5]), 3, "none")
    torch.testing.assert_close(none[:3], first - first.mean())
    _, batch, std = group_advantages(scores[:6], torch.tensor([1.0, 0.5]), 3, "batch")
    every = torch.tensor([1.0, 0.0, 1.5, 2.0, 2.0, 2.0])
    torch.testing.assert_close(std, every.std().expand(6))
    torch.testing.assert_close(batch[:3], (first - first.mean()) / (every.std() + 1e-4))
    with pytest.raises(ValueError, match="whole groups of 4"):
        group_advantages(scores, torch.ones(2), 4, "group")
