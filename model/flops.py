"""Training FLOPs per token and model FLOPs utilisation (MFU), from a config alone."""

import re

import torch
from transformers import GPT2Config, LlamaConfig, PretrainedConfig

# Dense (no sparsity) bf16 tensor-core peak FLOP/s per device, matched against the CUDA device name.
PEAK_FLOPS: dict[str, float] = {
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "4090": 165e12,
}


def matmul_params(config: PretrainedConfig) -> int:
    """Parameters that take part in matmuls: all but the input token (and position) embeddings,
    plus the lm_head, which counts even when it is tied to the token embedding."""
    h, n_layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    if isinstance(config, LlamaConfig):
        head_dim = config.head_dim or h // config.num_attention_heads
        q_width = config.num_attention_heads * head_dim
        kv_width = config.num_key_value_heads * head_dim
        attn = h * (q_width + 2 * kv_width) + q_width * h
        if config.attention_bias:
            attn += q_width + 2 * kv_width + h
        mlp = 3 * h * config.intermediate_size
        if config.mlp_bias:
            mlp += 2 * config.intermediate_size + h
        layer = attn + mlp + 2 * h  # two RMSNorm weights
        return n_layers * layer + h + vocab * h  # final norm, lm_head
    if isinstance(config, GPT2Config):
        inner = config.n_inner or 4 * h
        attn = (h * 3 * h + 3 * h) + (h * h + h)  # c_attn, c_proj with biases
        mlp = (h * inner + inner) + (inner * h + h)
        layer = attn + mlp + 2 * 2 * h  # two LayerNorms, weight and bias
        return n_layers * layer + 2 * h + vocab * h  # ln_f, lm_head (no bias)
    raise TypeError(f"matmul_params: no parameter count for {type(config).__name__}")


def flops_per_token(config: PretrainedConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token: 6 * N + 12 * n_layers * attn_width * seq_len.

    This is the estimate of PaLM (Chowdhery et al. 2022, appendix B) and nanoGPT's estimate_mfu.
    N = `matmul_params(config)`: every parameter except the input token embedding (and GPT-2's
    position embedding), which are lookups, plus the lm_head, a matmul even when tied to the
    embedding matrix. The second term is the attention scores and the weighted sum of values,
    where attn_width = n_heads * head_dim (usually hidden size); grouped KV heads do not shrink it.
    """
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attn_width = config.num_attention_heads * head_dim
    return 6.0 * matmul_params(config) + 12.0 * config.num_hidden_layers * attn_width * seq_len


def device_peak_flops() -> float | None:
    """Peak bf16 FLOP/s of the current CUDA device, or None on CPU or for a device not in PEAK_FLOPS."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, peak in PEAK_FLOPS.items():
        # Whole-word match, so that e.g. "RTX A1000" is not taken for an A100.
        if re.search(rf"\b{key}\b", name):
            return peak
    return None


def mfu(tokens_per_sec: float, flops_per_tok: float, n_devices: int, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved / peak FLOP/s, from the throughput summed over all
    `n_devices`. None when the peak is unknown."""
    if peak is None:
        return None
    return tokens_per_sec * flops_per_tok / (n_devices * peak)
