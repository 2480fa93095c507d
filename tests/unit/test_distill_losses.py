"""Distillation's per-token divergences against implementations no one here wrote: TRL's GKD
`generalized_jsd_loss` (beta 0, 0.5, 1) and MiniMind's `T^2 * kl_div(log_softmax(s/T),
softmax(t/T))`; the objective's loss is A x CE + (1 - A) x T^2 x D over the same trained tokens;
the stored top-k divergence is a lower bound that reaches the full one; on-policy rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from common.errors import ZerotrainError
from engine.objectives.distill import DISTILL, Distill, DistillConfig, token_divergence
from engine.stages import config_for

VOCAB = 37


@pytest.fixture(scope="module")
def logits():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(3, 7, VOCAB, generator=g) * 2
    teacher = torch.randn(3, 7, VOCAB, generator=g) * 2
    labels = torch.randint(0, VOCAB, (3, 7), generator=g)
    labels[0, :3] = -100  # a prompt
    labels[2, 5:] = -100  # padding
    return student, teacher, labels


def rounding_bound(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """How far fp32 rounding can move a divergence between log-probs `s` and `t` per position,
    whichever kernels torch picks (AVX-512, AVX2 or plain). An fp32 sum of VOCAB terms is off by
    up to VOCAB x eps x the sum of their sizes (here both KL directions' terms, which bound the
    JSD's); the roundings before the sum (log_softmax, the buckets' logsumexp) add to it, and the
    forward KL came to 1.03x that sum bound with AVX-512 kernels, hence 4x. An absolute 1e-5 held
    with AVX2 only (off by 1.27e-5 at 0.89 with AVX-512 and plain kernels)."""
    p, q = t.double().exp(), s.double().exp()
    size = (p * (t - s).double()).abs().sum(-1) + (q * (s - t).double()).abs().sum(-1)
    return (4 * VOCAB * torch.finfo(torch.float32).eps * size).float()


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_jsd_equals_trl_gkd(logits, beta, temperature):
    from trl.experimental.gkd import GKDTrainer

    student, teacher, labels = logits
    theirs = GKDTrainer.generalized_jsd_loss(student, teacher, labels=labels, beta=beta, temperature=temperature,
                                             reduction="none").sum(-1)
    ours = token_divergence(student, teacher, "jsd", beta=beta, temperature=temperature)[labels != -100]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert (ours > 0).all()


def test_forward_and_reverse_kl_are_trl_beta_0_and_1(logits):
    from trl.experimental.gkd import GKDTrainer

    student, teacher, labels = logits
    for kind, beta in (("forward_kl", 0.0), ("reverse_kl", 1.0)):
        theirs = GKDTrainer.generalized_jsd_loss(student, teacher, labels=labels, beta=beta, temperature=1.5,
                                                 reduction="batchmean")
        ours = token_divergence(student, teacher, kind, temperature=1.5)[labels != -100].mean()
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_forward_kl_is_minimind_kd(logits):
    """MiniMind's train_distillation.py: T^2 * kl_div(log_softmax(s/T), softmax(t/T), 'batchmean')
    over the kept tokens (rows = tokens)."""
    student, teacher, labels = logits
    keep = labels != -100
    s, t, temperature = student[keep], teacher[keep], 1.5
    minimind = temperature ** 2 * F.kl_div(F.log_softmax(s / temperature, dim=-1),
                                           F.softmax(t / temperature, dim=-1), reduction="batchmean")
    ours = temperature ** 2 * token_divergence(s, t, "forward_kl", temperature=temperature).mean()
    torch.testing.assert_close(ours, minimind, rtol=0, atol=1e-5)


class _Fixed(torch.nn.Module):
    """A 'model' that returns fixed logits (the shape transformers' outputs have)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, **kwargs):
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.logits)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_loss_is_alpha_ce_plus_t2_divergence_over_trained_tokens(logits, kind):
    student, teacher, labels = logits
    objective = Distill(DistillConfig(teacher="t", kd_loss=kind, kd_alpha=0.3, kd_temperature=2.0, kd_beta=0.4))
    padded = torch.cat([teacher, torch.randn(3, 7, 5)], dim=-1)  # a teacher with padded vocabulary rows
    objective.teacher = _Fixed(padded)
    batch = {"input_ids": labels.clamp(min=0), "labels": labels}
    out = objective.loss(_Fixed(student), batch)
    trained = labels[:, 1:] != -100
    assert objective.units(batch) == int(trained.sum())
    ce = F.cross_entropy(student[:, :-1][trained], labels[:, 1:][trained], reduction="sum")
    kd = token_divergence(student[:, :-1][trained], teacher[:, :-1][trained], kind, beta=0.4,
                          temperature=2.0).sum()
    torch.testing.assert_close(out.metrics["ce"], ce)
    torch.testing.assert_close(out.metrics["kd"], kd)
    torch.testing.assert_close(out.loss, 0.3 * ce + 0.7 * 4.0 * kd)


def test_a_teacher_with_fewer_tokens_is_refused(logits):
    student, teacher, labels = logits
    objective = Distill(DistillConfig(teacher="t"))
    objective.teacher = _Fixed(teacher[..., :-1])
    with pytest.raises(ZerotrainError, match="same tokenizer"):
        objective.loss(_Fixed(student), {"input_ids": labels.clamp(min=0), "labels": labels})


