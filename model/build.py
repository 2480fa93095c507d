"""Build a causal LM from a preset, an HF model directory, or a state-dict file."""

import pickle
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from common.errors import ZerotrainError
from model.presets import PRESETS, did_you_mean, preset_config, preset_names

STATE_DICT_SUFFIXES = (".pth", ".pt", ".safetensors")
# DDP and DeepSpeed wrap the model as `module`, torch.compile as `_orig_mod`.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a `.pth`/`.pt` (torch.save) or `.safetensors` state dict onto the CPU, with the
    `module.` and `_orig_mod.` prefixes stripped."""
    path = Path(path)
    how_to = (
        "save one with torch.save(model.state_dict(), ...) or safetensors, "
        "or consolidate a DeepSpeed checkpoint with `zerotrain consolidate`"
    )
    try:
        if path.suffix == ".safetensors":
            state = safetensors.torch.load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError, safetensors.SafetensorError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ZerotrainError(f"cannot read state dict {path}: {first_line}; {how_to}.") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ZerotrainError(f"{path} is not a flat state dict {{name: tensor}}; {how_to}.")
    stripped = {}
    for key, tensor in state.items():
        while key.startswith(WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        stripped[key] = tensor
    return stripped


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
    if source in PRESETS:
        if preset not in (None, source):
            raise ZerotrainError(f"model source is preset {source!r} but preset={preset!r}; give only one.")
        config = preset_config(source, vocab_size, max_seq_len)
        return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)

    path = Path(source)
    if path.is_dir():
        if (path / "config.json").is_file():
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, attn_implementation=attn_implementation, local_files_only=True
            )
            _check_vocab(model.config, vocab_size, path)
            return model
        if (path / "latest").is_file() or any(path.glob("global_step*")):
            raise ZerotrainError(
                f"{path} is a DeepSpeed checkpoint directory, which cannot be loaded as a model yet; "
                f"consolidate it first with `zerotrain consolidate {path}` and pass the result."
            )
        raise ZerotrainError(
            f"model directory {path} has no config.json; pass an HF model directory (save_pretrained), "
            f"a .pth/.safetensors state dict, or a preset ({', '.join(preset_names())})."
        )
    if path.is_file() and path.suffix in STATE_DICT_SUFFIXES:
        return _build_from_state_dict(path, preset, vocab_size, max_seq_len, dtype, attn_implementation)
    if path.is_file():
        raise ZerotrainError(f"model file {path} is not a .pth or .safetensors state dict.")
    raise ZerotrainError(
        f"model source {source!r} is neither a preset{did_you_mean(source, preset_names())} "
        f"nor an existing path; presets: {', '.join(preset_names())}."
    )


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
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    state = load_state_dict_file(path)

    expected = model.state_dict()
    optional = {"lm_head.weight"} if config.tie_word_embeddings else set()
    problems = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems += [
        f"{k}: missing from file (model {tuple(v.shape)})"
        for k, v in expected.items()
        if k not in state and k not in optional
    ]
    problems += [f"{k}: file {tuple(v.shape)}, not in model" for k, v in state.items() if k not in expected]
    if problems:
        listed = "\n  ".join(problems[:5])
        raise ZerotrainError(
            f"state dict {path} does not match the model built from {shape_from} "
            f"({len(problems)} differing keys, first {min(5, len(problems))}):\n  {listed}\n"
            f"Build the model with the preset, vocab_size and max_seq_len the checkpoint was trained with."
        )
    model.load_state_dict(state, strict=False)
    return model
