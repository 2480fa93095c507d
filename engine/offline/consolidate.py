"""`zerotrain consolidate`: a DeepSpeed checkpoint -> one `.pth`, one `.safetensors`, or an HF model
directory (weights, config.json, generation_config.json, tokenizer), a LoRA adapter folded in; and
the OUTPUT argument and HF-directory pieces that extract-adapter and merge-adapter (engine.offline.adapters)
use as well.

Everything streams: a tensor is read from the shards (engine.offline.ds_layout), converted and written
(engine.offline.pth_io) before the next is read, so memory holds one tensor, never the model. Output
goes to a temporary name next to OUTPUT and is renamed into place once complete; on any error
nothing is left behind.

Tied weights: a `.pth` keeps both names over one storage (it loads strictly into the model,
`lm_head.weight` included); `.safetensors` files and HF directories leave the tied copy out, as
`save_pretrained` does.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from common.errors import ZerotrainError
from common.jsonio import read_json_object
from common.publish import check_apart
from engine.offline.ds_weights import Checkpoint, load_checkpoint
from engine.offline.peft_names import fold_lora, lora_settings
from engine.precision import output_dtype
from engine.run_dir import SIDECAR, TOKENIZER_FILES, RunDir, has_tokenizer, resolve_tag
from engine.offline.model_files import output_kind, parse_size, write_output
from engine.offline.tensors import Entry, source_entries
from model.state_dict import check_state_dict

if TYPE_CHECKING:
    from transformers import PretrainedConfig  # imported where used: it takes seconds

# What is copied from a tokenizer directory into an HF directory: the files that make one
# (run_dir.TOKENIZER_FILES) and those that come with them.
COPIED_TOKENIZER_FILES = (*TOKENIZER_FILES, "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json",
                          "chat_template.jinja", "chat_template.json")


@dataclass
class Written:
    """What a consolidate / extract / merge wrote."""

    output: Path
    tensors: int
    params: int
    bytes: int
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Model config and tokenizer for HF directories


def _embedding_rows(entries: list[Entry], suffixes: tuple[str, ...]) -> int | None:
    return next((e.shape[0] for e in entries if e.name.endswith(suffixes)), None)


def load_config_json(path: Path) -> PretrainedConfig:
    """The transformers config in a config.json, with an error naming the file when it is none."""
    from transformers import AutoConfig

    data = read_json_object(path)
    if "model_type" not in data:
        raise ZerotrainError(f"{path} has no model_type; pass a transformers config.json")
    try:
        return AutoConfig.for_model(**data)
    except (ValueError, KeyError, TypeError) as e:
        raise ZerotrainError(f"{path} is not a transformers config: {e}") from None


def _preset_config(preset: str, entries: list[Entry]) -> tuple[PretrainedConfig, str]:
    from model.presets import preset_config

    vocab = _embedding_rows(entries, ("embed_tokens.weight", "wte.weight"))
    positions = _embedding_rows(entries, ("wpe.weight",))
    return preset_config(preset, vocab_size=vocab, max_seq_len=positions), f"preset {preset!r}"


def find_model_config(ckpt_root: Path, ckpt: Checkpoint | None, entries: list[Entry], *,
                      config: str | None = None, preset: str | None = None, default_preset: str | None = None
                      ) -> tuple[PretrainedConfig | None, str]:
    """The transformers config for an HF directory, and where it came from: --config, --preset, the
    checkpoint dir's config.json (HF Trainer), the tag's zerotrain.json, the run dir's config.json,
    and last `default_preset` (a training run's --preset, for a checkpoint that carries no config)."""
    if config:
        path = Path(config)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise ZerotrainError(f"--config {config}: no such file")
        return load_config_json(path), str(path)
    if preset:
        return _preset_config(preset, entries)
    if (ckpt_root / "config.json").is_file():
        return load_config_json(ckpt_root / "config.json"), str(ckpt_root / "config.json")
    model_config = ckpt.sidecar.model_config if ckpt and ckpt.sidecar else None
    if model_config and "model_type" in model_config:
        from transformers import AutoConfig

        return AutoConfig.for_model(**model_config), str(ckpt.info.path / SIDECAR)
    if (ckpt_root.parent / "config.json").is_file():
        return load_config_json(ckpt_root.parent / "config.json"), str(ckpt_root.parent / "config.json")
    if default_preset:
        return _preset_config(default_preset, entries)
    return None, ""


def check_against_config(entries: list[Entry], model_config: PretrainedConfig, where: str) -> None:
    """The entries must be the state dict of the model `model_config` builds (tied copies optional);
    `where` says where the config came from."""
    from model.build import build_from_config

    with torch.device("meta"):
        model = build_from_config(model_config, where)
    check_state_dict({e.name: e.shape for e in entries}, model, source="the checkpoint",
                     target=f"the model config from {where}", advice="Pass the right one with --config or --preset.",
                     noun="checkpoint")


def untie_trained_head(model_config: PretrainedConfig, entries: list[Entry]) -> None:
    """Untie a config's output embeddings from its input embeddings when the entries carry an
    lm_head of their own: a trained copy (LoRA modules_to_save) no longer equals the embeddings."""
    if getattr(model_config, "tie_word_embeddings", False) and any(e.name == "lm_head.weight" for e in entries):
        model_config.tie_word_embeddings = False


def tokenizer_source(ckpt_root: Path, ckpt: Checkpoint | None) -> Path | None:
    """The tokenizer to put beside weights from `ckpt_root`: in it (HF Trainer), in its run
    directory's tokenizer/, or the one the run was configured with (a directory or a .model file)."""
    candidates = [ckpt_root, RunDir(ckpt_root.parent).tokenizer]
    path = ckpt.sidecar.tokenizer if ckpt and ckpt.sidecar else None
    if path:
        candidates.append(Path(path))
    for c in candidates:
        if (c.is_file() and c.suffix == ".model") or has_tokenizer(c):
            return c
    return None


def write_extras(out: Path, model_config: PretrainedConfig, target: torch.dtype | None, entries: list[Entry],
                 generation_dir: Path | None, tokenizer: Path | None) -> None:
    """The rest of an HF directory beside the weights in `out`: config.json (dtype and tying as
    written), generation_config.json (copied from `generation_dir`, else from the config) and the
    tokenizer's files."""
    from transformers import GenerationConfig

    untie_trained_head(model_config, entries)
    dtype = target or next((e.dtype for e in entries if e.dtype.is_floating_point), torch.float32)
    model_config.dtype = dtype
    model_config.save_pretrained(out)
    if generation_dir is not None and (generation_dir / "generation_config.json").is_file():
        shutil.copy2(generation_dir / "generation_config.json", out / "generation_config.json")
    else:
        GenerationConfig.from_model_config(model_config).save_pretrained(out)
    if tokenizer is not None:
        write_tokenizer(out, tokenizer)


def write_tokenizer(out: Path, tokenizer: Path) -> None:
    """The files of tokenizer directory `tokenizer` copied into `out`; a sentencepiece .model file
    saved there in HF format."""
    if tokenizer.is_file():
        from model.tokenizer import load_tokenizer

        load_tokenizer(str(tokenizer)).save_pretrained(out)
        return
    for name in COPIED_TOKENIZER_FILES:
        if (tokenizer / name).is_file():
            shutil.copy2(tokenizer / name, out / name)


# --------------------------------------------------------------------------------------------
# The command


@dataclass(frozen=True)
class OutputPlan:
    """An OUTPUT argument, checked before any work is done."""

    path: Path
    kind: str
    """pth, safetensors or dir (an HF directory)."""
    target: torch.dtype | None
    """The dtype floating-point weights are written in; None: each in its own."""
    shard_bytes: int
    """An HF directory's largest shard."""
    overwrite: bool

    def write(self, entries: list[Entry], aliases: dict[str, str],
              extras: Callable[[Path], None] | None = None) -> int:
        """Write the entries (a .pth keeps the tied `aliases`) and, in an HF directory, what
        `extras(directory)` adds; returns the bytes of tensor data written."""
        return write_output(entries, aliases, self.path, self.kind, self.target, self.shard_bytes, self.overwrite,
                            extras)


def plan_output(output: str, dtype: str, max_shard_size: str | int, overwrite: bool) -> OutputPlan:
    """The OutputPlan of OUTPUT, --dtype, --max-shard-size and --overwrite."""
    out = Path(output)
    kind = output_kind(out)
    target = output_dtype(dtype)
    shard_bytes = parse_size(max_shard_size)
    if out.exists() and not overwrite:
        raise ZerotrainError(f"{out} already exists; remove it, choose another path, or pass --overwrite")
    return OutputPlan(out, kind, target, shard_bytes, overwrite)


def checkpoint_entries(ckpt: Checkpoint, *, keep_lora_keys: bool = False, lora_alpha: float | None = None,
                       adapter_config: str | None = None) -> tuple[list[Entry], dict[str, str], list[str]]:
    """The weights of a loaded checkpoint tag (fp32 masters where it has them), its tied names, and
    notes for the user. A LoRA checkpoint's adapter is folded into the base weights, with the alpha
    from `lora_settings`, unless `keep_lora_keys`."""
    tag_dir = ckpt.info.path
    entries, aliases = source_entries(ckpt.tensors), dict(ckpt.aliases)
    notes = list(ckpt.notes)
    if ckpt.info.is_lora and not keep_lora_keys:
        settings = lora_settings(tag_dir.parent, ckpt, lora_alpha=lora_alpha, adapter_config=adapter_config)
        if settings is None:
            raise ZerotrainError(f"{tag_dir} is a LoRA checkpoint and its lora_alpha is unknown (no zerotrain.json "
                                 f"or adapter_config.json beside it): pass --lora-alpha A or --adapter-config FILE "
                                 f"to fold the adapter into the weights, or --keep-lora-keys to keep the raw keys")
        entries, aliases = fold_lora(entries, aliases, settings)
        notes.append(f"LoRA folded into the base weights (alpha from {settings.source})")
    return entries, aliases, notes


def consolidate(ckpt_dir: str, output: str, *, tag: str | None = None, dtype: str = "fp32",
                max_shard_size: str | int = "5GB", keep_lora_keys: bool = False, lora_alpha: float | None = None,
                adapter_config: str | None = None, config: str | None = None, preset: str | None = None,
                trust_pickle: bool = False, overwrite: bool = False) -> Written:
    """Write the weights of one checkpoint tag as OUTPUT (.pth, .safetensors or an HF directory)."""
    plan = plan_output(output, dtype, max_shard_size, overwrite)
    tag_dir = resolve_tag(ckpt_dir, tag)
    ckpt_root = tag_dir.parent
    check_apart(plan.path, [("the checkpoint directory", ckpt_root)])
    ckpt = load_checkpoint(tag_dir, trust_pickle=trust_pickle)
    entries, aliases, notes = checkpoint_entries(ckpt, keep_lora_keys=keep_lora_keys, lora_alpha=lora_alpha,
                                                 adapter_config=adapter_config)
    extras = None
    if plan.kind == "dir":
        if keep_lora_keys and ckpt.info.is_lora:
            raise ZerotrainError("--keep-lora-keys keeps PEFT's key names, which an HF model directory cannot hold; "
                                 "write a .pth or .safetensors file instead")
        model_config, where = find_model_config(ckpt_root, ckpt, entries, config=config, preset=preset)
        if model_config is None:
            raise ZerotrainError(f"no model config for {tag_dir} (no config.json beside the checkpoint, no "
                                 f"zerotrain.json): pass --config CONFIG_JSON or --preset NAME to write an HF "
                                 f"directory, or write a .pth / .safetensors file")
        check_against_config(entries, model_config, where)
        tokenizer = tokenizer_source(ckpt_root, ckpt)
        check_apart(plan.path, [("the tokenizer", tokenizer), ("the model config", config)], inside_ok=True)
        if tokenizer is None:
            notes.append("no tokenizer found beside the checkpoint; copy one into the directory")
        generation_dir = ckpt_root if (ckpt_root / "generation_config.json").is_file() else ckpt_root.parent
        extras = lambda d: write_extras(d, model_config, plan.target, entries, generation_dir, tokenizer)  # noqa: E731
    total = plan.write(entries, aliases, extras)
    params = sum(e.numel for e in entries)
    return Written(plan.path, len(entries), params, total, notes)
