"""PPO's actor-critic module (engine.objectives.actor_critic): the critic read token-wise gives,
at a row's last token, the score its sequence-classification model gives the whole row; it
starts from a reward model directory (--critic-init) or from the actor's own trunk, never
sharing the actor's tensors; a directory that is no value model is a clear error. With LoRA the
adapter is the actor's alone: the critic trains in full, the actor with its adapter disabled is
the base model (the reference) while the critic's values stay as they are, and the adapter
written from the pair loads with peft onto the plain causal LM, whose merge is the merged
model written from the pair (its tied lm_head too)."""

from __future__ import annotations

import pytest
import torch

from common.errors import ZerotrainError
from engine.objectives.actor_critic import ACTOR, ActorCritic, actor_critic
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


def test_lora_adapts_the_actor_alone(tmp_path):
    from peft import PeftModel

    from engine.config.parse import parse_config
    from engine.training.lora import adapter_config, merged_model, save_adapter, wrap_lora

    cfg = parse_config(["--lora-r", "4"])
    pair = wrap_lora(cfg, actor_critic(causal_lm(), ""), None, ACTOR)
    assert isinstance(pair, ActorCritic) and adapter_config(pair.actor)["r"] == 4
    trainable = {name for name, p in pair.named_parameters() if p.requires_grad}
    assert trainable == ({f"actor.{n}" for n, _ in pair.actor.named_parameters() if ".lora_" in n}
                         | {f"critic.{n}" for n, _ in pair.critic.named_parameters()})
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in pair.actor.named_parameters():
            if ".lora_B." in name:  # 0 at init: give the adapter an effect
                p.normal_(std=0.1)
    pair.eval()
    ids = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(4))
    base = causal_lm().eval()
    with torch.no_grad():
        adapted = pair(input_ids=ids)
        with pair.disable_adapter():
            reference = pair(input_ids=ids)
        plain = base(input_ids=ids).logits
    assert not torch.allclose(adapted.logits, plain)
    torch.testing.assert_close(reference.logits, plain)
    torch.testing.assert_close(reference.state_values, adapted.state_values)

    state = {name: p.detach().clone() for name, p in pair.actor.named_parameters() if p.requires_grad}
    save_adapter(pair.actor, state, tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, adapted.logits)
    assert base.config.tie_word_embeddings
    merged = merged_model(pair.actor, {name: p.detach().clone() for name, p in pair.actor.named_parameters()})
    expected = loaded.merge_and_unload().state_dict()
    assert merged.state_dict().keys() == expected.keys()
    for name, tensor in merged.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], msg=name)
