"""--loss-chunk-size: the LM loss from the decoder's hidden states, chunk by chunk, equals
transformers' own path (the full logits, then cross-entropy) in value and in every gradient, for
SFT labels (prompt tokens ignored), packed rows, tied and untied heads, GPT-2 and Llama, eager and
sdpa attention, and a LoRA model whose head is trained (modules_to_save)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from engine.data.format import IGNORE_INDEX
from engine.objectives.causal_lm import CausalLM
from engine.objectives.tokens import lm_nll_sum
from model.presets import preset_config


def tiny_model(arch: str, tie: bool, attn: str, vocab: int = 997):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    if arch == "gpt2":
        config = preset_config("gpt2-124m", vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                               tie_word_embeddings=tie)
    else:
        config = preset_config("debug", vocab_size=vocab, tie_word_embeddings=tie)
    config._attn_implementation = attn
    return AutoModelForCausalLM.from_config(config).float()


def batch(vocab: int, packed: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (3, 40), generator=g)
    labels = ids.clone()
    labels[0, :12] = IGNORE_INDEX  # an SFT prompt
    labels[2, 30:] = IGNORE_INDEX  # padding
    out = {"input_ids": ids, "labels": labels}
    if packed:  # two examples in each row; the first token of the second is not trained
        out["position_ids"] = torch.cat([torch.arange(17), torch.arange(23)]).expand(3, -1).clone()
        labels[:, 17] = IGNORE_INDEX
    else:
        out["attention_mask"] = (labels != IGNORE_INDEX).long() | (torch.arange(40) < 12).long()
    return out


def reference(model, b) -> torch.Tensor:
    inputs = {k: v for k, v in b.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), b["labels"][:, 1:].flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_gradients(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Equal to 1e-5 relative in norm: the sums run in another order, so single entries near zero
    differ by rounding (a few 1e-6 absolute on entries of size ~5)."""
    assert got.keys() == expected.keys()
    for name, e in expected.items():
        assert float((got[name] - e).norm() / e.norm().clamp_min(1e-30)) <= 1e-5, name


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "checkpointed"])
@pytest.mark.parametrize("arch, tie, attn, packed", [
    ("llama", True, "sdpa", False), ("llama", False, "eager", False), ("llama", True, "sdpa", True),
    ("llama", True, "eager", True), ("gpt2", True, "sdpa", False)])
def test_chunked_loss_and_gradients_equal_the_full_logits(arch, tie, attn, packed, fused, monkeypatch):
    """Both paths: the fused one a plain head takes, and the checkpointed one of ZeRO-3 and peft heads."""
    import engine.objectives.tokens as tokens

    if not fused:
        monkeypatch.setattr(tokens, "fusable_head", lambda head: False)
    model = tiny_model(arch, tie, attn)
    other = copy.deepcopy(model)
    b = batch(997, packed)
    full = reference(model, b)
    full.backward()
    chunked = lm_nll_sum(other, b, chunk=7)  # 7 does not divide the trained tokens
    chunked.backward()
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=0)
    assert_same_gradients(grads(other), grads(model))


def test_a_lora_model_with_a_trained_head():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("llama", False, "sdpa"),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]))
    other = copy.deepcopy(model)
    b = batch(997, False)
    full = reference(model, b)
    full.backward()
    chunked = CausalLM(5).loss(other, b).loss
    chunked.backward()
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=0)
    assert any("lm_head" in n for n in grads(other))
    assert_same_gradients(grads(other), grads(model))


def test_validation_without_gradients():
    model = tiny_model("llama", True, "sdpa")
    b = batch(997, False)
    with torch.no_grad():
        torch.testing.assert_close(lm_nll_sum(model, b, 9), reference(model, b), rtol=1e-5, atol=0)


def test_a_batch_without_trained_tokens():
    model = tiny_model("llama", True, "sdpa")
    b = batch(997, False)
    b["labels"][:] = IGNORE_INDEX
    loss = lm_nll_sum(model, b, 7)
    loss.backward()
    assert float(loss) == 0.0 and all(float(p.grad.abs().sum()) == 0.0 for p in model.parameters() if p.grad is not None)


# --------------------------------------------------------------------------- distillation

def distill_pair(kind: str, top_k: int = 0):
    """A student and a teacher with a larger (padded) embedding, the objective, and the batch."""
    from engine.objectives.distill import Distill, DistillConfig

    student = tiny_model("llama", True, "sdpa")
    torch.manual_seed(5)
    teacher = tiny_model("llama", False, "sdpa", vocab=1003).requires_grad_(False).eval()
    kd = DistillConfig(teacher="t", kd_loss=kind, kd_alpha=0.3, kd_temperature=2.0, kd_beta=0.4, teacher_top_k=top_k)
    full, chunked = Distill(kd), Distill(kd, chunk=7)
    full.teacher = chunked.teacher = teacher
    b = batch(997, packed=True)
    if top_k:
        from engine.objectives.teacher import top_k as keep_top

        mask = b["labels"][:, 1:] != IGNORE_INDEX
        with torch.no_grad():
            logits = teacher(input_ids=b["input_ids"], position_ids=b["position_ids"]).logits[..., :997]
        b["teacher_ids"], b["teacher_logps"] = keep_top(F.log_softmax(logits[:, :-1][mask] / 2.0, -1), top_k)
    return student, full, chunked, b


