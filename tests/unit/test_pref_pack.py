"""--pack beyond SFT: a packed micro-batch trains exactly as the padded one.

Preference pairs (engine.data.pairs.collate_pref_packed): the 2B sequences packed into fewer rows
give the padded batch's per-pair losses, rewards, units and gradients, for dpo (with cDPO
smoothing), ipo, simpo and orpo, with sft_weight, whatever the reference: a frozen model, the
policy with its LoRA adapter disabled, or log-probs precomputed once over the data.

Distillation (collate_packed): the packed batch gives the padded one's loss and gradients with a
live teacher (which gets the student's position_ids) and with stored top-k teacher log-probs,
whose rows follow the packed batch's trained tokens in row-major order.
"""

from __future__ import annotations

import copy
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from engine.data.collate import collate_packed, collate_pad
from engine.data.format import IGNORE_INDEX
from engine.data.pairs import collate_pref, collate_pref_packed
from engine.distributed import World
from engine.objectives.base import model_inputs
from engine.objectives.distill import Distill, DistillConfig
from engine.objectives.preference import (
    PrefConfig,
    Preference,
    batch_logps,
    model_logps,
    pair_losses,
)
from model.build import build_model

# transformers 5 renames the gradient_checkpointing argument peft still reads
pytestmark = pytest.mark.filterwarnings("ignore:.*is deprecated and will be removed in v6:FutureWarning")

VOCAB, SEQ_LEN, PAD = 64, 32, 0
ATOL = 1e-5
REL = 1e-6
"""Summed log-probs (~50) round at a few 1e-6: packed and padded batches sum in another order, and
so do the CPU kernels (ATEN_CPU_CAPABILITY), so values are compared relative to their size too."""


def tokens(g: torch.Generator, n: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n,), generator=g)


