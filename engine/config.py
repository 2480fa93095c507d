"""The typed run configuration: one dataclass tree, filled from YAML plus CLI flags.

Every field of every section is also a flag of the same name in kebab-case
(`micro_batch_size` is `--micro-batch-size`) and a YAML key, either flat or
under its section name::

    train:
      micro_batch_size: 8
    lr: 3.0e-4          # flat keys work too; names are unique across sections

Precedence: dataclass defaults < `--config FILE.yaml` < command-line flags.
The resolved tree is saved with every run (`config.yaml`) and every checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from common.errors import ZerotrainError
from common.publish import write_text

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
MONITORS = ("tensorboard", "csv", "wandb")


@dataclass
class ModelConfig:
    """What to train."""

    preset: str = "debug"
    """Model preset name (see `model.presets`): debug, tiny, minimind-26m, minimind-104m, gpt2-124m, llama-1b."""
    init_from: str = ""
    """Start from these weights instead of a random init: an HF model directory, a .pth/.safetensors state
    dict (shaped like --preset), a run directory (its final/), or a DeepSpeed checkpoint directory."""
    tokenizer: str = ""
    """HF tokenizer directory or sentencepiece `.model` file (train one with `zerotrain train-tokenizer`);
    default: the tokenizer that comes with init_from."""
    attn_implementation: str = "sdpa"
    """transformers attention backend: sdpa, eager or flash_attention_2."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""

    def __post_init__(self) -> None:
        if self.attn_implementation not in ("sdpa", "eager", "flash_attention_2"):
            _bad("attn_implementation", self.attn_implementation, "one of sdpa, eager, flash_attention_2")


@dataclass
class LoraConfig:
    """LoRA through peft (off while lora_r is 0: then every weight is trained)."""

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
            _bad("lora_r", self.lora_r, "0 (off) or a positive rank")
        if not 0.0 <= self.lora_dropout < 1.0:
            _bad("lora_dropout", self.lora_dropout, "a number in [0, 1)")
        if self.lora_r == 0 and (self.lora_target_modules or self.lora_modules_to_save or self.merge_lora_at_end):
            raise ZerotrainError("LoRA options were given but --lora-r is 0 (LoRA off): set --lora-r, e.g. 8")

    @property
    def enabled(self) -> bool:
        return self.lora_r > 0


