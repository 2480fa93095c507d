"""model/presets.py, model/build.py, model/flops.py."""

import pytest
import safetensors.torch
import torch
from transformers import GPT2LMHeadModel, LlamaForCausalLM

from common.errors import ZerotrainError
from model import flops
from model.build import build_model, count_parameters
from model.flops import (
    PEAK_FLOPS,
    device_peak_flops,
    flops_per_token,
    matmul_params,
    mfu,
)
from model.presets import PRESETS, preset_config, preset_names
from model.state_dict import load_state_dict_file

VOCAB = 1000


@pytest.fixture(scope="module")
def debug_model():
    torch.manual_seed(0)
    return build_model("debug", vocab_size=VOCAB, max_seq_len=64)


@pytest.fixture(scope="module")
def input_ids():
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))


def meta_model(name: str, **overrides):
    with torch.device("meta"):
        return build_model(name, **overrides)


def embedding_params(model) -> int:
    """Input token (and position) embedding parameters."""
    n = model.get_input_embeddings().weight.numel()
    if isinstance(model, GPT2LMHeadModel):
        n += model.transformer.wpe.weight.numel()
    return n


# presets


def test_preset_names_match_presets():
    assert preset_names() == list(PRESETS)
    assert {"debug", "tiny", "minimind-26m", "minimind-104m", "gpt2-124m", "llama-1b"} <= set(preset_names())


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds(name):
    config = preset_config(name)
    model = meta_model(name)
    assert isinstance(model, GPT2LMHeadModel if PRESETS[name]["arch"] == "gpt2" else LlamaForCausalLM)
    assert model.config.vocab_size == config.vocab_size and config.max_position_embeddings > 0
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # all tied
    assert config.bos_token_id is None and config.eos_token_id is None and config.pad_token_id is None


def test_param_counts():
    assert abs(count_parameters(meta_model("minimind-26m")) - 25.8e6) < 0.05e6
    assert 3.5e6 <= count_parameters(meta_model("tiny")) <= 4.5e6
    assert abs(count_parameters(meta_model("gpt2-124m")) - 124.4e6) < 0.1e6
    assert abs(count_parameters(meta_model("llama-1b")) - 1.236e9) < 0.001e9
    assert abs(count_parameters(meta_model("qwen2-0.5b")) - 494.0e6) < 0.1e6  # Qwen2-0.5B: 494,032,768 with its biases


def test_preset_overrides():
    config = preset_config("debug", vocab_size=123, max_seq_len=77, rope_theta=1e5, eos_token_id=2)
    assert (config.vocab_size, config.max_position_embeddings, config.eos_token_id) == (123, 77, 2)
    assert config.rope_parameters["rope_theta"] == 1e5
    assert PRESETS["debug"]["rope_parameters"]["rope_theta"] == 10000.0  # the preset itself is untouched
    assert preset_config("gpt2-124m", max_seq_len=256).n_positions == 256


def test_unknown_preset_suggests_nearest():
    with pytest.raises(ZerotrainError, match="'minimind-25m'.*did you mean 'minimind-26m'"):
        preset_config("minimind-25m")
    with pytest.raises(ZerotrainError, match="did you mean 'minimind-104m'"):
        build_model("minimind-104")


def test_bad_overrides():
    with pytest.raises(ZerotrainError, match="'hidden_sise'.*did you mean 'hidden_size'"):
        preset_config("debug", hidden_sise=32)
    with pytest.raises(ZerotrainError, match="not a valid LlamaConfig"):
        preset_config("debug", hidden_size=66)


# build_model


def test_debug_builds_and_trains(debug_model, input_ids):
    assert isinstance(debug_model, LlamaForCausalLM)
    assert debug_model.config.num_hidden_layers == 2 and debug_model.config.hidden_size == 64
    assert debug_model.config._attn_implementation == "zerotrain_sdpa"  # sdpa, packed rows split (model.attention)
    loss = debug_model(input_ids=input_ids, labels=input_ids).loss
    assert 5.0 < loss.item() < 9.0  # about ln(1000) at init
    loss.backward()
    debug_model.zero_grad()


