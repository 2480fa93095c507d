"""The sections every run's config has, one dataclass each, with their checks.

A field's docstring (the string under it) is its --help text. A stage's own section (DPO's
`pref`, distillation's `distill`) is declared beside its objective (engine.objectives) with the
same helpers; engine.config.tree assembles a run's config from these and the stage's.
"""

from __future__ import annotations

import os
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Iterable

from common.errors import ZerotrainError
from engine.config.precision import PRECISIONS


def flag(name: str) -> str:
    """The command-line flag of a config field: micro_batch_size -> --micro-batch-size."""
    return "--" + name.replace("_", "-")


def invalid(section: Any, name: str, value: Any, expected: str) -> None:
    """Raise the error of a field given a value it does not take, naming its key and flag
    (`section`: the section or its class)."""
    owner = section if isinstance(section, type) else type(section)
    raise ZerotrainError(f"{owner.SECTION}.{name} ({flag(name)}) must be {expected}, got {value!r}")


def choice(default: Any, options: Iterable[Any]) -> Any:
    """A field that takes one of a fixed set of values (each item of it, for a list field): the
    set's one home, which the config's checks (check_choices) and --help read."""
    options = tuple(options)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"choices": options})
    return field(default=default, metadata={"choices": options})


def choices_of(section_cls: type) -> dict[str, tuple[Any, ...]]:
    """A section's fields declared with `choice`, and their values."""
    return {f.name: f.metadata["choices"] for f in fields(section_cls) if "choices" in f.metadata}


def check_choices(section_cls: type, values: dict[str, Any]) -> None:
    """Refuse a value outside its field's choices (None, where a field may be unset, is not one)."""
    for name, options in choices_of(section_cls).items():
        value = values.get(name)
        for item in value if isinstance(value, list) else [value]:
            if item is not None and item not in options:
                invalid(section_cls, name, item, ("any" if isinstance(value, list) else "one") + " of "
                        + ", ".join(map(str, options)))


def field_default(section_cls: type, name: str) -> Any:
    """The default a section's dataclass gives a field."""
    f = next(f for f in fields(section_cls) if f.name == name)
    return f.default_factory() if f.default_factory is not MISSING else f.default


@dataclass(frozen=True)
class Given:
    """A stage's default for a field that changes when the run gives another field a value:
    `value`, or `then` once `field` is set to something true (a non-zero number, a non-empty
    string or list), by a flag or YAML. Stage.defaults holds these beside plain values."""

    value: Any
    field: str
    then: Any


