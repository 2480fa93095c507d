"""The preference losses (engine.objectives.preference) against TRL's own trainers, to 1e-5 in fp32.

DPO and IPO run end to end through trl.DPOTrainer: the same tiny model (a perturbed copy as the
policy, the original as the reference) and the same token ids, from TRL's own tokenization and
collator, through its public `compute_loss`, its loss and its logged metrics against ours per
pair (a batch of one pair) and per batch (its mean, our sum / B). SimPO runs through
trl.experimental.cpo.CPOTrainer, ORPO through trl.experimental.orpo.ORPOTrainer (its odds-ratio
term per pair, its NLL where it is like for like). TRL 1.16's DPO sigmoid loss has no label
smoothing: cDPO is checked against CPOTrainer.cpo_loss (loss_type "sigmoid"), which is exactly
-(1-e) log s(b D) - e log s(-b D), fed with the log-ratios.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from trl import DPOConfig, DPOTrainer

from engine.data.format import IGNORE_INDEX
from engine.objectives.preference import (
    PrefConfig,
    Preference,
    pair_losses,
    sequence_logps,
)
from model.build import build_model

with warnings.catch_warnings():  # "APIs here are unstable": they are what this test pins down
    warnings.filterwarnings("ignore", message=".*trl.experimental.*")
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

# transformers 5 renames the gradient_checkpointing argument TRL's configs still pass on
pytestmark = pytest.mark.filterwarnings("ignore:.*is deprecated and will be removed in v6:FutureWarning")

ATOL = 1e-5  # the claim: per-pair losses and rewards agree with TRL's to 1e-5 in fp32
REL = 1e-6
"""fp32 rounding is relative to the numbers a value is computed from (about 8 units in their last
place): a reward is beta x a difference of summed log-probs of ~100 and keeps their rounding, which
another order of summation (another CPU kernel: ATEN_CPU_CAPABILITY=default) makes 1.1e-5 for IPO's
beta 0.5. Such a value is compared to REL of that `scale` where it is more than ATOL."""
DIFFS: dict[str, float] = {}
"""Largest |ours - TRL's| seen per quantity, printed at the end of the module (pytest -s)."""

PAIRS = {  # different prompt and response lengths, so rows are padded
    "prompt": ["To be, or not", "What light", "Now is the winter", "Friends, Romans,"],
    "chosen": [" to be: that is the question", " through yonder window breaks", " of our discontent",
               " countrymen, lend me your ears"],
    "rejected": [" a banana", " is this, my lord, that I see before me", " and summer", " and so on"],
}


def close(ours: torch.Tensor | float, theirs: torch.Tensor | float, what: str, atol: float = ATOL,
          scale: torch.Tensor | float = 0.0) -> None:
    ours, theirs = torch.as_tensor(ours, dtype=torch.float32), torch.as_tensor(theirs, dtype=torch.float32)
    atol = max(atol, REL * float(torch.as_tensor(scale).abs().max()))
    diff = (ours - theirs).abs().max().item()
    DIFFS[what] = max(DIFFS.get(what, 0.0), diff)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=atol, msg=lambda m: f"{what}: {m}")


@pytest.fixture(scope="module", autouse=True)
def report_diffs():
    yield
    print("\nmax |zerotrain - TRL|:")
    for what, diff in sorted(DIFFS.items()):
        print(f"  {what:40s} {diff:.3g}")


@pytest.fixture(scope="module")
def models(tokenizer):
    """(policy, reference): a debug-preset model and a perturbed copy of it, fp32, no dropout."""
    torch.manual_seed(0)
    reference = build_model("debug", vocab_size=len(tokenizer)).eval()
    policy = copy.deepcopy(reference)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    for m in (policy, reference):
        m.config.pad_token_id = tokenizer.pad_token_id
        m.requires_grad_(False)
    return policy, reference