def test_dtype_and_trainable_count():
    model = build_model("debug", vocab_size=VOCAB, dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    total = count_parameters(model)
    model.get_input_embeddings().weight.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == total - VOCAB * 64


def test_from_hf_dir(debug_model, input_ids, tmp_path):
    debug_model.save_pretrained(tmp_path / "hf")
    loaded = build_model(str(tmp_path / "hf"))
    torch.testing.assert_close(loaded(input_ids).logits, debug_model(input_ids).logits)
    with pytest.raises(ZerotrainError, match="vocab_size 1000 but 6400"):
        build_model(str(tmp_path / "hf"), vocab_size=6400)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_from_state_dict_file(debug_model, input_ids, tmp_path, suffix):
    # As DeepSpeed/DDP and torch.compile save it, and without the tied lm_head (safetensors drops it).
    state = {f"module._orig_mod.{k}": v.clone() for k, v in debug_model.state_dict().items()}
    del state["module._orig_mod.lm_head.weight"]
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pth":
        torch.save(state, path)
    else:
        safetensors.torch.save_file(state, path)
    assert set(load_state_dict_file(path)) == set(debug_model.state_dict()) - {"lm_head.weight"}

    loaded = build_model(str(path), preset="debug", vocab_size=VOCAB, max_seq_len=64)
    torch.testing.assert_close(loaded(input_ids).logits, debug_model(input_ids).logits)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight

    with pytest.raises(ZerotrainError, match="pass its preset"):
        build_model(str(path))
    debug_model.config.save_pretrained(tmp_path)  # a config.json beside the file does as well
    torch.testing.assert_close(build_model(str(path))(input_ids).logits, debug_model(input_ids).logits)


def test_state_dict_mismatch_lists_keys_and_shapes(debug_model, tmp_path):
    path = tmp_path / "weights.pth"
    state = dict(debug_model.state_dict())
    state["model.extra.weight"] = torch.zeros(3)
    del state["model.norm.weight"]
    torch.save(state, path)
    with pytest.raises(ZerotrainError) as error:
        build_model(str(path), preset="debug", vocab_size=VOCAB + 1, max_seq_len=64)
    message = str(error.value)
    assert "model.embed_tokens.weight: file (1000, 64) vs model (1001, 64)" in message
    assert "model.norm.weight: missing from file (model (64,))" in message
    assert "model.extra.weight: file (3,), not in model" in message


def test_bad_sources(tmp_path):
    with pytest.raises(ZerotrainError, match="neither a preset nor an existing path"):
        build_model(str(tmp_path / "missing"))
    (tmp_path / "ds" / "global_step10").mkdir(parents=True)
    (tmp_path / "ds" / "latest").write_text("global_step10")
    with pytest.raises(ZerotrainError, match="zerotrain consolidate"):
        build_model(str(tmp_path / "ds"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ZerotrainError, match="no config.json"):
        build_model(str(tmp_path / "empty"))
    torch.save({"model": {"w": torch.zeros(1)}, "step": 3}, tmp_path / "nested.pth")
    with pytest.raises(ZerotrainError, match="not a flat state dict"):
        load_state_dict_file(tmp_path / "nested.pth")
    (tmp_path / "junk.safetensors").write_text("junk")
    with pytest.raises(ZerotrainError, match="cannot read state dict"):
        build_model(str(tmp_path / "junk.safetensors"), preset="debug")


# flops


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("debug", {}),
        ("debug", {"tie_word_embeddings": False, "attention_bias": True, "mlp_bias": True}),
        ("debug", {"head_dim": 32}),
        ("tiny", {}),
        ("minimind-26m", {}),
        ("gpt2-124m", {"n_layer": 2, "n_embd": 64, "n_head": 4}),
        ("gpt2-124m", {"n_layer": 2, "n_embd": 64, "n_head": 4, "n_inner": 96, "tie_word_embeddings": False}),
        ("llama-1b", {}),
    ],
)
def test_matmul_params_matches_model(name, overrides):
    config = preset_config(name, **overrides)
    with torch.device("meta"):
        model = (GPT2LMHeadModel if PRESETS[name]["arch"] == "gpt2" else LlamaForCausalLM)(config)
    lm_head = model.get_output_embeddings().weight.numel()
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    expected = count_parameters(model) - embedding_params(model) + (lm_head if tied else 0)
    assert matmul_params(config) == expected


def test_flops_per_token_formula():
    config = preset_config("debug", vocab_size=VOCAB)
    n = 2 * (64 * 64 * 2 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64) + 64 + VOCAB * 64
    assert matmul_params(config) == n
    assert flops_per_token(config, 128) == 6 * n + 12 * 2 * 64 * 128
    # GPT-2 124M at T=1024, as nanoGPT's estimate_mfu counts it (N without wpe, lm_head tied): 6N + 12LHQT.
    gpt2 = preset_config("gpt2-124m")
    assert matmul_params(gpt2) == 124_439_808 - 1024 * 768
    assert flops_per_token(gpt2, 1024) == 6 * (124_439_808 - 1024 * 768) + 12 * 12 * 768 * 1024


def test_mfu_and_peak(monkeypatch):
    assert mfu(1000.0, 1e9, 2, 1e12) == pytest.approx(0.5)
    assert mfu(1000.0, 1e9, 2, None) is None
    monkeypatch.setattr(flops.torch.cuda, "is_available", lambda: False)
    assert device_peak_flops() is None
    monkeypatch.setattr(flops.torch.cuda, "is_available", lambda: True)
    for name, peak in [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12),
                       ("NVIDIA GeForce RTX 4090", 165e12), ("NVIDIA L40S", 362e12),
                       ("NVIDIA RTX A1000", None), ("Tesla T4", None)]:
        monkeypatch.setattr(flops.torch.cuda, "get_device_name", lambda name=name: name)
        assert device_peak_flops() == peak
    assert PEAK_FLOPS["H200"] == 989e12
