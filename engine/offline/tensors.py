"""Tensors one at a time: an `Entry` to write (a name, shape and dtype, and how to make it) and a
`TensorSource` to read (byte ranges of files, read with plain file reads), with the scratch buffers
the writers reuse, so that memory holds one tensor (plus two buffers sized for the largest), never
the model. The formats are in safetensors_io.py and pth_io.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from common.errors import ZerotrainError

# --------------------------------------------------------------------------------------------
# Tensors to write


@dataclass
class Entry:
    """One output tensor: its name, shape, the dtype it comes in, and how to make it.

    `produce(into)` returns the tensor; `into`, when not None, is a buffer of that shape and dtype
    it may fill and return instead of allocating.
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[torch.Tensor | None], torch.Tensor]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def out_dtype(dtype: torch.dtype, target: torch.dtype | None) -> torch.dtype:
    """The dtype a tensor is written in: `target` for floating-point tensors, else its own."""
    return target if target is not None and dtype.is_floating_point else dtype


class Scratch:
    """Two buffers sized for the largest tensor, one to read into and one to convert into, reused
    for every tensor. (A fresh allocation per tensor fragments the heap, and RSS creeps up.)"""

    def __init__(self, entries: list[Entry], target: torch.dtype | None) -> None:
        casts = [e for e in entries if out_dtype(e.dtype, target) != e.dtype]
        self.read = torch.empty(max((e.numel * e.dtype.itemsize for e in entries), default=0), dtype=torch.uint8)
        self.cast = torch.empty(max((e.numel * target.itemsize for e in casts), default=0), dtype=torch.uint8)

    @staticmethod
    def view(buf: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        return buf[:math.prod(shape) * dtype.itemsize].view(dtype).view(shape)


def materialize(entry: Entry, target: torch.dtype | None, scratch: Scratch) -> torch.Tensor:
    """The entry's tensor in its output dtype, contiguous, in the scratch buffers where it can be;
    valid until the next call."""
    t = entry.produce(scratch.view(scratch.read, entry.dtype, entry.shape))
    if tuple(t.shape) != entry.shape:
        raise ZerotrainError(f"internal error: {entry.name} came out {tuple(t.shape)}, expected {entry.shape}")
    dtype = out_dtype(t.dtype, target)
    if dtype != t.dtype:
        out = scratch.view(scratch.cast, dtype, entry.shape) if dtype == target and entry.dtype == t.dtype \
            else torch.empty(entry.shape, dtype=dtype)
        t = out.copy_(t)
    return t.contiguous()


def as_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


# --------------------------------------------------------------------------------------------
# Tensors read by byte range


@dataclass(frozen=True)
class Piece:
    """`numel` elements stored contiguously at byte `offset` of `path`."""

    path: str
    offset: int
    numel: int


@dataclass
class TensorSource:
    """One tensor of a file or of several (a checkpoint's rank slices): its pieces, concatenated
    in order, viewed as `shape`."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    pieces: tuple[Piece, ...]
    origin: str = "module"
    """fp32 master, module (weights in the training dtype), frozen or buffer."""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def read(self, into: torch.Tensor | None = None) -> torch.Tensor:
        """Read the tensor from disk (plain reads, no mmap), into `into` (contiguous, this dtype and
        shape) when given."""
        if into is None:
            into = torch.empty(self.shape, dtype=self.dtype)
        elif into.dtype != self.dtype or tuple(into.shape) != self.shape or not into.is_contiguous():
            raise ValueError(f"read into a {into.dtype} {tuple(into.shape)} buffer, need {self.dtype} {self.shape}")
        out = into.reshape(-1)
        buf = memoryview(out.view(torch.uint8).numpy())
        itemsize = out.element_size()
        pos = 0
        for piece in self.pieces:
            size = piece.numel * itemsize
            with open(piece.path, "rb", buffering=0) as f:
                f.seek(piece.offset)
                got = 0
                while got < size:
                    n = f.readinto(buf[pos + got:pos + size])
                    if not n:
                        raise ZerotrainError(f"{piece.path} ends at byte {piece.offset + got}, inside a tensor "
                                             f"({size} bytes from {piece.offset}): the file is truncated")
                    got += n
            pos += size
        if pos != len(buf):
            raise ZerotrainError(f"internal error: pieces of {pos} bytes for a tensor of {len(buf)} bytes")
        return into


def source_entries(tensors: dict[str, TensorSource]) -> list[Entry]:
    """Entries that read each tensor from its source when written."""
    return [Entry(name, src.shape, src.dtype, src.read) for name, src in tensors.items()]