def trl_args(config_class, tmp_path_factory, **kwargs):
    return config_class(output_dir=str(tmp_path_factory.mktemp("trl")), report_to=[], bf16=False, use_cpu=True,
                        gradient_checkpointing=False, disable_tqdm=True, dataset_num_proc=None, seed=0, **kwargs)


def logps_of(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return sequence_logps(logits, batch["labels"])


def ours_per_pair(pref: PrefConfig, policy, reference, batch) -> tuple:
    """Our per-pair terms on a [2B] batch, from log-probs computed apart from Preference.loss."""
    logps, tokens = logps_of(policy, batch)
    chosen, rejected = logps.chunk(2)
    chosen_tokens, rejected_tokens = tokens.chunk(2)
    ref = (None, None) if reference is None else logps_of(reference, batch)[0].chunk(2)
    terms = pair_losses(pref, chosen, rejected, chosen_tokens, rejected_tokens, *ref)
    return terms, chosen, rejected, chosen_tokens, rejected_tokens


def objective_on(pref: PrefConfig, reference) -> Preference:
    objective = Preference(pref)
    if reference is not None:
        objective.reference = lambda batch: logps_of(reference, batch)[0]
    return objective


# ---------------------------------------------------------------------------------------------
# sequence_logps


def test_sequence_logps_is_a_log_softmax_gather_over_trained_tokens():
    torch.manual_seed(1)
    logits = torch.randn(4, 9, 50) * 3
    input_ids = torch.randint(0, 50, (4, 9))
    labels = input_ids.clone()
    labels[:, :3] = IGNORE_INDEX  # the prompt
    labels[1, 6:] = IGNORE_INDEX  # a padded row
    labels[2, 4:] = IGNORE_INDEX  # a shorter response
    labels[3] = IGNORE_INDEX  # a row with nothing to train on
    logps, tokens = sequence_logps(logits, labels)

    token_logps = torch.log_softmax(logits.double(), dim=-1)
    expected = torch.zeros(4, dtype=torch.float64)
    counts = torch.zeros(4, dtype=torch.long)
    for row in range(4):
        for t in range(1, 9):  # the token at t is predicted from position t - 1
            if labels[row, t] != IGNORE_INDEX:
                expected[row] += token_logps[row, t - 1, labels[row, t]]
                counts[row] += 1
    assert tokens.tolist() == counts.tolist() == [6, 3, 1, 0]
    assert logps.dtype == torch.float32 and logps[3] == 0
    close(logps, expected, "sequence_logps vs log_softmax gather")
    # bf16 logits are upcast: the sum is fp32 over the bf16 values
    logps_bf16, _ = sequence_logps(logits.bfloat16(), labels)
    assert logps_bf16.dtype == torch.float32
    close(logps_bf16, sequence_logps(logits.bfloat16().float(), labels)[0], "sequence_logps bf16 upcast", atol=1e-6)


# ---------------------------------------------------------------------------------------------
# DPO and IPO end to end through trl.DPOTrainer


DPO_BETA = {"sigmoid": 0.1, "ipo": 0.5}  # IPO's target margin 1 / (2 beta) = 1 keeps its loss near 1


@pytest.fixture(scope="module")
def dpo_trainers(models, tokenizer, tmp_path_factory):
    """loss_type -> a DPOTrainer holding copies of our policy and reference."""
    policy, reference = models
    trainers = {}
    for loss_type in ("sigmoid", "ipo"):
        args = trl_args(DPOConfig, tmp_path_factory, loss_type=[loss_type], beta=DPO_BETA[loss_type],
                        per_device_train_batch_size=len(PAIRS["prompt"]))
        trainers[loss_type] = DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference), args=args,
                                         train_dataset=Dataset.from_dict(PAIRS), processing_class=tokenizer)
    return trainers


def dpo_batch(trainer, rows: list[int]) -> tuple[dict, dict]:
    """TRL's collated batch of `rows` and the same sequences as a zerotrain batch."""
    theirs = trainer.data_collator([trainer.train_dataset[i] for i in rows])
    labels = theirs["input_ids"].masked_fill(theirs["completion_mask"] == 0, IGNORE_INDEX)
    ours = {"input_ids": theirs["input_ids"], "attention_mask": theirs["attention_mask"], "labels": labels}
    return theirs, ours