def require_positive(section: Any, name: str) -> None:
    """A field that must be a positive number (not a bool)."""
    value = getattr(section, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        invalid(section, name, value, "a positive number")


MONITORS = ("tensorboard", "csv", "wandb")


@dataclass
class ModelConfig:
    """What to train."""

    SECTION: ClassVar[str] = "model"

    preset: str = "debug"
    """Model preset name (see `model.presets`): debug, tiny, minimind-26m, minimind-104m, gpt2-124m, llama-1b."""
    init_from: str = ""
    """Start from these weights instead of a random init: an HF model directory, a .pth/.safetensors state
    dict (shaped like --preset), a run directory (its final/), or a DeepSpeed checkpoint directory."""
    tokenizer: str = ""
    """HF tokenizer directory or sentencepiece `.model` file (train one with `zerotrain train-tokenizer`);
    default: the tokenizer that comes with init_from."""
    attn_implementation: str = choice("sdpa", ("sdpa", "eager", "flash_attention_2"))
    """transformers attention backend."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""


@dataclass
class LoraConfig:
    """LoRA through peft (off while lora_r is 0: then every weight is trained)."""

    SECTION: ClassVar[str] = "lora"

    lora_r: int = 0
    """LoRA rank; 0 trains the full model."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator (the update is scaled by lora_alpha / lora_r)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA input."""
    lora_target_modules: list[str] = field(default_factory=list)
    """Module names to adapt; default: every linear projection of the architecture (not lm_head)."""
    lora_modules_to_save: list[str] = field(default_factory=list)
    """Modules trained in full and saved with the adapter, e.g. embed_tokens,lm_head."""
    merge_lora_at_end: bool = False
    """Also write the merged full model to final/ (the adapter is always in final/adapter/)."""

    def __post_init__(self) -> None:
        if self.lora_r < 0:
            invalid(self, "lora_r", self.lora_r, "0 (off) or a positive rank")
        if not 0.0 <= self.lora_dropout < 1.0:
            invalid(self, "lora_dropout", self.lora_dropout, "a number in [0, 1)")
        if self.lora_r == 0 and (self.lora_target_modules or self.lora_modules_to_save or self.merge_lora_at_end):
            raise ZerotrainError("LoRA options were given but --lora-r is 0 (LoRA off): set --lora-r, e.g. 8")

    @property
    def enabled(self) -> bool:
        return self.lora_r > 0


@dataclass
class DataConfig:
    """Where the tokens come from."""

    SECTION: ClassVar[str] = "data"

    data: list[str] = field(default_factory=list)
    """Training inputs: raw .txt/.jsonl/.json/.parquet files or directories made by `zerotrain prepare`;
    KIND:PATH:WEIGHT entries (KIND pretrain or sft) mix sources by weight in one run."""
    seq_len: int = 512
    """Tokens per training sequence (context length)."""
    val_fraction: float = 0.01
    """Share of documents (pretraining) or conversations (SFT) held out for validation."""
    skip_bad_lines: bool = False
    """Skip malformed input lines and report how many, instead of stopping at the first."""
    columns: str = ""
    """SFT and preference files in a shape of their own: KEY=FIELD,... naming the record fields
    (prompt=q,response=a[,input,system,history]; messages=dialog,role=speaker,content=text,user=human,
    assistant=bot; chosen=good,rejected=bad[,prompt,system]). Overrides shape detection for every raw
    SFT/pref file of the run; empty: detect each file's shape."""
    pack: bool = False
    """Pack several sequences into each row of at most seq_len tokens, boundaries kept through
    position_ids (no attention across them): SFT and distillation conversations, and preference
    pairs' chosen and rejected sequences (with a sequence_ids map for their per-sequence log-probs)."""
    document_mask: bool = False
    """Pretraining: positions restart after every end-of-document token of a window and attention
    stays inside each document (Llama 3); the trained tokens are the same as without it."""
    data_cache_dir: str = ""
    """Where raw inputs are prepared once and reused; default $ZEROTRAIN_CACHE or ~/.cache/zerotrain/data."""
    num_proc: int = 1
    """Processes that prepare raw SFT conversations (0: every core); the prepared data is the same
    for any count. 1 by default: the workers start from a fork server (a second import of torch),
    which costs more than it saves below tens of thousands of conversations."""

    def __post_init__(self) -> None:
        require_positive(self, "seq_len")
        if not 0.0 <= self.val_fraction < 0.5:
            invalid(self, "val_fraction", self.val_fraction, "a number in [0, 0.5)")
        if isinstance(self.num_proc, bool) or not isinstance(self.num_proc, int) or self.num_proc < 0:
            invalid(self, "num_proc", self.num_proc, "0 (every core) or a positive number of processes")

    @property
    def cache_dir(self) -> Path:
        if self.data_cache_dir:
            return Path(self.data_cache_dir)
        return Path(os.environ.get("ZEROTRAIN_CACHE", Path.home() / ".cache" / "zerotrain")) / "data"


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule (linear warmup, cosine decay to min_lr)."""

    SECTION: ClassVar[str] = "optim"

    lr: float = 5e-4
    """Peak learning rate, reached after warmup_steps."""
    min_lr_ratio: float = 0.1
    """Learning rate at the end of the cosine decay, as a fraction of lr."""
    warmup_steps: int | None = None
    """Optimizer steps of linear warmup from 0 to lr; default min(100, max_steps // 10), so a short
    smoke run warms up too."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay; never applied to norms, biases and embeddings."""
    adam_beta1: float = 0.9
    """AdamW's decay of its running mean of gradients."""
    adam_beta2: float = 0.95
    """AdamW's decay of its running mean of squared gradients."""
    adam_eps: float = 1e-8
    """AdamW's term added to the denominator for numerical stability."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables)."""

    def __post_init__(self) -> None:
        require_positive(self, "lr")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            invalid(self, "min_lr_ratio", self.min_lr_ratio, "a number in [0, 1]")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            invalid(self, "warmup_steps", self.warmup_steps, "0 or more")
        if self.weight_decay < 0:
            invalid(self, "weight_decay", self.weight_decay, "0 or more")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                invalid(self, name, getattr(self, name), "a number in [0, 1)")
        if self.grad_clip < 0:
            invalid(self, "grad_clip", self.grad_clip, "0 (off) or more")


@dataclass
class TrainConfig:
    """The loop: how long, how big, which precision."""

    SECTION: ClassVar[str] = "train"

    output_dir: str = ""
    """Run directory: config.yaml, tokenizer/, checkpoints/, metrics.jsonl, final/."""
    max_steps: int = 1000
    """Optimizer steps to train for."""
    micro_batch_size: int = 8
    """Sequences per rank per forward pass."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    global_batch_size: int = 0
    """Sequences per optimizer step over all ranks; 0 = micro_batch_size x grad_accum x world size.
    When set it must equal that product (checked against the world size at start-up)."""
    precision: str = choice("auto", PRECISIONS)
    """auto (bf16 where supported, else fp16 on GPU, fp32 on CPU), bf16, fp16 or fp32."""
    seed: int = 42
    """Seeds model init, data order and dropout."""
    log_interval: int = 10
    """Steps between metrics.jsonl records."""
    eval_interval: int = 100
    """Steps between validation passes (0 = only at the end)."""
    eval_samples: int = 160
    """Validation samples scored in one pass (the split's first ones; all of it when smaller), shared out over the
    ranks: the same samples on any number of ranks, so val_loss does not depend on it."""
    max_consecutive_nonfinite: int = 5
    """A NaN/inf loss skips the step; this many in a row stop the run."""
    report_to: list[str] = choice([], MONITORS)
    """DeepSpeed monitors to log to as well, written under output_dir/monitor.
    (Not `--monitor`: torchrun would take that as an abbreviation of its --monitor-interval.)"""
    loss_chunk_size: int = 0
    """Tokens per chunk of the LM head and its loss (every stage, validation too; DPO's and
    distillation's log-probs, a live reference's and teacher's as well): the full tokens x vocab
    logits are never held and only the trained tokens go through the head. 0 (default): the full
    logits, as transformers computes them. For vocabularies of 32,000 or more when memory is short:
    smaller chunks hold less of the loss's memory at some cost in speed (a chunk of 64 MiB of fp32
    logits is a sensible start)."""
    hang_timeout: float | None = None
    """Seconds a rank may go without finishing an optimizer step before the job is declared stalled:
    every rank writes its threads' stacks to output_dir/hang/rankN.txt and the job exits (status 75)
    so the launcher ends it. Default max(600, 20x the median step time once 3 steps are timed);
    evaluation and checkpoint saves get max(this, 20x their own median; 600 the first time).
    0 turns the watchdog off (the dead-rank check too)."""
    verbose: bool = False
    """Every rank prints its library warnings, logs and progress bars (by default only rank 0 does,
    each distinct warning once); add ZEROTRAIN_DS_LOG=info for DeepSpeed's engine details."""

    def __post_init__(self) -> None:
        for name in ("max_steps", "micro_batch_size", "grad_accum", "log_interval", "eval_samples",
                     "max_consecutive_nonfinite"):
            require_positive(self, name)
        if self.global_batch_size < 0:
            invalid(self, "global_batch_size", self.global_batch_size, "0 (derived) or a positive integer")
        if self.loss_chunk_size < 0:
            invalid(self, "loss_chunk_size", self.loss_chunk_size, "tokens per chunk, or 0 (the full logits)")
        if self.hang_timeout is not None and self.hang_timeout < 0:
            invalid(self, "hang_timeout", self.hang_timeout, "seconds, 0 (off), or unset for the default")
        if self.eval_interval < 0:
            invalid(self, "eval_interval", self.eval_interval, "0 (only at the end) or a positive integer")


@dataclass
class CheckpointConfig:
    """When to save and where to resume from."""

    SECTION: ClassVar[str] = "checkpoint"

    save_interval: int = 500
    """Steps between DeepSpeed checkpoints (one is always written at the end)."""
    keep_last: int = 3
    """Checkpoints kept in output_dir/checkpoints; older ones are deleted (0 keeps all)."""
    resume: str = "auto"
    """auto (newest complete checkpoint in output_dir, if any), never, or a checkpoint path."""
    verify_checkpoints: str = choice("full", ("full", "tail"))
    """full: once a save is complete, each rank hashes its share of the tag's files whole (CRC-32) in a
    background thread while training goes on, into TAG/checksums/; resume, consolidate, export,
    extract-adapter and inspect re-hash and compare, so a flipped byte anywhere in a shard is caught. The
    default, as it costs a fraction of the time the save itself takes, off the critical path. tail: each
    file's size and a hash of its last MiB only (truncation and foreign files, not damage mid-file); also what
    a tag without digests gets."""

    def __post_init__(self) -> None:
        require_positive(self, "save_interval")
        if self.keep_last < 0:
            invalid(self, "keep_last", self.keep_last, "0 (keep all) or a positive integer")
        if not self.resume:
            invalid(self, "resume", self.resume, "auto, never or a checkpoint path")


@dataclass
class DistributedConfig:
    """DeepSpeed settings."""

    SECTION: ClassVar[str] = "distributed"

    ds_config: str = ""
    """DeepSpeed JSON config; default ds_configs/zero{zero_stage}.json."""
    zero_stage: int | None = choice(None, (0, 1, 2, 3))
    """ZeRO stage 0-3; overrides the stage in ds_config (default 2 when neither says)."""
    dist_timeout: int = 1800
    """Seconds a collective (all-reduce, barrier; nccl and gloo alike) waits for the other ranks
    before it fails. Raise it when rank 0 alone prepares a large corpus before training while the
    others wait; a stall during training is caught sooner by --hang-timeout."""

    def __post_init__(self) -> None:
        require_positive(self, "dist_timeout")


COMMON_SECTIONS: tuple[type, ...] = (ModelConfig, LoraConfig, DataConfig, OptimConfig, TrainConfig, CheckpointConfig,
                                     DistributedConfig)
"""The sections of every run, in the order config.yaml lists them."""
