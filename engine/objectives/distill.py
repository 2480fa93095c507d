"""Distillation: a frozen teacher's next-token distributions into the trained student.

    loss = A x CE + (1 - A) x T^2 x D(teacher, student)

CE is the student's cross-entropy on the data and D a divergence between the two models'
next-token distributions, both softened by the temperature T (Hinton et al.; T^2 keeps the
gradient scale of D independent of T). Both are summed over the same trained tokens (the
trained-token rule of engine.objectives.tokens: SFT's assistant tokens, or every token of
pretraining text) and the loop divides by their count, so CE and D are per-token means.

D (--kd-loss): forward_kl = KL(teacher || student), the classic and MiniMind's; reverse_kl =
KL(student || teacher), MiniLLM's; jsd = GKD's generalised Jensen-Shannon divergence
beta KL(teacher || M) + (1 - beta) KL(student || M), M = beta teacher + (1 - beta) student, with
beta = 0 and 1 meaning forward and reverse KL as in TRL.

On-policy steps (--on-policy-ratio, engine.objectives.rollout) take D on the student's own sampled replies;
an offline teacher (--teacher-top-k, engine.objectives.teacher) gives D from stored top-k log-probs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from common.errors import ZerotrainError
from engine.config.sections import Given, choice, invalid, require_positive
from engine.objectives.base import Batch, LossSums, Objective, Stage, model_inputs
from engine.objectives.tokens import (
    chunk_count,
    decoder_states,
    language_model,
    summed_over_chunks,
    token_nll_sum,
    trained_targets,
    trained_tokens,
)

if TYPE_CHECKING:
    from pathlib import Path

    from engine.config.tree import Config
    from engine.distributed import World
    from engine.training.parts import Data, RunPlan


KD_LOSSES = ("forward_kl", "reverse_kl", "jsd")


@dataclass
class DistillConfig:
    """Distillation (launcher/distill.py): loss = kd_alpha x CE + (1 - kd_alpha) x T^2 x D(teacher, student)."""

    SECTION: ClassVar[str] = "distill"

    teacher: str = ""
    """The teacher: what --init-from takes (HF dir, run dir, .pth/.safetensors shaped like --preset, DeepSpeed
    checkpoint); it must use the student's tokenizer."""
    kd_loss: str = choice("forward_kl", KD_LOSSES)
    """D: forward_kl KL(teacher || student) (MiniMind, classic KD), reverse_kl KL(student || teacher) (MiniLLM),
    or jsd, GKD's generalised Jensen-Shannon divergence with --kd-beta."""
    kd_beta: float = 0.5
    """jsd only: the mixture weight (0 gives forward KL, 1 reverse KL, as in TRL's GKD)."""
    kd_temperature: float = 1.0
    """T: both distributions are softened by it; D is scaled by T^2 (Hinton et al.)."""
    kd_alpha: float = 0.5
    """A: the weight of the cross-entropy on the data; 1 - A weighs the divergence."""
    teacher_zero_stage: int | None = choice(None, (0, 3))
    """3 partitions the teacher over the ranks (no optimizer state), so a teacher larger than one device fits;
    default: 3 when the run is ZeRO-3, else a whole copy per rank."""
    on_policy_ratio: float = 0.0
    """L: the fraction of steps on which the student samples the replies to the data's prompts itself and D is
    taken on its samples (GKD's lambda; MiniLLM trains on the student's samples only). SFT data only."""
    on_policy_max_new_tokens: int = 128
    """Longest sampled reply (also capped by --seq-len)."""
    on_policy_temperature: float = 1.0
    """Sampling temperature of the student's replies (pure sampling otherwise: no top-k/top-p)."""
    teacher_top_k: int = 0
    """Offline teacher: train from the teacher's top-k log-probs of every trained token, stored beside the
    prepared data (`zerotrain teacher-logits`, or computed at start when missing), with no teacher loaded
    while training; 0 runs the teacher live."""

    def __post_init__(self) -> None:
        for name in ("kd_beta", "kd_alpha"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                invalid(self, name, getattr(self, name), "a number in [0, 1]")
        require_positive(self, "kd_temperature")
        if not 0.0 <= self.on_policy_ratio <= 1.0:
            invalid(self, "on_policy_ratio", self.on_policy_ratio, "a number in [0, 1]")
        require_positive(self, "on_policy_max_new_tokens")
        require_positive(self, "on_policy_temperature")
        if self.teacher_top_k < 0:
            invalid(self, "teacher_top_k", self.teacher_top_k, "0 (live teacher) or the number of log-probs kept per token")
        if self.teacher_top_k and self.on_policy_ratio:
            invalid(self, "on_policy_ratio", self.on_policy_ratio, "0 with --teacher-top-k: stored teacher log-probs cover the "
                 "data's replies, not the student's samples; run the teacher live for on-policy steps")


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
    """CE and the divergence to the teacher, summed over trained tokens; averaged per token by the loop.

    The teacher runs live (a frozen model beside the student, engine.objectives.frozen) or offline, from its
    top-k log-probs stored beside the prepared data (engine.objectives.teacher, --teacher-top-k).
    With --on-policy-ratio L, a seeded draw per step (the same on every rank) makes a fraction L
    of the steps on-policy: the student samples the replies (engine.objectives.rollout) and D is taken on
    its samples. CE is left out on those steps: a sample of the student's own is no target for
    it, so such a step's loss is (1 - A) x T^2 x D alone.
    """

    unit = "token"

    def __init__(self, kd: DistillConfig, chunk: int = 0):
        self.kd, self.chunk = kd, chunk  # --loss-chunk-size: trained tokens through the LM heads at a time
        self.teacher: Callable[..., Any] | None = None

    def check(self, cfg: Config, plan: RunPlan) -> None:
        from engine.training.init_from import resolve_init_from
        from model.tokenizer import load_tokenizer, tokenizer_fingerprint

        if not self.kd.teacher:
            raise ZerotrainError("--teacher is required: the model to distil from (HF dir, run dir, .pth/.safetensors "
                                 "with --preset, or a DeepSpeed checkpoint)")
        self.source = resolve_init_from(self.kd.teacher)
        if self.source.tokenizer is not None:
            # The ids must agree, not the chat templates: the student's renders the data.
            theirs = tokenizer_fingerprint(load_tokenizer(str(self.source.tokenizer)), chat_template=False)
            if theirs != tokenizer_fingerprint(plan.tokenizer, chat_template=False):
                raise ZerotrainError(f"--teacher {self.kd.teacher} uses another tokenizer ({self.source.tokenizer}) than "
                                     "the student: distillation compares next-token distributions over one vocabulary, "
                                     "so both must use the same tokenizer")
        if self.kd.on_policy_ratio:
            kinds = sorted({s.kind for s in plan.sources})
            if kinds != ["sft"]:
                raise ZerotrainError(f"--on-policy-ratio samples replies to the data's prompts: it needs SFT "
                                     f"conversations, got {', '.join(kinds)} data")
            if cfg.data.pack:
                raise ZerotrainError("--on-policy-ratio rebuilds every row from its prompt and the student's sample: "
                                     "drop --pack")
        if self.kd.teacher_top_k and len(plan.sources) > 1:
            raise ZerotrainError("--teacher-top-k stores the teacher's log-probs beside one prepared data source; "
                                 "distil a mixture with the live teacher (--teacher-top-k 0)")
        self.seed, self.seq_len = cfg.train.seed, cfg.data.seq_len

    def teacher_zero3(self, plan: RunPlan) -> bool:
        """--teacher-zero-stage, by default the student's: 3 partitions the teacher too."""
        from engine.config.deepspeed import zero_stage

        stage = self.kd.teacher_zero_stage
        return stage == 3 or (stage is None and zero_stage(plan.ds_config) == 3)

    def build(self, cfg: Config, plan: RunPlan, engine: Any, data: Data) -> None:
        from engine.config.deepspeed import zero_stage
        from engine.distributed import log_on_rank0, world
        from engine.objectives.frozen import frozen_model
        from engine.objectives.rollout import stop_ids
        from engine.objectives.teacher import attach

        if self.kd.teacher_top_k:
            here = world()
            attach(data, self.store_teacher(cfg, plan, engine.device, data, here,
                                            lambda message: log_on_rank0(here.rank, message)))
            return
        self.teacher = frozen_model(cfg, plan, engine.device, self.source, zero3=self.teacher_zero3(plan))
        self.stop_ids, self.pad_id = stop_ids(plan.tokenizer), plan.tokenizer.pad_token_id
        self.synced = zero_stage(plan.ds_config) == 3 and plan.world_size > 1

    def store_teacher(self, cfg: Config, plan: RunPlan, device: torch.device, data: Data, here: World,
                      log: Callable[[str], None]) -> Path:
        """The offline teacher's store for the run's data (engine.objectives.teacher): read if
        there, else computed once (by `zerotrain teacher-logits`, or at the start of a run)."""
        from engine.objectives.teacher import compute

        return compute(cfg, plan, device, data, data.directories[0], here, self.source, self.teacher_zero3(plan), log,
                       top_k=self.kd.teacher_top_k, temperature=self.kd.kd_temperature)

    def on_policy(self, step: int) -> bool:
        """Whether `step` trains on the student's samples: a draw seeded by the run's seed and the
        step, so every rank agrees and a resumed run draws the same."""
        ratio = self.kd.on_policy_ratio
        return ratio > 0 and np.random.default_rng([self.seed, 0x6B64, step]).random() < ratio

    def step_batches(self, model: Any, batches: list[Batch], step: int) -> list[Batch]:
        if not self.on_policy(step):
            return batches
        import torch.distributed as dist

        from engine.objectives.rollout import sample_replies

        rank = dist.get_rank() if dist.is_initialized() else 0
        module = getattr(model, "module", model)  # generate() is the transformers model's, inside the engine
        device = next(module.parameters()).device
        return [sample_replies(module, {k: v.to(device) for k, v in batch.items()}, seq_len=self.seq_len,
                               max_new_tokens=self.kd.on_policy_max_new_tokens,
                               temperature=self.kd.on_policy_temperature, stop_ids=self.stop_ids, pad_id=self.pad_id,
                               seed=int(np.random.default_rng([self.seed, step, rank, i]).integers(2 ** 62)),
                               synced=self.synced)
                for i, batch in enumerate(batches)]

    def units(self, batch: Batch) -> int:
        return int(trained_tokens(batch["labels"]).sum())

    def stored_divergence(self, student: torch.Tensor, ids: torch.Tensor, logps: torch.Tensor) -> torch.Tensor:
        """D summed over tokens against the teacher's stored top-k: both sides bucketed on its ids."""
        from engine.objectives.teacher import bucketed

        ours = bucketed(F.log_softmax(student.float() / self.kd.kd_temperature, dim=-1), ids)
        return token_divergence(ours, logps, self.kd.kd_loss, beta=self.kd.kd_beta).sum()

    def live_divergence(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """D summed over tokens between two [tokens, vocab] logits."""
        vocab = student.shape[-1]
        if teacher.shape[-1] < vocab:
            raise ZerotrainError(f"the teacher scores {teacher.shape[-1]} tokens, the student {vocab}: both must use "
                                 "the same tokenizer")
        # A larger teacher embedding holds padding rows beyond the tokenizer (rounded-up vocab sizes).
        return token_divergence(student, teacher[..., :vocab], self.kd.kd_loss, beta=self.kd.kd_beta,
                                temperature=self.kd.kd_temperature).sum()

    def stored_rows(self, batch: Batch, tokens: int) -> list[torch.Tensor]:
        if len(batch["teacher_logps"]) != tokens:
            raise ZerotrainError(f"the batch has {tokens} trained tokens but {len(batch['teacher_logps'])} "
                                 "stored teacher log-probs: the store does not match the prepared data; delete "
                                 "its directory (<prepared>/teacher/) to compute it again")
        return [batch["teacher_ids"], batch["teacher_logps"]]

    def divergence(self, student: torch.Tensor, batch: Batch, inputs: Batch) -> torch.Tensor:
        """D summed over the trained tokens, whose student logits are `student` [tokens, vocab]."""
        if "teacher_logps" in batch:  # offline
            return self.stored_divergence(student, *self.stored_rows(batch, len(student)))
        with torch.no_grad():
            teacher = self.teacher(**inputs, use_cache=False).logits
        return self.live_divergence(student, teacher[trained_tokens(batch["labels"])])

    def chunked_terms(self, model: Callable[..., Any], batch: Batch, inputs: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(CE, D) summed over the trained tokens with no full logits of either model: both decoders'
        states for the trained tokens, then each LM head `chunk` tokens at a time (summed_over_chunks)."""
        mask = trained_tokens(batch["labels"])
        states, targets = decoder_states(model, batch)[mask], trained_targets(batch["labels"])
        head = language_model(model).get_output_embeddings()
        heads = [head]
        if "teacher_logps" in batch:
            rows, divergence = self.stored_rows(batch, len(targets)), self.stored_divergence
        else:
            with torch.no_grad():
                teacher_states = decoder_states(self.teacher, inputs)[mask]
            teacher_head = language_model(self.teacher).get_output_embeddings()
            heads.append(teacher_head)
            rows = [teacher_states]

            def divergence(student: torch.Tensor, teacher_states: torch.Tensor) -> torch.Tensor:
                with torch.no_grad():
                    teacher = teacher_head(teacher_states)
                return self.live_divergence(student, teacher)

        def terms(states: torch.Tensor, targets: torch.Tensor, *rows: torch.Tensor) -> torch.Tensor:
            logits = head(states)
            return torch.stack([F.cross_entropy(logits.float(), targets, reduction="sum"), divergence(logits, *rows)])

        chunks = chunk_count(heads, len(targets), self.chunk, states.device)
        ce, kd = summed_over_chunks(terms, [states, targets, *rows], self.chunk, chunks)
        return ce, kd

    def loss(self, model: Callable[..., Any], batch: Batch) -> LossSums:
        inputs = model_inputs(batch)
        if self.chunk:
            ce, kd = self.chunked_terms(model, batch, inputs)
        else:
            logits = model(**inputs, use_cache=False).logits
            kd = self.divergence(logits[trained_tokens(batch["labels"])], batch, inputs)
            ce = token_nll_sum(logits, batch["labels"]) if "on_policy" not in batch else None
        a, t = self.kd.kd_alpha, self.kd.kd_temperature
        if "on_policy" in batch:
            return LossSums((1 - a) * t * t * kd, {"kd": kd.detach(), "on_policy": trained_tokens(batch["labels"]).sum()})
        return LossSums(a * ce + (1 - a) * t * t * kd, {"ce": ce.detach(), "kd": kd.detach()})


DISTILL = Stage("distill", objective=lambda cfg: Distill(cfg.section(DistillConfig), cfg.train.loss_chunk_size),
                data_kinds=("pretrain", "sft"), section=DistillConfig,
                # lr: recipes/distill_minillm_gpt2.yaml's for a real student (TRL's DistillationConfig has 1e-6,
                # for on-policy distillation of an already-tuned model). pack: as for SFT (packed == padded),
                # but off with --on-policy-ratio, which rebuilds each row from its prompt and refuses packing.
                defaults=(("lr", 5e-5), ("pack", Given(True, "on_policy_ratio", False))),
                summary="distillation of a frozen teacher into the trained student")