def trl_logged(trainer) -> dict[str, float]:
    """The metrics TRL logs for the compute_loss calls since the last log."""
    trainer.log({})
    prefix = "" if trainer.model.training else "eval_"
    logs = trainer.state.log_history[-1]
    return {k[len(prefix):]: v for k, v in logs.items() if k.startswith(prefix)}


@pytest.mark.parametrize("loss_type,pref_loss", [("sigmoid", "dpo"), ("ipo", "ipo")])
def test_dpo_and_ipo_match_trl_dpo_trainer_per_pair(dpo_trainers, models, loss_type, pref_loss):
    policy, reference = models
    trainer = dpo_trainers[loss_type]
    pref = PrefConfig(pref_loss=pref_loss, beta=DPO_BETA[loss_type])
    for row in range(len(PAIRS["prompt"])):
        theirs, ours = dpo_batch(trainer, [row])
        with torch.no_grad():
            trl_loss = trainer.compute_loss(trainer.model, theirs)
        logged = trl_logged(trainer)
        terms, chosen, rejected, _, _ = ours_per_pair(pref, policy, reference, ours)
        close(terms.loss[0], trl_loss, f"{pref_loss} loss per pair")
        # beta x (policy - reference log-probs), both about the policy's in size
        scale = 2 * pref.beta * (chosen[0].abs() + rejected[0].abs())
        close(terms.chosen_rewards[0], logged["rewards/chosen"], f"{pref_loss} rewards/chosen per pair", scale=scale)
        close(terms.rejected_rewards[0], logged["rewards/rejected"], f"{pref_loss} rewards/rejected per pair",
              scale=scale)
        close(terms.chosen_rewards[0] - terms.rejected_rewards[0], logged["rewards/margins"],
              f"{pref_loss} rewards/margins per pair", scale=scale)
        # summed log-probs of ~10 tokens at ~-7 each: fp32 rounding of two different reductions
        close(chosen[0], logged["logps/chosen"], "dpo logps/chosen per pair", atol=1e-4)
        close(rejected[0], logged["logps/rejected"], "dpo logps/rejected per pair", atol=1e-4)
        assert float(terms.chosen_rewards[0] > terms.rejected_rewards[0]) == logged["rewards/accuracies"]


@pytest.mark.parametrize("loss_type,pref_loss", [("sigmoid", "dpo"), ("ipo", "ipo")])
def test_dpo_and_ipo_batch_loss_is_trl_mean(dpo_trainers, models, loss_type, pref_loss):
    """Preference.loss on a padded batch of every pair: its sums / B are TRL's means."""
    policy, reference = models
    trainer = dpo_trainers[loss_type]
    pairs = len(PAIRS["prompt"])
    theirs, ours = dpo_batch(trainer, list(range(pairs)))
    assert (ours["attention_mask"] == 0).any(), "the batch should have padded rows"
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, theirs)
        objective = objective_on(PrefConfig(pref_loss=pref_loss, beta=DPO_BETA[loss_type]), reference)
        assert objective.units(ours) == pairs
        sums = objective.loss(policy, ours)
    logged = trl_logged(trainer)
    close(sums.loss / pairs, trl_loss, f"{pref_loss} batch loss (sum / B vs TRL mean)")
    logps = sums.metrics["logps/chosen"].abs() + sums.metrics["logps/rejected"].abs()
    scale = 2 * DPO_BETA[loss_type] * logps / pairs
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        close(sums.metrics[key] / pairs, logged[key], f"{pref_loss} batch {key}", scale=scale)
    for key in ("logps/chosen", "logps/rejected"):
        close(sums.metrics[key] / pairs, logged[key], f"dpo batch {key}", atol=1e-4)


