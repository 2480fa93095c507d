"""safetensors files, tensor by tensor, with public safetensors API only: `write_safetensors` writes
one from the shapes (header first, then the tensors in order); `safetensors_entries` reads one
through `safetensors.safe_open`, each tensor on its own.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, Callable

import torch

from common.errors import ZerotrainError
from engine.offline.tensors import Entry, Scratch, as_bytes, materialize, out_dtype

# The one table between safetensors' dtype codes and torch dtypes, for the writer and the reader.
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
SAFETENSORS_CODES: dict[torch.dtype, str] = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}


def write_safetensors(entries: list[Entry], path: Path, target: torch.dtype | None,
                      metadata: dict[str, str] | None = None) -> int:
    """Write one safetensors file, tensor by tensor (the header is known from the shapes); returns
    the bytes of tensor data.

    safetensors' own writers (`save_file`, `serialize_file`) need every tensor in memory at once,
    so the format is written here: an 8-byte header length, the JSON header, then the data."""
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for e in entries:
        dtype = out_dtype(e.dtype, target)
        if dtype not in SAFETENSORS_CODES:
            raise ZerotrainError(f"{e.name}: dtype {dtype} cannot be stored in safetensors")
        nbytes = e.numel * dtype.itemsize
        header[e.name] = {"dtype": SAFETENSORS_CODES[dtype], "shape": list(e.shape),
                          "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keeps the data 8-byte aligned, as safetensors does
    scratch = Scratch(entries, target)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for e in entries:
            f.write(as_bytes(materialize(e, target, scratch)))
    return offset


def _safe_open(path: Path) -> Any:
    from safetensors import safe_open

    try:
        # pread reads only the asked tensor's bytes into its own buffer (safetensors >= 0.8) ...
        return safe_open(str(path), framework="pt", backend="pread")
    except TypeError:
        # ... where older versions map the file; the pages read stay in RSS until it is closed.
        return safe_open(str(path), framework="pt")


def safetensors_entries(path: str | os.PathLike) -> list[Entry]:
    """The tensors of a `.safetensors` file, in file order, each read on its own when produced.

    The file is opened again for every tensor, so that with an mmap backend what was read is
    unmapped before the next one; `produce` ignores `into` (safetensors allocates the tensor)."""
    path = Path(path)
    try:
        with _safe_open(path) as f:
            names = f.offset_keys() if hasattr(f, "offset_keys") else f.keys()
            specs = [(name, f.get_slice(name)) for name in names]
            specs = [(name, tuple(s.get_shape()), s.get_dtype()) for name, s in specs]
    except Exception as e:  # safetensors raises SafetensorError, OSError, ...
        raise ZerotrainError(f"{path} is not a readable safetensors file, or it is truncated ({e})") from None
    entries = []
    for name, shape, code in specs:
        if code not in SAFETENSORS_DTYPES:
            raise ZerotrainError(f"{path}: tensor {name} has dtype {code}, which zerotrain does not read")
        entries.append(Entry(name, shape, SAFETENSORS_DTYPES[code], _safetensors_reader(path, name)))
    return entries


def _safetensors_reader(path: Path, name: str) -> Callable[[torch.Tensor | None], torch.Tensor]:
    def produce(into: torch.Tensor | None = None) -> torch.Tensor:
        try:
            with _safe_open(path) as f:
                return f.get_tensor(name)
        except Exception as e:  # the file changed or broke since it was listed
            raise ZerotrainError(f"cannot read tensor {name} from {path} ({e})") from None

    return produce