@dataclass
class DataConfig:
    """Where the tokens come from."""

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
    which costs more than it saves below tens of thousands of conversations (BENCHMARKS.md)."""

    def __post_init__(self) -> None:
        _positive("seq_len", self.seq_len)
        if not 0.0 <= self.val_fraction < 0.5:
            _bad("val_fraction", self.val_fraction, "a number in [0, 0.5)")
        if isinstance(self.num_proc, bool) or not isinstance(self.num_proc, int) or self.num_proc < 0:
            _bad("num_proc", self.num_proc, "0 (every core) or a positive number of processes")

    @property
    def cache_dir(self) -> Path:
        if self.data_cache_dir:
            return Path(self.data_cache_dir)
        return Path(os.environ.get("ZEROTRAIN_CACHE", Path.home() / ".cache" / "zerotrain")) / "data"


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule (linear warmup, cosine decay to min_lr)."""

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
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables)."""

    def __post_init__(self) -> None:
        _positive("lr", self.lr)
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            _bad("min_lr_ratio", self.min_lr_ratio, "a number in [0, 1]")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            _bad("warmup_steps", self.warmup_steps, "0 or more")
        if self.weight_decay < 0:
            _bad("weight_decay", self.weight_decay, "0 or more")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                _bad(name, getattr(self, name), "a number in [0, 1)")
        if self.grad_clip < 0:
            _bad("grad_clip", self.grad_clip, "0 (off) or more")


@dataclass
class TrainConfig:
    """The loop: how long, how big, which precision."""

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
    precision: str = "auto"
    """auto (bf16 where supported, else fp16 on GPU, fp32 on CPU), bf16, fp16 or fp32."""
    seed: int = 42
    """Seeds model init, data order and dropout."""
    log_interval: int = 10
    """Steps between metrics.jsonl records."""
    eval_interval: int = 100
    """Steps between validation passes (0 = only at the end)."""
    eval_batches: int = 20
    """Micro-batches per rank in one validation pass."""
    max_consecutive_nonfinite: int = 5
    """A NaN/inf loss skips the step; this many in a row stop the run."""
    report_to: list[str] = field(default_factory=list)
    """DeepSpeed monitors to log to as well, written under output_dir/monitor: tensorboard, csv, wandb.
    (Not `--monitor`: torchrun would take that as an abbreviation of its --monitor-interval.)"""
    loss_chunk_size: int = 0
    """Tokens per chunk of the LM head and its loss (every stage, validation too; DPO's and
    distillation's log-probs, a live reference's and teacher's as well): the full tokens x vocab
    logits are never held and only the trained tokens go through the head. 0 (default): the full
    logits, as transformers computes them. For vocabularies of 32,000 or more when memory is short:
    110 (64 MiB of fp32 logits at 151,936) measured 0.21x the loss's peak memory at 0.79x its speed
    on CPU, 512 0.40x at 0.86x (BENCHMARKS.md)."""
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
        for name in ("max_steps", "micro_batch_size", "grad_accum", "log_interval", "eval_batches",
                     "max_consecutive_nonfinite"):
            _positive(name, getattr(self, name))
        if self.global_batch_size < 0:
            _bad("global_batch_size", self.global_batch_size, "0 (derived) or a positive integer")
        if self.loss_chunk_size < 0:
            _bad("loss_chunk_size", self.loss_chunk_size, "tokens per chunk, or 0 (the full logits)")
        if self.hang_timeout is not None and self.hang_timeout < 0:
            _bad("hang_timeout", self.hang_timeout, "seconds, 0 (off), or unset for the default")
        if self.eval_interval < 0:
            _bad("eval_interval", self.eval_interval, "0 (only at the end) or a positive integer")
        if self.precision not in PRECISIONS:
            _bad("precision", self.precision, "one of " + ", ".join(PRECISIONS))
        for name in self.report_to:
            if name not in MONITORS:
                _bad("report_to", name, "any of " + ", ".join(MONITORS))


@dataclass
class CheckpointConfig:
    """When to save and where to resume from."""

    save_interval: int = 500
    """Steps between DeepSpeed checkpoints (one is always written at the end)."""
    keep_last: int = 3
    """Checkpoints kept in output_dir/checkpoints; older ones are deleted (0 keeps all)."""
    resume: str = "auto"
    """auto (newest complete checkpoint in output_dir, if any), never, or a checkpoint path."""
    verify_checkpoints: str = "full"
    """full: once a save is complete, each rank hashes its share of the tag's files whole (CRC-32) in a
    background thread while training goes on, into TAG/checksums/; resume, consolidate, export,
    extract-adapter and inspect re-hash and compare, so a flipped byte anywhere in a shard is caught. The
    default, as it costs about a fifth (0.16-0.23x) of the time torch.save takes to write the same bytes, off
    the critical path (BENCHMARKS.md). tail: each file's size and a hash of its last MiB only (truncation and
    foreign files, not damage mid-file); also what a tag without digests gets."""

    def __post_init__(self) -> None:
        _positive("save_interval", self.save_interval)
        if self.verify_checkpoints not in ("full", "tail"):
            _bad("verify_checkpoints", self.verify_checkpoints, "full or tail")
        if self.keep_last < 0:
            _bad("keep_last", self.keep_last, "0 (keep all) or a positive integer")
        if not self.resume:
            _bad("resume", self.resume, "auto, never or a checkpoint path")


@dataclass
class DistributedConfig:
    """DeepSpeed settings."""

    ds_config: str = ""
    """DeepSpeed JSON config; default ds_configs/zero{zero_stage}.json."""
    zero_stage: int | None = None
    """ZeRO stage 0-3; overrides the stage in ds_config (default 2 when neither says)."""
    dist_timeout: int = 1800
    """Seconds a collective (all-reduce, barrier; nccl and gloo alike) waits for the other ranks
    before it fails. Raise it when rank 0 alone prepares a large corpus before training while the
    others wait; a stall during training is caught sooner by --hang-timeout."""

    def __post_init__(self) -> None:
        if self.zero_stage is not None and self.zero_stage not in (0, 1, 2, 3):
            _bad("zero_stage", self.zero_stage, "0, 1, 2 or 3")
        _positive("dist_timeout", self.dist_timeout)


PREF_LOSSES = ("dpo", "ipo", "orpo", "simpo")


@dataclass
class PrefConfig:
    """Preference tuning (launcher/dpo.py): which loss, its strength, and the reference model."""

    pref_loss: str = "dpo"
    """dpo (sigmoid), ipo, orpo or simpo; orpo and simpo need no reference model."""
    beta: float = 0.1
    """Strength: DPO/SimPO's beta, IPO's tau (the target margin is 1 / (2 beta)), ORPO's lambda."""
    label_smoothing: float = 0.0
    """cDPO: the probability that a pair's preference is flipped (dpo and simpo only)."""
    simpo_gamma: float = 0.5
    """SimPO's target reward margin (gamma; the logits are shifted by gamma / beta)."""
    sft_weight: float = 0.0
    """Add this times the chosen response's NLL per response token (RPO-style) to every loss."""
    ref_from: str = ""
    """Reference model, when not the --init-from model: an HF dir, run dir, .pth/.safetensors or DeepSpeed
    checkpoint (with LoRA, default: the base with the adapter disabled)."""
    precompute_ref: bool = False
    """Compute the reference log-probs once before training, cached with the prepared data, so training holds
    one model."""

    def __post_init__(self) -> None:
        if self.pref_loss not in PREF_LOSSES:
            _bad("pref_loss", self.pref_loss, "one of " + ", ".join(PREF_LOSSES))
        _positive("beta", self.beta)
        if not 0.0 <= self.label_smoothing < 0.5:
            _bad("label_smoothing", self.label_smoothing, "a number in [0, 0.5)")
        if self.label_smoothing and self.pref_loss not in ("dpo", "simpo"):
            _bad("label_smoothing", self.label_smoothing, f"0 with --pref-loss {self.pref_loss} (dpo and simpo only)")
        if self.sft_weight < 0:
            _bad("sft_weight", self.sft_weight, "0 (off) or more")
        if not self.needs_reference and (self.ref_from or self.precompute_ref):
            raise ZerotrainError(f"--pref-loss {self.pref_loss} uses no reference model: drop --ref-from / "
                                 "--precompute-ref")

    @property
    def needs_reference(self) -> bool:
        return self.pref_loss in ("dpo", "ipo")


