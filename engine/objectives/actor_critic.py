"""PPO's trained module: the policy (the actor, a causal LM) and its value model (the critic) as
one nn.Module, so one DeepSpeed engine trains both with one optimizer and every checkpoint holds
both (an exact resume restores the critic and its optimizer state with the actor's).

The critic is the architecture's sequence-classification model with one label, used token-wise:
its trunk's hidden state at every position through its `score` head is the value of the state
after that token. It starts from --critic-init (a reward model: a launcher/reward.py run's
final/, or any such model with the run's tokenizer) or, by default, from the policy's own trunk
with a new head (engine.objectives.reward_model.as_reward_model), as TRL and OpenRLHF allow.

The actor is the model: final/ and consolidation take its weights alone (Stage.exported), and
generation and the reference use it alone.

With --lora-r, LoRA adapts the actor alone and the critic trains in full (TRL's PPOTrainer with
a peft_config does the same). Then the adapter is a causal LM's, for the --init-from model as
it is (final/adapter/, extract-adapter), with nothing of the critic in it; the reference is the
actor with its adapter disabled (disable_adapter below: no copy), which leaves the critic's
values as they are; and the critic's new value head needs no modules_to_save. Adapting the
critic too would save its optimizer state, but would need a second adapter beside the actor's
in the one module, which every tool that reads a checkpoint's adapter would have to tell apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from transformers.utils import ModelOutput

from common.errors import ZerotrainError

ACTOR = "actor"


@dataclass
class ActorCriticOutput(ModelOutput):
    """The actor's logits [B, T, V] and the critic's values [B, T] (fp32; not named `values`, which
    would hide the mapping's values(), as DeepSpeed walks outputs through it)."""

    logits: Optional[torch.FloatTensor] = None
    state_values: Optional[torch.FloatTensor] = None


class ActorCritic(torch.nn.Module):
    """The actor and the critic; a forward runs both on the same tokens."""

    def __init__(self, actor: torch.nn.Module, critic: torch.nn.Module):
        super().__init__()
        if not isinstance(getattr(critic, "score", None), torch.nn.Linear):
            raise ZerotrainError(f"the critic, a {type(critic).__name__}, has no `score` head to read values from "
                                 "at every token; use a model of an architecture whose sequence classification has "
                                 "one (Llama, Qwen, GPT-2, ...)")
        self.actor, self.critic = actor, critic

    # What build_model, generation and export read of "the model": the actor's.
    @property
    def config(self):
        return self.actor.config

    @property
    def generation_config(self):
        return self.actor.generation_config

    def disable_adapter(self):
        """The actor's LoRA adapter off, for the reference (engine.objectives.reference)."""
        return self.actor.disable_adapter()

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        self.actor.gradient_checkpointing_enable(**kwargs)
        self.critic.gradient_checkpointing_enable(**kwargs)

    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The critic's value [B, T] (fp32) of the state after each position's token."""
        trunk = getattr(self.critic, self.critic.base_model_prefix)
        hidden = trunk(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False).last_hidden_state
        return self.critic.score(hidden).squeeze(-1).float()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> ActorCriticOutput:
        logits = self.actor(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=False).logits
        return ActorCriticOutput(logits=logits, state_values=self.values(input_ids, attention_mask, position_ids))


def critic_from(directory: str, actor: torch.nn.Module) -> torch.nn.Module:
    """The sequence-classification model (one label) in `directory`, in the actor's dtype."""
    from transformers import AutoModelForSequenceClassification

    try:
        critic = AutoModelForSequenceClassification.from_pretrained(directory, dtype=actor.dtype)
    except (OSError, ValueError) as e:
        raise ZerotrainError(f"--critic-init {directory}: not a transformers sequence-classification model ({e}); "
                             "use a launcher/reward.py run's final/, or leave it out to start the critic from the "
                             "policy") from None
    if critic.config.num_labels != 1:
        raise ZerotrainError(f"--critic-init {directory} has {critic.config.num_labels} labels; a value model has one")
    rows, needed = critic.get_input_embeddings().num_embeddings, actor.get_input_embeddings().num_embeddings
    if rows < needed:
        raise ZerotrainError(f"--critic-init {directory} embeds {rows} token ids, the policy's vocabulary {needed}: "
                             "the critic reads the policy's tokens, so it needs the run's tokenizer")
    return critic


def actor_critic(model: torch.nn.Module, critic_init: str) -> ActorCritic:
    """The causal LM as the actor, beside a critic from `critic_init` (--critic-init) or, when it
    is "", from the actor's own trunk."""
    from engine.objectives.reward_model import as_reward_model

    critic = critic_from(critic_init, model) if critic_init else as_reward_model(model)
    critic.config.pad_token_id = model.config.pad_token_id
    return ActorCritic(model, critic)
