"""PPO's actor-critic module (engine.objectives.actor_critic): the critic read token-wise gives,
at a row's last token, the score its sequence-classification model gives the whole row; it
starts from a reward model directory (--critic-init) or from the actor's own trunk, never
sharing the actor's tensors; a directory that is no value model is a clear error."""

from __future__ import annotations

import pytest
import torch

from common.errors import ZerotrainError
from engine.objectives.actor_critic import ActorCritic, actor_critic
from engine.objectives.reward_model import as_reward_model

VOCAB, PAD = 300, 0


def causal_lm():
    from model.build import build_model

    torch.manual_seed(0)
    model = build_model("debug", vocab_size=VOCAB)
    model.config.pad_token_id = PAD
    return model


def test_the_critic_from_a_reward_model_scores_each_token_as_it_scores_the_row(tmp_path):
    torch.manual_seed(1)
    reward = as_reward_model(causal_lm())
    reward.config.pad_token_id = PAD
    with torch.no_grad():
        reward.score.weight.normal_()
    reward.save_pretrained(tmp_path / "rm")
    pair = actor_critic(causal_lm(), str(tmp_path / "rm"))
    assert isinstance(pair, ActorCritic) and pair.config is pair.actor.config
    assert all(torch.equal(a, b) for a, b in zip(pair.critic.state_dict().values(), reward.state_dict().values()))
    ids = torch.randint(1, VOCAB, (3, 10), generator=torch.Generator().manual_seed(2))
    lengths = torch.tensor([10, 7, 4])
    mask = (torch.arange(10)[None, :] < lengths[:, None]).long()
    ids = ids.masked_fill(mask == 0, PAD)
    with torch.no_grad():
        out = pair(input_ids=ids, attention_mask=mask)
        pooled = reward(input_ids=ids, attention_mask=mask).logits[:, 0]
    assert out.logits.shape == (3, 10, VOCAB) and out.state_values.shape == (3, 10)
    torch.testing.assert_close(out.state_values[torch.arange(3), lengths - 1], pooled.float())


def test_the_default_critic_is_the_actors_trunk_copied(tmp_path):
    pair = actor_critic(causal_lm(), "")
    actor_trunk = getattr(pair.actor, pair.actor.base_model_prefix).state_dict()
    critic_trunk = getattr(pair.critic, pair.critic.base_model_prefix).state_dict()
    assert actor_trunk.keys() == critic_trunk.keys()
    assert all(torch.equal(actor_trunk[k], critic_trunk[k]) for k in actor_trunk)
    assert not {p.data_ptr() for p in pair.actor.parameters()} & {p.data_ptr() for p in pair.critic.parameters()}
    with pytest.raises(ZerotrainError, match=r"--critic-init .*not a transformers sequence-classification model"):
        actor_critic(causal_lm(), str(tmp_path / "missing"))