def test_cdpo_label_smoothing_matches_trl_cpo_sigmoid_loss(dpo_trainers, models, tokenizer, tmp_path_factory):
    """cDPO against CPOTrainer.cpo_loss (loss_type "sigmoid": -(1-e) log s(b x) - e log s(-b x), x = its
    chosen minus rejected input), fed with the policy-to-reference log-ratios of TRL's DPO batch."""
    policy, reference = models
    smoothing, beta = 0.2, 0.1
    args = trl_args(CPOConfig, tmp_path_factory, loss_type="sigmoid", beta=beta, label_smoothing=smoothing,
                    cpo_alpha=0.0, max_length=64)
    cpo = CPOTrainer(model=copy.deepcopy(policy), args=args, train_dataset=Dataset.from_dict(PAIRS),
                     processing_class=tokenizer)
    _, ours = dpo_batch(dpo_trainers["sigmoid"], list(range(len(PAIRS["prompt"]))))
    pref = PrefConfig(pref_loss="dpo", beta=beta, label_smoothing=smoothing)
    terms, chosen, rejected, _, _ = ours_per_pair(pref, policy, reference, ours)
    ref_chosen, ref_rejected = logps_of(reference, ours)[0].chunk(2)
    trl_losses, trl_chosen_rewards, trl_rejected_rewards = cpo.cpo_loss(chosen - ref_chosen, rejected - ref_rejected)
    close(terms.loss, trl_losses, "cdpo loss per pair")
    close(terms.chosen_rewards, trl_chosen_rewards, "cdpo rewards/chosen per pair")
    close(terms.rejected_rewards, trl_rejected_rewards, "cdpo rewards/rejected per pair")
    # and e = 0 is plain DPO, which the end-to-end test compares with DPOTrainer
    plain = ours_per_pair(PrefConfig(pref_loss="dpo", beta=beta), policy, reference, ours)[0]
    assert not torch.allclose(plain.loss, terms.loss)
    close(_sigmoid_reference(beta * ((chosen - ref_chosen) - (rejected - ref_rejected)), smoothing).float(),
          terms.loss, "cdpo loss vs the formula")


def _sigmoid_reference(logits: torch.Tensor, e: float) -> torch.Tensor:
    logits = logits.double()
    return -(1 - e) * F.logsigmoid(logits) - e * F.logsigmoid(-logits)


# ---------------------------------------------------------------------------------------------
# SimPO through trl.experimental.cpo.CPOTrainer (loss_type "simpo": per-token mean log-probs)


@pytest.fixture(scope="module")
def simpo_trainer(models, tokenizer, tmp_path_factory):
    policy, _ = models
    args = trl_args(CPOConfig, tmp_path_factory, loss_type="simpo", beta=2.0, simpo_gamma=0.5,
                    label_smoothing=0.1, cpo_alpha=0.0, max_length=64)
    return CPOTrainer(model=copy.deepcopy(policy), args=args, train_dataset=Dataset.from_dict(PAIRS),
                      processing_class=tokenizer)


def paired_batch(trainer, rows: list) -> tuple[dict, dict]:
    """A CPO/ORPO trainer's collated batch of `rows` (indices, or tokenized rows) and its concatenated
    sequences as a zerotrain batch (prompt and padding labelled -100 by TRL)."""
    examples = [trainer.train_dataset[r] if isinstance(r, int) else r for r in rows]
    theirs = trainer.data_collator(examples)
    # the padding each passes in its concatenated_forward: ORPO's padding_value, CPO's pad_token_id
    padding = trainer.padding_value if hasattr(trainer, "padding_value") else trainer.pad_token_id
    cat = trainer.concatenated_inputs(theirs, is_encoder_decoder=False, padding_value=padding,
                                      device=torch.device("cpu"))
    ours = {"input_ids": cat["concatenated_input_ids"], "attention_mask": cat["concatenated_attention_mask"],
            "labels": cat["concatenated_labels"]}
    return theirs, ours


