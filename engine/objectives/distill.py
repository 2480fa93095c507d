"""Distillation: a frozen teacher's next-token distributions into the trained student.

    loss = A x CE + (1 - A) x T^2 x D(teacher, student)

CE is the student's cross-entropy on the data and D a divergence between the two models'
next-token distributions, both softened by the temperature T (Hinton et al.; T^2 keeps the
gradient scale of D independent of T). Both are summed over the same trained tokens (the
trained-token rule of engine.objectives.causal_lm: SFT's assistant tokens, or every token of
pretraining text) and the loop divides by their count, so CE and D are per-token means.

D (--kd-loss): forward_kl = KL(teacher || student), the classic and MiniMind's; reverse_kl =
KL(student || teacher), MiniLLM's; jsd = GKD's generalised Jensen-Shannon divergence
beta KL(teacher || M) + (1 - beta) KL(student || M), M = beta teacher + (1 - beta) student, with
beta = 0 and 1 meaning forward and reverse KL as in TRL.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn.functional as F

from common.errors import ZerotrainError
from engine.objectives import Batch, LossSums, Objective, Stage
from engine.objectives.causal_lm import token_nll_sum, trained_tokens

if TYPE_CHECKING:
    from engine.builders import Data, RunPlan
    from engine.config import Config, DistillConfig


def token_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str, *,
                     beta: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    """D per position ([..., vocab] -> [...]), in fp32, on temperature-softened distributions."""
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if kind == "jsd" and beta == 0:
        kind = "forward_kl"
    elif kind == "jsd" and beta == 1:
        kind = "reverse_kl"
    if kind == "forward_kl":
        return F.kl_div(student, teacher, reduction="none", log_target=True).sum(-1)
    if kind == "reverse_kl":
        return F.kl_div(teacher, student, reduction="none", log_target=True).sum(-1)
    if kind != "jsd":
        raise ValueError(f"unknown divergence {kind!r}")
    mixture = torch.logsumexp(torch.stack([student + math.log1p(-beta), teacher + math.log(beta)]), dim=0)
    return (beta * F.kl_div(mixture, teacher, reduction="none", log_target=True).sum(-1)
            + (1 - beta) * F.kl_div(mixture, student, reduction="none", log_target=True).sum(-1))


class Distill(Objective):
    """CE and the divergence to the teacher, summed over trained tokens; averaged per token by the loop."""

    unit = "token"

    def __init__(self, kd: DistillConfig):
        self.kd = kd
        self.teacher: Callable[..., Any] | None = None

    def check(self, cfg: Config, plan: RunPlan) -> None:
        from engine.modeling import resolve_init_from
        from model.tokenizer import load_tokenizer, tokenizer_fingerprint

        if not self.kd.teacher:
            raise ZerotrainError("--teacher is required: the model to distil from (HF dir, run dir, .pth/.safetensors "
                                 "with --preset, or a DeepSpeed checkpoint)")
        self.source = resolve_init_from(self.kd.teacher)
        if self.source.tokenizer is not None:
            theirs = tokenizer_fingerprint(load_tokenizer(str(self.source.tokenizer)))
            if theirs != tokenizer_fingerprint(plan.tokenizer):
                raise ZerotrainError(f"--teacher {self.kd.teacher} uses another tokenizer ({self.source.tokenizer}) than "
                                     "the student: distillation compares next-token distributions over one vocabulary, "
                                     "so both must use the same tokenizer")

    def build(self, cfg: Config, plan: RunPlan, engine: Any, data: Data) -> None:
        from engine.ds_config import zero_stage
        from engine.frozen import frozen_model

        stage = self.kd.teacher_zero_stage
        zero3 = stage == 3 or (stage is None and zero_stage(plan.ds_config) == 3)
        self.teacher = frozen_model(cfg, plan, engine.device, self.source, zero3=zero3)

    def units(self, batch: Batch) -> int:
        return int(trained_tokens(batch["labels"]).sum())

    def loss(self, model: Callable[..., Any], batch: Batch) -> LossSums:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs, use_cache=False).logits
        with torch.no_grad():
            teacher = self.teacher(**inputs, use_cache=False).logits
        vocab = logits.shape[-1]
        if teacher.shape[-1] < vocab:
            raise ZerotrainError(f"the teacher scores {teacher.shape[-1]} tokens, the student {vocab}: both must use "
                                 "the same tokenizer")
        # A larger teacher embedding holds padding rows beyond the tokenizer (rounded-up vocab sizes).
        teacher = teacher[..., :vocab]
        mask = trained_tokens(batch["labels"])
        ce = token_nll_sum(logits, batch["labels"])
        kd = token_divergence(logits[:, :-1][mask], teacher[:, :-1][mask], self.kd.kd_loss, beta=self.kd.kd_beta,
                              temperature=self.kd.kd_temperature).sum()
        a, t = self.kd.kd_alpha, self.kd.kd_temperature
        return LossSums(a * ce + (1 - a) * t * t * kd, {"ce": ce.detach(), "kd": kd.detach()})


DISTILL = Stage("distill", data_kind="auto", objective=lambda cfg: Distill(cfg.distill), config_sections=("distill",))
