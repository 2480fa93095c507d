"""Precision names (--precision, --dtype, what inspect reports) and the torch dtypes they stand for."""

from __future__ import annotations

import torch

from common.errors import ZerotrainError

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}


def resolve_precision(requested: str, device_type: str) -> str:
    """`auto` -> bf16 where the device supports it, else fp16 on GPU, fp32 on CPU."""
    if requested == "fp16" and device_type == "cpu":
        raise ZerotrainError("--precision fp16 needs a GPU (DeepSpeed refuses fp16 on CPU: \"Type fp16 is not "
                             "supported on your device\"); use --precision bf16 or fp32 on CPU")
    if requested != "auto":
        return requested
    if device_type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def output_dtype(name: str) -> torch.dtype | None:
    """The dtype a --dtype flag names (fp32, bf16, fp16); None for auto (each tensor's own)."""
    if name == "auto":
        return None
    if name not in DTYPES:
        raise ZerotrainError(f"--dtype {name!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[name]