KD_LOSSES = ("forward_kl", "reverse_kl", "jsd")


@dataclass
class DistillConfig:
    """Distillation (launcher/distill.py): loss = kd_alpha x CE + (1 - kd_alpha) x T^2 x D(teacher, student)."""

    teacher: str = ""
    """The teacher: what --init-from takes (HF dir, run dir, .pth/.safetensors shaped like --preset, DeepSpeed
    checkpoint); it must use the student's tokenizer."""
    kd_loss: str = "forward_kl"
    """D: forward_kl KL(teacher || student) (MiniMind, classic KD), reverse_kl KL(student || teacher) (MiniLLM),
    or jsd, GKD's generalised Jensen-Shannon divergence with --kd-beta."""
    kd_beta: float = 0.5
    """jsd only: the mixture weight (0 gives forward KL, 1 reverse KL, as in TRL's GKD)."""
    kd_temperature: float = 1.0
    """T: both distributions are softened by it; D is scaled by T^2 (Hinton et al.)."""
    kd_alpha: float = 0.5
    """A: the weight of the cross-entropy on the data; 1 - A weighs the divergence."""
    teacher_zero_stage: int | None = None
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
        if self.kd_loss not in KD_LOSSES:
            _bad("kd_loss", self.kd_loss, "one of " + ", ".join(KD_LOSSES))
        for name in ("kd_beta", "kd_alpha"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                _bad(name, getattr(self, name), "a number in [0, 1]")
        _positive("kd_temperature", self.kd_temperature)
        if self.teacher_zero_stage is not None and self.teacher_zero_stage not in (0, 3):
            _bad("teacher_zero_stage", self.teacher_zero_stage, "0 (a whole copy per rank) or 3 (partitioned)")
        if not 0.0 <= self.on_policy_ratio <= 1.0:
            _bad("on_policy_ratio", self.on_policy_ratio, "a number in [0, 1]")
        _positive("on_policy_max_new_tokens", self.on_policy_max_new_tokens)
        _positive("on_policy_temperature", self.on_policy_temperature)
        if self.teacher_top_k < 0:
            _bad("teacher_top_k", self.teacher_top_k, "0 (live teacher) or the number of log-probs kept per token")
        if self.teacher_top_k and self.on_policy_ratio:
            _bad("on_policy_ratio", self.on_policy_ratio, "0 with --teacher-top-k: stored teacher log-probs cover the "
                 "data's replies, not the student's samples; run the teacher live for on-policy steps")


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "lora": LoraConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "checkpoint": CheckpointConfig,
    "distributed": DistributedConfig,
    "pref": PrefConfig,
    "distill": DistillConfig,
}
STAGE_SECTIONS = ("pref", "distill")
"""Sections only some stages read (engine.objectives.Stage.config_sections)."""