def test_simpo_matches_trl_cpo_trainer(simpo_trainer, models):
    policy, _ = models
    trainer = simpo_trainer
    pref = PrefConfig(pref_loss="simpo", beta=2.0, simpo_gamma=0.5, label_smoothing=0.1)
    pairs = len(PAIRS["prompt"])
    for row in range(pairs):
        theirs, ours = paired_batch(trainer, [row])
        with torch.no_grad():
            trl_loss, logged = trainer.compute_loss(trainer.model, theirs, return_outputs=True)
        terms, chosen, rejected, chosen_tokens, rejected_tokens = ours_per_pair(pref, policy, None, ours)
        close(terms.loss[0], trl_loss, "simpo loss per pair")
        close(terms.chosen_rewards[0], logged["rewards/chosen"], "simpo rewards/chosen per pair")
        close(terms.rejected_rewards[0], logged["rewards/rejected"], "simpo rewards/rejected per pair")
        close(terms.chosen_rewards[0] - terms.rejected_rewards[0], logged["rewards/margins"],
              "simpo rewards/margins per pair")
        # TRL's SimPO log-probs are the per-token means of the completion
        close(chosen[0] / chosen_tokens[0], logged["logps/chosen"], "simpo mean logps/chosen per pair")
        close(rejected[0] / rejected_tokens[0], logged["logps/rejected"], "simpo mean logps/rejected per pair")
    theirs, ours = paired_batch(trainer, list(range(pairs)))
    assert (ours["attention_mask"] == 0).any()
    with torch.no_grad():
        trl_loss, logged = trainer.compute_loss(trainer.model, theirs, return_outputs=True)
        sums = objective_on(pref, None).loss(policy, ours)
    close(sums.loss / pairs, trl_loss, "simpo batch loss (sum / B vs TRL mean)")
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        close(sums.metrics[key] / pairs, logged[key], f"simpo batch {key}")


# ---------------------------------------------------------------------------------------------
# ORPO through trl.experimental.orpo.ORPOTrainer

ORPO_BETA = 0.5
EQUAL_CHOSEN = {  # no prompt (only TRL's BOS) and chosen responses of one length: TRL's NLL is like ours
    "prompt": ["", "", ""],
    "chosen": [" to be or not to be", " lend me your ears", " now is the winter"],
    "rejected": [" a banana", " is this, my lord, that I see before me", " and summer"],
}


@pytest.fixture(scope="module")
def orpo_trainer(models, tokenizer, tmp_path_factory):
    policy, _ = models
    args = trl_args(ORPOConfig, tmp_path_factory, beta=ORPO_BETA, max_length=64)
    return ORPOTrainer(model=copy.deepcopy(policy), args=args, train_dataset=Dataset.from_dict(PAIRS),
                       processing_class=tokenizer)


def test_orpo_odds_ratio_matches_trl_orpo_trainer(orpo_trainer, models):
    """Our per-pair loss is -mean chosen log-prob + TRL's odds-ratio term (ORPOTrainer.odds_ratio_loss on
    its own per-token mean log-probs, from its concatenated_forward)."""
    policy, _ = models
    trainer = orpo_trainer
    pref = PrefConfig(pref_loss="orpo", beta=ORPO_BETA)
    theirs, ours = paired_batch(trainer, list(range(len(PAIRS["prompt"]))))
    with torch.no_grad():
        trl_chosen, trl_rejected = trainer.concatenated_forward(trainer.model, theirs)[:2]
        trl_odds, trl_chosen_rewards, trl_rejected_rewards, _, _ = trainer.odds_ratio_loss(trl_chosen, trl_rejected)
    terms, chosen, rejected, chosen_tokens, rejected_tokens = ours_per_pair(pref, policy, None, ours)
    chosen_mean = chosen / chosen_tokens
    close(chosen_mean, trl_chosen, "orpo mean logps/chosen per pair")
    close(rejected / rejected_tokens, trl_rejected, "orpo mean logps/rejected per pair")
    # TRL's odds_ratio_loss returns beta * log s(log odds), which its loss subtracts
    close(terms.loss + chosen_mean, -trl_odds, "orpo odds-ratio term per pair")
    close(terms.chosen_rewards, trl_chosen_rewards, "orpo rewards/chosen per pair")
    close(terms.rejected_rewards, trl_rejected_rewards, "orpo rewards/rejected per pair")


