"""The rest of an HF model directory beside its weights: the transformers config (found for a
checkpoint, checked against the weights, saved with the dtype and tying written), the generation
config and the tokenizer's files. consolidate and merge-adapter write HF directories with it, and
--init-from a DeepSpeed checkpoint builds its model from the config it finds.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from common.errors import ZerotrainError
from common.jsonio import read_json_object
from engine.checkpoint.run_dir import SIDECAR, TOKENIZER_FILES, RunDir, has_tokenizer
from engine.offline.ds_weights import Checkpoint
from engine.offline.tensors import Entry
from model.state_dict import check_state_dict

if TYPE_CHECKING:
    from transformers import PretrainedConfig  # imported where used: it takes seconds

# What is copied from a tokenizer directory into an HF directory: the files that make one
# (run_dir.TOKENIZER_FILES) and those that come with them.
COPIED_TOKENIZER_FILES = (*TOKENIZER_FILES, "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json",
                          "chat_template.jinja", "chat_template.json")


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