@dataclass
class Config:
    """The whole run configuration."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    pref: PrefConfig = field(default_factory=PrefConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def __post_init__(self) -> None:
        if self.optim.warmup_steps is None:  # resolved once, so config.yaml records what the run used
            self.optim.warmup_steps = min(100, self.train.max_steps // 10)
        if self.optim.warmup_steps > self.train.max_steps:
            raise ZerotrainError(
                f"optim.warmup_steps ({self.optim.warmup_steps}) is larger than train.max_steps "
                f"({self.train.max_steps}): lower --warmup-steps or raise --max-steps")

    def check_world_size(self, world_size: int) -> int:
        """Return the global batch for `world_size` ranks, or fail if a set global_batch_size disagrees."""
        t = self.train
        derived = t.micro_batch_size * t.grad_accum * world_size
        if t.global_batch_size and t.global_batch_size != derived:
            raise ZerotrainError(
                f"train.global_batch_size is {t.global_batch_size} but micro_batch_size x grad_accum x "
                f"world size = {t.micro_batch_size} x {t.grad_accum} x {world_size} = {derived}: "
                f"set --global-batch-size {derived}, or 0 to derive it, or change --grad-accum")
        return derived

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        """Write the resolved config as YAML (temporary name, then rename)."""
        write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "config") -> "Config":
        """Build from nested ({section: {key: value}}) and/or flat ({key: value}) mappings."""
        flat: dict[str, Any] = {}
        _merge(flat, values or {}, source)
        per_section: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
        for key, value in flat.items():
            if key not in FIELD_SECTION:
                raise ZerotrainError(_unknown(f"{source}: unknown key '{key}'", key, list(FIELD_SECTION) + list(SECTIONS)))
            per_section[FIELD_SECTION[key]][key] = value
        built = {}
        for name, section_cls in SECTIONS.items():
            types_ = _field_types(section_cls)
            kwargs = {k: _coerce(v, types_[k], f"{source}: {name}.{k}") for k, v in per_section[name].items()}
            built[name] = section_cls(**kwargs)
        return cls(**built)


def _field_types(section_cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in fields(section_cls)}


FIELD_SECTION: dict[str, str] = {f: s for s, c in SECTIONS.items() for f in _field_types(c)}


def _bad(name: str, value: Any, expected: str) -> None:
    flag = "--" + name.replace("_", "-")
    raise ZerotrainError(f"{FIELD_SECTION.get(name, '?')}.{name} ({flag}) must be {expected}, got {value!r}")


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        _bad(name, value, "a positive number")


def _unknown(message: str, name: str, valid: list[str]) -> str:
    """`message` plus the nearest valid spelling of `name`, if one is close."""
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    return message + (f"; did you mean '{close[0]}'?" if close else "")


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Convert a YAML/CLI value to the field's type (YAML reads 5e-4 as a string, for one)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        annotation = next(a for a in args if a is not type(None))
        origin = typing.get_origin(annotation)
    try:
        if origin is list:  # "a,b" and ["a", "b"] alike
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, (list, tuple)):
                raise ValueError
            return [part.strip() for v in value for part in str(v).split(",") if part.strip()]
        if annotation is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if annotation is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if annotation is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if annotation is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        name = getattr(annotation, "__name__", str(annotation))
        raise ZerotrainError(f"{where}: expected {name}, got {value!r}") from None
    return value


def read_yaml(path: str) -> dict[str, Any]:
    """Read a YAML config file; a missing file or a non-mapping is a clear error."""
    p = Path(path)
    if not p.is_file():
        raise ZerotrainError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ZerotrainError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ZerotrainError(f"{path}: expected a mapping of config keys at the top level")
    return data


def build_parser(description: str) -> argparse.ArgumentParser:
    """An argparse parser with one flag per config field (defaults suppressed, so YAML can fill them)."""
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False,
                                     argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", help="YAML file of config keys (flat or by section)")
    # The deepspeed launcher appends --local_rank=N; the rank also arrives as LOCAL_RANK.
    parser.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, help=argparse.SUPPRESS)
    for section, section_cls in SECTIONS.items():
        group = parser.add_argument_group(section)
        docs = _field_docs(section_cls)
        for name, annotation in _field_types(section_cls).items():
            flag = "--" + name.replace("_", "-")
            help_text = docs.get(name, "")
            if annotation is bool:  # --flag, --flag true|false, --no-flag
                group.add_argument(flag, dest=name, nargs="?", const="true", metavar="BOOL", help=help_text)
                group.add_argument("--no-" + flag[2:], dest=name, action="store_const", const="false",
                                   help=argparse.SUPPRESS)
            elif typing.get_origin(annotation) is list:
                group.add_argument(flag, dest=name, nargs="+", action="extend", metavar="VALUE", help=help_text)
            else:
                group.add_argument(flag, dest=name, metavar=name.upper(), help=help_text)
    return parser


def parse_config(argv: list[str] | None = None, *, description: str = "zerotrain run",
                 defaults: dict[str, Any] | None = None) -> Config:
    """Parse `argv` (YAML via --config, then flags) into a checked Config.

    `defaults` are per-entry-point overrides of the dataclass defaults (lowest precedence).
    """
    parser = build_parser(description)
    args, rest = parser.parse_known_args(argv)
    for token in rest:
        if token.startswith("--"):
            name = token[2:].split("=", 1)[0]
            valid = ["--" + n.replace("_", "-") for n in FIELD_SECTION] + ["--config"]
            raise ZerotrainError(_unknown(f"unknown flag '--{name}'", "--" + name, valid))
        raise ZerotrainError(f"unexpected argument '{token}' (flags take the form --name value)")
    values: dict[str, Any] = dict(defaults or {})
    given = vars(args)
    if "config" in given:
        path = given.pop("config")
        _merge(values, read_yaml(path), path)
    given.pop("local_rank", None)
    _merge(values, given, "arguments")
    return Config.from_dict(values, source="arguments")


def _merge(into: dict[str, Any], new: dict[str, Any], source: str) -> None:
    """Merge a nested or flat mapping into one flat mapping; later values win."""
    for key, value in new.items():
        if key in SECTIONS and isinstance(value, dict):
            for sub_key, sub_value in value.items():
                if sub_key not in _field_types(SECTIONS[key]):
                    raise ZerotrainError(_unknown(f"{source}: unknown key '{key}.{sub_key}'", sub_key,
                                                  list(_field_types(SECTIONS[key]))))
                into[sub_key] = sub_value
        else:
            into[key] = value


def _field_docs(section_cls: type) -> dict[str, str]:
    """Field docstrings (the string literal under each field) for --help."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(section_cls)))
    docs: dict[str, str] = {}
    body = tree.body[0].body
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split()).replace("%", "%%")
    return docs