@pytest.mark.parametrize("kind, top_k, on_policy", [
    ("forward_kl", 0, False), ("reverse_kl", 0, False), ("jsd", 0, False), ("jsd", 0, True), ("forward_kl", 9, False)])
def test_distillation_chunked_equals_the_full_logits(kind, top_k, on_policy):
    """CE and D of both models' LM heads chunk by chunk (a live teacher, with padded vocabulary rows,
    or its stored top-k) against the full logits: the loss, both metrics and every gradient."""
    student, full, chunked, b = distill_pair(kind, top_k)
    if on_policy:
        b["on_policy"] = torch.ones(())
    other = copy.deepcopy(student)
    expected, got = full.loss(student, b), chunked.loss(other, b)
    expected.loss.backward()
    got.loss.backward()
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=0)
    assert got.metrics.keys() == expected.metrics.keys()
    for name in expected.metrics:
        torch.testing.assert_close(got.metrics[name], expected.metrics[name], rtol=1e-5, atol=0)
    assert_same_gradients(grads(other), grads(student))
    assert all(p.grad is None for p in full.teacher.parameters())


def test_distillation_chunked_refuses_a_store_that_does_not_match():
    from common.errors import ZerotrainError

    student, _, chunked, b = distill_pair("forward_kl", top_k=5)
    with pytest.raises(ZerotrainError, match="does not match the prepared data"):
        chunked.loss(student, {**b, "teacher_ids": b["teacher_ids"][1:], "teacher_logps": b["teacher_logps"][1:]})


def test_liger_kernel_is_taken_on_cuda_only_and_only_where_installed(monkeypatch):
    import sys
    import types

    from engine.objectives.tokens import liger_fused_nll

    def fused(*args, **kwargs):
        raise AssertionError("not called here")

    functional = types.ModuleType("liger_kernel.transformers.functional")
    functional.liger_fused_linear_cross_entropy = fused
    for name, module in (("liger_kernel", types.ModuleType("liger_kernel")),
                         ("liger_kernel.transformers", types.ModuleType("liger_kernel.transformers")),
                         ("liger_kernel.transformers.functional", functional)):
        monkeypatch.setitem(sys.modules, name, module)
    assert liger_fused_nll(torch.device("cuda")) is fused
    assert liger_fused_nll(torch.device("cpu")) is None  # a Triton kernel: the torch path on CPU
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.functional", None)  # not installed
    assert liger_fused_nll(torch.device("cuda")) is None
    model = tiny_model("llama", True, "sdpa")
    lm_nll_sum(model, batch(997, False), chunk=7).backward()  # CPU: _FusedLinearNLL, never the fake


# --------------------------------------------------------------------------- preference pairs

def pair_batch(packed: bool) -> dict[str, torch.Tensor]:
    """Three pairs sharing each pair's prompt, padded (one row a sequence) or packed."""
    from engine.data.pairs import collate_pref, collate_pref_packed

    g = torch.Generator().manual_seed(2)
    pairs = []
    for prompt, chosen, rejected in ((9, 6, 11), (5, 14, 4), (12, 3, 8)):
        head = torch.randint(0, 997, (prompt,), generator=g)
        sides = {}
        for side, n in (("chosen", chosen), ("rejected", rejected)):
            ids = torch.cat([head, torch.randint(0, 997, (n,), generator=g)])
            labels = ids.clone()
            labels[:prompt] = IGNORE_INDEX
            sides[f"{side}_input_ids"], sides[f"{side}_labels"] = ids, labels
        pairs.append(sides)
    return collate_pref_packed(pairs, 40, 0) if packed else collate_pref(pairs, 0)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("kind", ["dpo", "simpo"])
def test_preference_chunked_equals_the_full_logits(kind, packed):
    """Per-sequence log-probs through the head chunk by chunk (7 tokens, so chunks straddle sequences):
    the loss, every metric and gradient of the full logits; the reference's without gradients."""
    from engine.objectives.preference import PrefConfig, Preference, model_logps

    model = tiny_model("llama", True, "sdpa")
    other = copy.deepcopy(model)
    b = pair_batch(packed)
    assert ("sequence_ids" in b) == packed
    with torch.no_grad():
        reference, chunked_reference = model_logps(model, b)[0], model_logps(model, b, chunk=7)
    torch.testing.assert_close(chunked_reference[0], reference, rtol=1e-5, atol=1e-4)
    b["ref_logps"] = reference + torch.linspace(-1, 1, len(reference))  # a reference that differs
    pref = PrefConfig(pref_loss=kind, beta=0.3, sft_weight=0.2)
    expected, got = Preference(pref).loss(model, b), Preference(pref, chunk=7).loss(other, b)
    expected.loss.backward()
    got.loss.backward()
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=1e-6)
    for name in expected.metrics:
        torch.testing.assert_close(got.metrics[name], expected.metrics[name], rtol=1e-5, atol=1e-5)
    assert_same_gradients(grads(other), grads(model))
