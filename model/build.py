"""Build a causal LM from a preset, an HF model directory, or a state-dict file."""

from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
)

from common.errors import ZerotrainError
from model.attention import resolve as resolve_attention
from model.presets import PRESETS, preset_config, preset_names, suggest
from model.state_dict import (
    STATE_DICT_SUFFIXES,
    check_state_dict,
    copy_into,
    load_state_dict_file,
)


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters, each shared (tied) tensor counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def build_model(
    source: str,
    *,
    preset: str | None = None,
    vocab_size: int | None = None,
    max_seq_len: int | None = None,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
) -> PreTrainedModel:
    """A causal LM from `source`:

    - a preset name: random init from `preset_config(source, vocab_size, max_seq_len)`;
    - an HF model directory (config.json, from `save_pretrained`): its weights and config;
    - a `.pth`/`.safetensors` state dict: the skeleton from `preset` (with `vocab_size` and
      `max_seq_len`) or else the config.json beside the file, then the weights, loaded strictly.

    `preset` and `max_seq_len` matter only where a preset builds the model. `vocab_size` (the
    tokenizer's), when given for a model with its own config.json, must match it.
    """
    # "sdpa" is built as zerotrain's sdpa: packed rows attended one example at a time (model.attention)
    attn_implementation = resolve_attention(attn_implementation)
    if source in PRESETS:
        if preset not in (None, source):
            raise ZerotrainError(f"model source is preset {source!r} but preset={preset!r}; give only one.")
        config = preset_config(source, vocab_size, max_seq_len)
        return build_from_config(config, f"preset {source!r}", dtype=dtype, attn_implementation=attn_implementation)

    path = Path(source)
    if path.is_dir():
        if (path / "config.json").is_file():
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, attn_implementation=attn_implementation, local_files_only=True
            )
            _check_vocab(model.config, vocab_size, path)
            return model
        raise ZerotrainError(
            f"model directory {path} has no config.json; pass an HF model directory (save_pretrained), "
            f"a .pth/.safetensors state dict, or a preset ({', '.join(preset_names())}); a DeepSpeed "
            f"checkpoint becomes one with `zerotrain consolidate`."
        )
    if path.is_file() and path.suffix in STATE_DICT_SUFFIXES:
        return _build_from_state_dict(path, preset, vocab_size, max_seq_len, dtype, attn_implementation)
    if path.is_file():
        raise ZerotrainError(f"model file {path} is not a .pth or .safetensors state dict.")
    raise ZerotrainError(
        f"model source {source!r} is neither a preset{suggest(source, preset_names())} "
        f"nor an existing path; presets: {', '.join(preset_names())}."
    )


def build_from_config(
    config: PretrainedConfig,
    where: str,
    *,
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
) -> PreTrainedModel:
    """A randomly initialised causal LM of `config` (called under `torch.device("meta")`, a skeleton
    without storage, for checking names and shapes); `where` says where the config came from.

    `dtype` and `attn_implementation` default to transformers' choice for the config; given, they
    are also set on `config`, as transformers does.
    """
    chosen = {"dtype": dtype, "attn_implementation": resolve_attention(attn_implementation)}
    try:
        return AutoModelForCausalLM.from_config(config, **{k: v for k, v in chosen.items() if v is not None})
    except Exception as e:  # transformers raises many kinds for a config it cannot build
        raise ZerotrainError(f"cannot build a causal LM from the config in {where}: {e}") from None


def _check_vocab(config: PretrainedConfig, vocab_size: int | None, where: Path) -> None:
    if vocab_size is not None and vocab_size != config.vocab_size:
        raise ZerotrainError(
            f"model {where} has vocab_size {config.vocab_size} but {vocab_size} was asked for "
            f"(the tokenizer's); use the tokenizer the model was trained with."
        )


def _build_from_state_dict(
    path: Path,
    preset: str | None,
    vocab_size: int | None,
    max_seq_len: int | None,
    dtype: torch.dtype,
    attn_implementation: str,
) -> PreTrainedModel:
    if preset is not None:
        config, shape_from = preset_config(preset, vocab_size, max_seq_len), f"preset {preset!r}"
    elif (path.parent / "config.json").is_file():
        config = AutoConfig.from_pretrained(path.parent, local_files_only=True)
        shape_from = str(path.parent / "config.json")
        _check_vocab(config, vocab_size, path.parent)
    else:
        raise ZerotrainError(
            f"state dict {path} carries no model shape; pass its preset (preset=) "
            f"or put its config.json beside it."
        )
    model = build_from_config(config, shape_from, dtype=dtype, attn_implementation=attn_implementation)
    state = load_state_dict_file(path)
    check_state_dict(
        {k: v.shape for k, v in state.items()}, model, source=f"state dict {path}",
        target=f"the model built from {shape_from}",
        advice="Build the model with the preset, vocab_size and max_seq_len the checkpoint was trained with.",
    )
    copy_into(model, state.items())
    return model
