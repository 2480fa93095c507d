"""Named model shapes as plain data, turned into transformers configs by `preset_config`.

Each preset is the keyword arguments of a transformers config (LlamaConfig or GPT2Config, picked
by "arch"), so the numbers read the same as in the model cards they come from.
"""

import copy
import dataclasses

from huggingface_hub.errors import StrictDataclassError
from transformers import GPT2Config, LlamaConfig, PretrainedConfig

from common.errors import ZerotrainError, did_you_mean

CONFIG_CLASSES: dict[str, type[PretrainedConfig]] = {"llama": LlamaConfig, "gpt2": GPT2Config}

PRESETS: dict[str, dict] = {
    # Every test uses this one: small enough to build and step in milliseconds on CPU.
    "debug": dict(
        arch="llama",
        vocab_size=6400,
        max_position_embeddings=256,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
    ),
    # About 4M parameters at vocab 6400: trains in minutes on one GPU, for demos and smoke runs.
    "tiny": dict(
        arch="llama",
        vocab_size=6400,
        max_position_embeddings=1024,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=512,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    ),
    # MiniMind2-small (jingyaogong/minimind): 25.8M parameters.
    "minimind-26m": dict(
        arch="llama",
        vocab_size=6400,
        max_position_embeddings=32768,
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=1408,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    ),
    # MiniMind2 (jingyaogong/minimind): 104M parameters.
    "minimind-104m": dict(
        arch="llama",
        vocab_size=6400,
        max_position_embeddings=32768,
        hidden_size=768,
        num_hidden_layers=16,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    ),
    # GPT-2 small, as in nanoGPT; dropout off, since single-epoch pretraining does not need it.
    "gpt2-124m": dict(
        arch="gpt2",
        vocab_size=50257,
        n_positions=1024,
        n_embd=768,
        n_layer=12,
        n_head=12,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=True,
    ),
    # Llama 3.2 1B (meta-llama/Llama-3.2-1B config.json), so its weights load into this shape.
    "llama-1b": dict(
        arch="llama",
        vocab_size=128256,
        max_position_embeddings=131072,
        hidden_size=2048,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=8192,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    ),
    # Qwen2-0.5B's shape (vocabulary 151,936, hidden 896) as a Llama: no q/k/v biases (27,648
    # parameters). The embeddings are 28% of the model, which is what the chunked loss is for.
    "qwen2-0.5b": dict(
        arch="llama",
        vocab_size=151936,
        max_position_embeddings=32768,
        hidden_size=896,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        intermediate_size=4864,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    ),
}


def preset_names() -> list[str]:
    """The names `preset_config` accepts."""
    return list(PRESETS)


def suggest(name: str, valid: list[str]) -> str:
    """' (did you mean X?)' after a name in a sentence, or ''."""
    hint = did_you_mean(name, valid)
    return f" ({hint})" if hint else ""


def preset_config(
    name: str, vocab_size: int | None = None, max_seq_len: int | None = None, **overrides
) -> PretrainedConfig:
    """The transformers config of preset `name`.

    `vocab_size` and `max_seq_len` (max_position_embeddings) replace the preset's when given;
    `overrides` are further config fields (e.g. `bos_token_id=1`, `rope_theta=1e4`).
    """
    if name not in PRESETS:
        raise ZerotrainError(
            f"unknown model preset {name!r}{suggest(name, preset_names())}; "
            f"valid presets: {', '.join(preset_names())}."
        )
    kwargs = copy.deepcopy(PRESETS[name])
    config_class = CONFIG_CLASSES[kwargs.pop("arch")]
    if vocab_size is not None:
        kwargs["vocab_size"] = vocab_size
    if max_seq_len is not None:
        # GPT2Config maps max_position_embeddings onto n_positions itself.
        kwargs.pop("n_positions", None)
        kwargs["max_position_embeddings"] = max_seq_len
    if "rope_theta" in overrides and "rope_parameters" in kwargs:
        kwargs["rope_parameters"]["rope_theta"] = overrides.pop("rope_theta")
    # The config classes default to ids of their own vocabularies (GPT-2: 50256), which would be
    # wrong for ours; the tokenizer's ids come in through `overrides`.
    kwargs.update(bos_token_id=None, eos_token_id=None, pad_token_id=None)

    # transformers configs accept any keyword silently; catch typos here instead.
    known = {f.name for f in dataclasses.fields(config_class)} | set(config_class.attribute_map)
    for key in overrides:
        if key not in known:
            raise ZerotrainError(
                f"unknown {config_class.__name__} field {key!r}{suggest(key, list(known))} "
                f"in the overrides of model preset {name!r}; use the field names of transformers' config."
            )
    kwargs.update(overrides)
    try:
        return config_class(**kwargs)
    except (ValueError, TypeError, StrictDataclassError) as e:
        raise ZerotrainError(
            f"model preset {name!r} with overrides {overrides} is not a valid {config_class.__name__}: {e}"
        ) from e