def test_orpo_total_matches_trl_where_its_nll_is_like_ours(orpo_trainer, models, tokenizer):
    """TRL's ORPO NLL is the mean over every chosen token of the batch, prompt included; with no
    prompt and chosen responses of one length it is the mean of our per-pair NLLs, so the whole
    loss and the logged NLL compare."""
    policy, _ = models
    trainer = orpo_trainer
    pref = PrefConfig(pref_loss="orpo", beta=ORPO_BETA)
    rows = [trainer.tokenize_row(dict(zip(EQUAL_CHOSEN, values))) for values in zip(*EQUAL_CHOSEN.values())]
    assert all(r["chosen_input_ids"][:1] == [tokenizer.bos_token_id] for r in rows)
    assert len({len(r["chosen_input_ids"]) for r in rows}) == 1, "chosen responses must be of one length"
    assert len({len(r["rejected_input_ids"]) for r in rows}) > 1
    theirs, ours = paired_batch(trainer, rows)
    pairs = len(rows)
    with torch.no_grad():
        trl_loss, logged = trainer.compute_loss(trainer.model, theirs, return_outputs=True)
        sums = objective_on(pref, None).loss(policy, ours)
    terms, chosen, _, chosen_tokens, _ = ours_per_pair(pref, policy, None, ours)
    close((-chosen / chosen_tokens).mean(), logged["nll_loss"], "orpo chosen NLL (like for like)")
    close(sums.loss / pairs, trl_loss, "orpo batch loss (sum / B vs TRL mean)")
    close(terms.loss.mean(), trl_loss, "orpo per-pair losses' mean vs TRL")
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        close(sums.metrics[key] / pairs, logged[key], f"orpo batch {key}")


def test_orpo_odds_ratio_near_certain_responses(orpo_trainer):
    """Mean log-probs near 0 (a response the model is sure of): log(1 - p) must not cancel."""
    pref = PrefConfig(pref_loss="orpo", beta=1.0)
    chosen_mean = torch.tensor([-1e-4, -1e-3, -0.02, -3e-8, -2.0])
    rejected_mean = torch.tensor([-2e-4, -3e-4, -0.05, -1e-6, -2.5])
    ones = torch.ones(5, dtype=torch.long)
    # one token per response: the summed log-prob is the mean
    terms = pair_losses(pref, chosen_mean, rejected_mean, ones, ones)
    orpo_trainer.beta = 1.0
    try:
        trl_odds, _, _, _, _ = orpo_trainer.odds_ratio_loss(chosen_mean, rejected_mean)
    finally:
        orpo_trainer.beta = ORPO_BETA
    assert torch.isfinite(terms.loss).all()
    close(terms.loss + chosen_mean, -trl_odds, "orpo odds-ratio term, near-certain responses")


# ---------------------------------------------------------------------------------------------
# Preference.loss itself


LOSSES = [
    PrefConfig(pref_loss="dpo", beta=0.1),
    PrefConfig(pref_loss="dpo", beta=0.3, label_smoothing=0.1),
    PrefConfig(pref_loss="ipo", beta=0.1),
    PrefConfig(pref_loss="simpo", beta=2.0, simpo_gamma=0.5),
    PrefConfig(pref_loss="orpo", beta=0.1),
]


@pytest.fixture(scope="module")
def plain_batch(dpo_trainers):
    return dpo_batch(dpo_trainers["sigmoid"], list(range(len(PAIRS["prompt"]))))[1]