def pairs(n: int = 5, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Pairs of different prompt and reply lengths, labelled on the replies only (as prepared)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prompt = tokens(g, int(torch.randint(2, 8, (), generator=g)))
        pair = {}
        for side in ("chosen", "rejected"):
            reply = tokens(g, int(torch.randint(2, 10, (), generator=g)))
            pair[f"{side}_input_ids"] = torch.cat([prompt, reply])
            pair[f"{side}_labels"] = torch.cat([torch.full_like(prompt, IGNORE_INDEX), reply])
        out.append(pair)
    return out


def conversations(n: int = 6, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """SFT examples: a masked prompt, then trained reply tokens."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prompt = tokens(g, int(torch.randint(2, 7, (), generator=g)))
        reply = tokens(g, int(torch.randint(3, 9, (), generator=g)))
        out.append({"input_ids": torch.cat([prompt, reply]),
                    "labels": torch.cat([torch.full_like(prompt, IGNORE_INDEX), reply])})
    return out


def perturbed(model: torch.nn.Module, scale: float, seed: int) -> torch.nn.Module:
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return other


@pytest.fixture(scope="module")
def reference() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("debug", vocab_size=VOCAB).eval().requires_grad_(False)


def fresh_policy(reference: torch.nn.Module, lora: bool) -> torch.nn.Module:
    """A policy away from the reference: a perturbed full copy, or the reference under a LoRA
    adapter with non-zero weights (so disabling it gives the reference back)."""
    if not lora:
        return perturbed(reference, 0.05, seed=1).train().requires_grad_(True)
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(2)  # lora_A's init
    policy = get_peft_model(copy.deepcopy(reference), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                                 target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(2))
    return policy.train()


def grads(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])


def close(ours, theirs, what: str) -> None:
    torch.testing.assert_close(torch.as_tensor(ours).float(), torch.as_tensor(theirs).float(), rtol=REL, atol=ATOL,
                               msg=lambda m: f"{what}: {m}")


# --------------------------------------------------------------------------- the packed layout

def test_pairs_are_packed_chosen_then_rejected_with_a_map_of_whose_token_is_whose():
    examples = pairs()
    for i, e in enumerate(examples):
        e["ref_chosen_logps"], e["ref_rejected_logps"] = torch.tensor(-1.0 - i), torch.tensor(-10.0 - i)
    padded = collate_pref(examples, PAD)
    packed = collate_pref_packed(examples, SEQ_LEN, PAD)
    assert "attention_mask" not in packed and packed["input_ids"].shape[1] <= SEQ_LEN
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]  # the point of packing
    ids, marks = packed["input_ids"], packed["sequence_ids"]
    assert marks.shape == ids.shape
    sequences = [(e[f"{side}_input_ids"], e[f"{side}_labels"]) for side in ("chosen", "rejected") for e in examples]
    for i, (input_ids, labels) in enumerate(sequences):
        where = marks == i
        assert torch.equal(ids[where], input_ids)  # whole, in one row, in order
        assert where.any(dim=1).sum() == 1
        assert torch.equal(packed["position_ids"][where], torch.arange(len(input_ids)))
        assert torch.equal(packed["labels"][where][1:], labels[1:])
    # in row-major order the marks run 0, 1, ..., 2B - 1: chosen sequences, then rejected ones
    seen = marks[marks >= 0]
    assert torch.equal(seen.unique_consecutive(), torch.arange(2 * len(examples)))
    assert (packed["labels"][marks < 0] == IGNORE_INDEX).all() and (ids[marks < 0] == PAD).all()
    assert torch.equal(packed["ref_logps"], padded["ref_logps"])
    objective = Preference(PrefConfig())
    assert objective.units(packed) == objective.units(padded) == len(examples)


# --------------------------------------------------------------------------- preference losses

def run_cfg(lora: bool, micro_batch_size: int = 2, chunk: int = 0) -> SimpleNamespace:
    """What engine.objectives.reference reads of a run's config."""
    return SimpleNamespace(lora=SimpleNamespace(enabled=lora),
                           train=SimpleNamespace(micro_batch_size=micro_batch_size, loss_chunk_size=chunk))


PLAN = SimpleNamespace(init_source=None, ds_config={"zero_optimization": {"stage": 0}})


def live_reference(monkeypatch, reference, policy, lora: bool, chunk: int = 0):
    """engine.objectives.reference.reference_logps, its frozen model being `reference` (built elsewhere from
    the run's source; here the fixture's model)."""
    from engine.objectives import reference as ref_module

    monkeypatch.setattr(ref_module, "frozen_model", lambda *args, **kwargs: reference)
    return ref_module.reference_logps(run_cfg(lora, chunk=chunk), PLAN,
                                      SimpleNamespace(module=policy, device=torch.device("cpu")), "", model_logps)


@pytest.mark.parametrize("lora", [False, True], ids=["frozen", "lora-disabled"])
def test_a_live_reference_through_the_head_in_chunks_gives_the_full_logits_log_probs(lora, reference, monkeypatch):
    batch = collate_pref_packed(pairs(), SEQ_LEN, PAD)
    policy = fresh_policy(reference, lora=lora)
    full, chunked = (live_reference(monkeypatch, reference, policy, lora, chunk)(batch) for chunk in (0, 5))
    close(chunked, full, "reference log-probs")


def precomputed(monkeypatch, tmp_path: Path, reference, collate) -> list[dict]:
    """The pairs with their reference log-probs from engine.objectives.reference.precompute, run over the
    data with `collate` (the run's own: packed or padded)."""
    from engine.objectives import reference as ref_module

    monkeypatch.setattr(ref_module, "frozen_model", lambda *args, **kwargs: reference)
    monkeypatch.setattr(ref_module, "reference_key", lambda cfg, plan, ref_from: "key")
    data = SimpleNamespace(train=pairs(), val=None, collate=collate, loader=SimpleNamespace(dataset=None))
    ref_module.precompute(run_cfg(False), PLAN, SimpleNamespace(module=None, device=torch.device("cpu")), data,
                          tmp_path, World(), lambda message: None, "", model_logps)
    return [data.train[i] for i in range(len(data.train))]


PREFS = {
    "dpo": PrefConfig(pref_loss="dpo", beta=0.2),
    "cdpo-sft": PrefConfig(pref_loss="dpo", beta=0.2, label_smoothing=0.1, sft_weight=0.5),
    "ipo": PrefConfig(pref_loss="ipo", beta=0.5),
    "simpo-sft": PrefConfig(pref_loss="simpo", beta=2.0, simpo_gamma=0.5, sft_weight=0.3),
    "orpo": PrefConfig(pref_loss="orpo", beta=0.1),
}
CASES = [(name, ref) for name, pref in PREFS.items()
         for ref in (("frozen", "lora-disabled", "precomputed") if pref.needs_reference else ("none",))]


@pytest.mark.parametrize(("name", "ref"), CASES, ids=[f"{n}-{r}" for n, r in CASES])
def test_packed_pairs_give_the_padded_losses_rewards_and_gradients(name, ref, reference, monkeypatch, tmp_path):
    pref = PREFS[name]
    pack = partial(collate_pref_packed, seq_len=SEQ_LEN, pad_id=PAD)
    pad = partial(collate_pref, pad_id=PAD)
    if ref == "precomputed":
        padded_pairs = precomputed(monkeypatch, tmp_path / "padded", reference, pad)
        packed_pairs = precomputed(monkeypatch, tmp_path / "packed", reference, pack)
        close(pack(packed_pairs)["ref_logps"], pad(padded_pairs)["ref_logps"], "precomputed reference log-probs")
        batches = {"padded": pad(padded_pairs), "packed": pack(packed_pairs)}
    else:
        batches = {"padded": pad(pairs()), "packed": pack(pairs())}
    assert batches["packed"]["input_ids"].shape[0] < batches["padded"]["input_ids"].shape[0]
    results = {}
    for layout, batch in batches.items():
        policy = fresh_policy(reference, lora=ref == "lora-disabled")
        objective = Preference(pref)
        if ref in ("frozen", "lora-disabled"):
            objective.reference = live_reference(monkeypatch, reference, policy, lora=ref == "lora-disabled")
        # per pair, from the same log-probs the objective reads
        with torch.no_grad():
            logps, counts = batch_logps(policy(**model_inputs(batch), use_cache=False).logits, batch)
            ref_logps = batch["ref_logps"] if ref == "precomputed" else (
                objective.reference(batch) if objective.reference else None)
        terms = pair_losses(pref, *logps.chunk(2), *counts.chunk(2),
                            *(ref_logps.chunk(2) if ref_logps is not None else (None, None)))
        out = objective.loss(policy, batch)
        out.loss.backward()
        results[layout] = SimpleNamespace(units=objective.units(batch), terms=terms, logps=logps, counts=counts,
                                          loss=out.loss.detach(), metrics=out.metrics, grads=grads(policy))
    padded, packed = results["padded"], results["packed"]
    assert packed.units == padded.units == len(pairs())
    assert torch.equal(packed.counts, padded.counts)
    close(packed.logps, padded.logps, "sequence log-probs")
    for key in ("loss", "chosen_rewards", "rejected_rewards"):
        close(getattr(packed.terms, key), getattr(padded.terms, key), f"per-pair {key}")
    close(packed.loss, padded.loss, "loss")
    assert packed.metrics.keys() == padded.metrics.keys()
    for key in padded.metrics:
        close(packed.metrics[key], padded.metrics[key], key)
    assert padded.grads.abs().max() > 1e-4  # a gradient worth comparing
    close(packed.grads, padded.grads, "gradients")


# --------------------------------------------------------------------------- distillation

@pytest.fixture(scope="module")
def teacher(reference) -> torch.nn.Module:
    return perturbed(reference, 0.1, seed=3).requires_grad_(False)


def distill_step(student: torch.nn.Module, objective: Distill, batch: dict) -> SimpleNamespace:
    student = copy.deepcopy(student).train().requires_grad_(True)
    out = objective.loss(student, batch)
    out.loss.backward()
    return SimpleNamespace(units=objective.units(batch), loss=out.loss.detach(), metrics=out.metrics,
                           grads=grads(student))


def same_step(packed: SimpleNamespace, padded: SimpleNamespace) -> None:
    assert packed.units == padded.units
    close(packed.loss, padded.loss, "loss")
    for key in ("ce", "kd"):
        close(packed.metrics[key], padded.metrics[key], key)
    assert padded.grads.abs().max() > 1e-4
    close(packed.grads, padded.grads, "gradients")


def kd_config(**kwargs) -> DistillConfig:
    return DistillConfig(teacher="t", kd_loss="jsd", kd_beta=0.3, kd_alpha=0.4, kd_temperature=2.0, **kwargs)


def test_packed_distillation_with_a_live_teacher_gives_the_padded_step(reference, teacher):
    objective = Distill(kd_config())
    seen = []

    def watched(**inputs):
        seen.append(inputs)
        return teacher(**inputs)

    objective.teacher = watched
    examples = conversations()
    packed_batch = collate_packed(examples, SEQ_LEN, PAD)
    assert packed_batch["input_ids"].shape[0] < len(examples)
    padded = distill_step(reference, objective, collate_pad(examples, PAD))
    packed = distill_step(reference, objective, packed_batch)
    assert torch.equal(seen[-1]["position_ids"], packed_batch["position_ids"])  # the student's own positions
    same_step(packed, padded)


class _Vocab:
    """What the teacher store reads of the run's tokenizer."""

    pad_token_id = PAD

    def __len__(self) -> int:
        return VOCAB


def with_store(monkeypatch, tmp_path: Path, teacher, collate, k: int) -> SimpleNamespace:
    """`data` after engine.objectives.teacher.compute + attach, with `collate` the run's own."""
    from engine.objectives import teacher as teacher_logits

    monkeypatch.setattr(teacher_logits, "frozen_model", lambda *args, **kwargs: teacher)
    monkeypatch.setattr(teacher_logits, "frozen_key", lambda *args, **kwargs: "key")
    cfg = SimpleNamespace(train=SimpleNamespace(micro_batch_size=2))
    plan = SimpleNamespace(tokenizer=_Vocab(), precision="fp32")
    data = SimpleNamespace(train=conversations(), val=None, collate=collate, loader=SimpleNamespace())
    store = teacher_logits.compute(cfg, plan, torch.device("cpu"), data, tmp_path, World(),
                                   SimpleNamespace(path=tmp_path / "teacher"), False, lambda message: None, top_k=k,
                                   temperature=2.0)
    teacher_logits.attach(data, store)
    return data


@pytest.mark.parametrize("k", [5, VOCAB], ids=["top-5", "whole-vocabulary"])
def test_packed_distillation_with_a_stored_teacher_gives_the_padded_step(k, reference, teacher, monkeypatch,
                                                                         tmp_path):
    """With k the whole vocabulary the stored loss is the live teacher's: the stored rows are
    the packed batch's trained tokens, in order."""
    objective = Distill(kd_config(teacher_top_k=k))
    steps = {}
    for layout, collate in (("padded", partial(collate_pad, pad_id=PAD)),
                            ("packed", partial(collate_packed, seq_len=SEQ_LEN, pad_id=PAD))):
        data = with_store(monkeypatch, tmp_path / layout, teacher, collate, k)
        batch = data.collate([data.train[i] for i in range(len(data.train))])
        assert "teacher_logps" in batch
        steps[layout] = distill_step(reference, objective, batch)
    same_step(steps["packed"], steps["padded"])
    if k == VOCAB:
        live = Distill(kd_config())
        live.teacher = teacher
        same_step(steps["packed"], distill_step(reference, live, collate_packed(conversations(), SEQ_LEN, PAD)))

