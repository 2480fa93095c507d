"""engine.objectives.reward_model against TRL's RewardTrainer: the same model and batch of pairs
give the same loss (with and without reward centring), gradients, accuracy and margin; the
reward model keeps its causal LM's trunk and scores a sequence at its last token that is not
padding."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from engine.objectives.reward_model import RewardConfig, RewardModel, as_reward_model

VOCAB, PAD = 300, 0


def reward_model():
    from model.build import build_model

    torch.manual_seed(0)
    causal = build_model("debug", vocab_size=VOCAB)
    causal.config.pad_token_id = PAD
    scorer = as_reward_model(causal)
    scorer.config.pad_token_id = PAD
    return causal, scorer


def pairs_batch(pairs: int = 4, seed: int = 1) -> dict[str, torch.Tensor]:
    """2B right-padded rows: the chosen sequences, then the rejected ones (engine.data.pairs)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(5, 17, (2 * pairs,), generator=g)
    ids = torch.full((2 * pairs, int(lengths.max())), PAD)
    for r, n in enumerate(lengths):
        ids[r, :n] = torch.randint(1, VOCAB, (int(n),), generator=g)
    return {"input_ids": ids, "attention_mask": (ids != PAD).long()}


def trl_loss(model, batch, coefficient):
    """TRL's RewardTrainer.compute_loss on one process: a trainer with only what that method reads."""
    from trl import RewardTrainer

    t = RewardTrainer.__new__(RewardTrainer)
    t.__dict__.update(model=SimpleNamespace(training=True), args=SimpleNamespace(center_rewards_coefficient=coefficient),
                      accelerator=SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x),
                      _total_train_tokens=0, _tp_size=1, _metrics={"train": defaultdict(list)})
    return t.compute_loss(model, dict(batch)), t._metrics["train"]


@pytest.mark.parametrize("coefficient", [None, 0.01])
def test_loss_gradients_and_metrics_equal_trl(coefficient):
    _, ours_model = reward_model()
    _, theirs_model = reward_model()
    batch = pairs_batch()
    out = RewardModel(RewardConfig(center_rewards_coefficient=coefficient or 0.0)).loss(ours_model, batch)
    units = batch["input_ids"].shape[0] // 2
    theirs, metrics = trl_loss(theirs_model, batch, coefficient)
    assert float(out.loss.detach()) / units == pytest.approx(float(theirs.detach()), rel=1e-6)
    (out.loss / units).backward()
    theirs.backward()
    for (name, a), (_, b) in zip(ours_model.named_parameters(), theirs_model.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-8, msg=name)
    assert float(out.metrics["accuracy"]) / units == pytest.approx(metrics["accuracy"][0], abs=1e-7)
    assert float(out.metrics["margin"]) / units == pytest.approx(metrics["margin"][0], rel=1e-5)


def test_the_trunk_is_the_causal_lm_and_the_score_is_read_at_the_last_real_token():
    causal, scorer = reward_model()
    prefix = causal.base_model_prefix
    for (name, a), (_, b) in zip(getattr(causal, prefix).named_parameters(), getattr(scorer, prefix).named_parameters()):
        assert torch.equal(a, b), name
    batch = pairs_batch(pairs=2)
    with torch.no_grad():
        scores = scorer(**batch).logits.squeeze(-1)
        for r, ids in enumerate(batch["input_ids"]):
            real = ids[ids != PAD][None]
            hidden = getattr(scorer, prefix)(input_ids=real).last_hidden_state[0, -1]
            assert float(scores[r]) == pytest.approx(float(scorer.score(hidden)), rel=1e-5, abs=1e-6)