@pytest.mark.parametrize("pref", LOSSES, ids=lambda p: f"{p.pref_loss}-e{p.label_smoothing}")
def test_objective_loss_is_pair_losses_on_separate_logps(pref, models, plain_batch):
    policy, reference = models
    reference = reference if pref.needs_reference else None
    terms, chosen, rejected, _, _ = ours_per_pair(pref, policy, reference, plain_batch)
    with torch.no_grad():
        sums = objective_on(pref, reference).loss(policy, plain_batch)
    close(sums.loss, terms.loss.sum(), f"Preference.loss vs pair_losses ({pref.pref_loss})")
    expected = {
        "rewards/chosen": terms.chosen_rewards.sum(),
        "rewards/rejected": terms.rejected_rewards.sum(),
        "rewards/accuracies": (terms.chosen_rewards > terms.rejected_rewards).float().sum(),
        "rewards/margins": (terms.chosen_rewards - terms.rejected_rewards).sum(),
        "logps/chosen": chosen.sum(),
        "logps/rejected": rejected.sum(),
    }
    assert set(sums.metrics) == set(expected)
    for key, value in expected.items():
        close(sums.metrics[key], value, f"Preference.loss metrics vs pair_losses ({key})", atol=1e-4)


@pytest.mark.parametrize("pref_loss", ["dpo", "ipo"])
def test_policy_equal_to_reference(pref_loss, models, plain_batch):
    """DPO: log 2 per pair, rewards 0; IPO: (1 / (2 beta))^2 per pair."""
    policy, _ = models
    pref = PrefConfig(pref_loss=pref_loss, beta=0.1)
    pairs = plain_batch["input_ids"].shape[0] // 2
    with torch.no_grad():
        sums = objective_on(pref, policy).loss(policy, plain_batch)
    expected = math.log(2) if pref_loss == "dpo" else (1 / (2 * pref.beta)) ** 2
    close(sums.loss / pairs, expected, f"{pref_loss} with policy = reference")
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert sums.metrics[key].item() == 0.0, key


@pytest.mark.parametrize("pref", LOSSES, ids=lambda p: f"{p.pref_loss}-e{p.label_smoothing}")
def test_sft_weight_adds_the_chosen_mean_nll(pref, models, plain_batch):
    policy, reference = models
    reference = reference if pref.needs_reference else None
    weight = 0.7
    weighted = dataclasses.replace(pref, sft_weight=weight)
    logps, tokens = logps_of(policy, plain_batch)
    chosen_nll = -(logps.chunk(2)[0] / tokens.chunk(2)[0])
    with torch.no_grad():
        plain = objective_on(pref, reference).loss(policy, plain_batch)
        with_sft = objective_on(weighted, reference).loss(policy, plain_batch)
    close(with_sft.loss - plain.loss, weight * chosen_nll.sum(), f"sft_weight term ({pref.pref_loss})",
          scale=with_sft.loss)  # a difference of two losses keeps their rounding
    for key in plain.metrics:  # the rewards are the preference loss's own
        assert torch.equal(plain.metrics[key], with_sft.metrics[key]), key


def test_batch_ref_logps_are_used_instead_of_the_reference(models, plain_batch):
    policy, reference = models
    pref = PrefConfig(pref_loss="dpo", beta=0.1)
    ref_logps = logps_of(reference, plain_batch)[0]

    def no_reference(batch):
        raise AssertionError("objective.reference called although the batch carries ref_logps")

    objective = Preference(pref)
    objective.reference = no_reference
    with torch.no_grad():
        carried = objective.loss(policy, {**plain_batch, "ref_logps": ref_logps})
        computed = objective_on(pref, reference).loss(policy, plain_batch)
        shifted = objective.loss(policy, {**plain_batch, "ref_logps": ref_logps + torch.tensor([1.0] + [0.0] * 7)})
    close(carried.loss, computed.loss, "dpo with batch ref_logps vs objective.reference")
    for key in computed.metrics:
        close(carried.metrics[key], computed.metrics[key], f"batch ref_logps {key}", atol=1e-4)
    assert not torch.allclose(shifted.loss, carried.loss)  # the carried values are the ones used
    # without either, a loss needing a reference says so
    with pytest.raises(ValueError, match="reference"):
        Preference(pref).loss(policy, plain_batch)
