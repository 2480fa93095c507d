"""The causal-LM objective against transformers' own causal-LM loss (the one HF Trainer uses)."""

from __future__ import annotations

import torch

from engine.config.parse import parse_config
from engine.data.format import IGNORE_INDEX
from engine.objectives.causal_lm import SFT, CausalLM
from engine.objectives.tokens import token_nll_sum, trained_tokens
from model.build import build_model


def test_summed_loss_over_trained_tokens_matches_transformers():
    torch.manual_seed(0)
    model = build_model("debug", vocab_size=97).eval()
    input_ids = torch.randint(0, 97, (3, 12))
    labels = input_ids.clone()
    labels[0, :5] = IGNORE_INDEX  # a prompt
    labels[1, 9:] = IGNORE_INDEX  # padding
    attention_mask = (labels != IGNORE_INDEX).long()
    attention_mask[0] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    objective = SFT.objective(parse_config([]))
    assert isinstance(objective, CausalLM) and objective.unit == "token"
    with torch.no_grad():
        ours = objective.loss(model, batch).loss
        units = objective.units(batch)
        # transformers shifts the labels itself and averages over the tokens it counts
        theirs = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        summed = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                       num_items_in_batch=torch.tensor(1.0)).loss
    assert units == int(trained_tokens(labels).sum()) == 11 - 4 + 8 + 11
    torch.testing.assert_close(ours / units, theirs)
    torch.testing.assert_close(ours, summed)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(token_nll_sum(logits, labels), summed, rtol=1e-5, atol=1e-5)