@pytest.mark.parametrize("argv, message", [
    (["--kd-loss", "kl"], "distill.kd_loss (--kd-loss) must be one of forward_kl, reverse_kl, jsd"),
    (["--kd-alpha", "1.5"], "distill.kd_alpha (--kd-alpha) must be a number in [0, 1]"),
    (["--kd-temperature", "0"], "distill.kd_temperature (--kd-temperature) must be a positive number"),
    (["--teacher-zero-stage", "2"], "distill.teacher_zero_stage (--teacher-zero-stage) must be one of 0, 3, got 2"),
    (["--on-policy-ratio", "1.5"], "distill.on_policy_ratio (--on-policy-ratio) must be a number in [0, 1]"),
    (["--teacher-top-k", "-1"], "must be 0 (live teacher) or the number of log-probs kept per token"),
    (["--teacher-top-k", "8", "--on-policy-ratio", "0.5"], "run the teacher live for on-policy steps"),
])
def test_bad_distill_flags_are_named(argv, message):
    with pytest.raises(ZerotrainError) as e:
        config_for(DISTILL, argv)
    assert message in str(e.value)


# --------------------------------------------------------------------------- the stored top-k

@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_top_k_divergence_rises_to_the_full_one(logits, kind):
    from engine.objectives.teacher import bucketed, top_k

    student, teacher, _ = logits
    s, t = F.log_softmax(student / 1.5, -1), F.log_softmax(teacher / 1.5, -1)
    full = token_divergence(s, t, kind, beta=0.3)
    tol = rounding_bound(s, t)
    previous = torch.zeros_like(full)
    for k in range(1, VOCAB + 1):
        ids, stored = top_k(t, k)
        torch.testing.assert_close(stored.exp().sum(-1), torch.ones_like(full))  # k tokens + the rest: a distribution
        ours = token_divergence(bucketed(s, ids), stored, kind, beta=0.3)
        assert (ours <= full + tol).all() and (ours >= previous - tol).all()  # merging outcomes never raises D
        previous = ours
    assert ((previous - full).abs() <= tol).all()  # k = vocabulary: the full divergence


def test_the_objective_reads_stored_teacher_log_probs(logits):
    from engine.objectives.teacher import bucketed, top_k

    student, teacher, labels = logits
    objective = Distill(DistillConfig(teacher="t", kd_loss="jsd", kd_temperature=2.0, teacher_top_k=5))
    trained = labels[:, 1:] != -100
    ids, stored = top_k(F.log_softmax(teacher[:, :-1][trained] / 2.0, -1), 5)
    batch = {"input_ids": labels.clamp(min=0), "labels": labels, "teacher_ids": ids, "teacher_logps": stored}
    out = objective.loss(_Fixed(student), batch)  # no teacher model at all
    expected = token_divergence(bucketed(F.log_softmax(student[:, :-1][trained] / 2.0, -1), ids), stored, "jsd").sum()
    torch.testing.assert_close(out.metrics["kd"], expected)
    with pytest.raises(ZerotrainError, match="does not match the prepared data"):
        objective.loss(_Fixed(student), {**batch, "teacher_ids": ids[1:], "teacher_logps": stored[1:]})


# --------------------------------------------------------------------------- on-policy

def test_an_on_policy_row_trains_the_divergence_alone(logits):
    student, teacher, labels = logits
    objective = Distill(DistillConfig(teacher="t", kd_alpha=0.3, kd_temperature=2.0))
    objective.teacher = _Fixed(teacher)
    batch = {"input_ids": labels.clamp(min=0), "labels": labels}
    data, sampled = objective.loss(_Fixed(student), batch), objective.loss(_Fixed(student), {**batch, "on_policy": torch.ones(())})
    assert "ce" not in sampled.metrics and sampled.metrics["on_policy"] == objective.units(batch)
    torch.testing.assert_close(sampled.loss, 0.7 * 4.0 * data.metrics["kd"])


def test_a_fraction_of_the_steps_is_on_policy_the_same_on_every_rank():
    a, b = (Distill(DistillConfig(teacher="t", on_policy_ratio=0.3)) for _ in range(2))
    a.seed = b.seed = 5
    draws = [a.on_policy(step) for step in range(1, 4001)]
    assert draws == [b.on_policy(step) for step in range(1, 4001)]
    assert abs(sum(draws) / len(draws) - 0.3) < 0.03
    never = Distill(DistillConfig(teacher="t"))
    never.seed = 5
    assert not any(never.on_policy(step) for step in range(1, 100))


def test_the_prompt_is_everything_before_the_last_reply():
    from engine.objectives.rollout import prompts

    ids = torch.arange(10, 22).unsqueeze(0)
    labels = torch.full_like(ids, -100)
    labels[0, 3:5] = ids[0, 3:5]  # an earlier reply: context of the sampled one
    labels[0, 8:11] = ids[0, 8:11]  # the last reply (then padding)
    assert prompts({"input_ids": ids, "labels": labels})[0].tolist() == list(range(10, 18))
    with pytest.raises(ZerotrainError, match="end with an assistant reply"):
        prompts({"input_ids": ids, "labels": torch.full_like(ids, -100)})


def test_a_store_that_does_not_match_the_data_is_named(tmp_path):
    import numpy as np

    from engine.objectives.teacher import WithTeacher

    np.save(tmp_path / "train.offsets.npy", np.array([0, 2, 5, 6]))
    np.save(tmp_path / "train.ids.npy", np.zeros((6, 4), np.int32))
    np.save(tmp_path / "train.logps.npy", np.zeros((6, 5), np.float32))
    examples = [{"input_ids": torch.zeros(3)}] * 3
    assert len(WithTeacher(examples, tmp_path, "train")[1]["teacher_ids"]) == 3
    with pytest.raises(ZerotrainError, match="for 3 examples, the prepared data has 4; delete the directory"):
        WithTeacher(examples + examples[:1], tmp_path, "train")
    (tmp_path / "train.logps.npy").write_bytes(b"not numpy")
    with pytest.raises(ZerotrainError, match="unreadable teacher log-probs"):
        WithTeacher(examples, tmp_path, "train")
