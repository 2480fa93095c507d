"""The on-disk format of a prepared data directory, written by engine.data.prepare and read by
the datasets of each data kind::

    meta.json                 kind, dtype, vocab size, tokenizer fingerprint, source hashes, counts
    train.bin / val.bin       token ids (uint16 when the vocab fits, else uint32)
    train.mask.bin, ...       SFT and pref: 1 where the token is trained on (uint8)
    train.idx.npy, ...        SFT and pref: example start offsets into the token file (n + 1)

Labels mark the tokens not trained on with IGNORE_INDEX, as transformers and torch's
cross-entropy do.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import ZerotrainError

FORMAT_VERSION = 1
IGNORE_INDEX = -100


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every token id of the vocabulary."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def read_meta(directory: str | Path) -> dict[str, Any]:
    """meta.json of a prepared directory, checked for format version."""
    path = Path(directory) / "meta.json"
    if not path.is_file():
        raise ZerotrainError(f"{directory} is not a prepared data directory (no meta.json); "
                             "make one with `zerotrain prepare`")
    meta = json.loads(path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ZerotrainError(f"{path}: prepared with format version {meta.get('format_version')}, this zerotrain "
                             f"reads version {FORMAT_VERSION}; prepare the data again")
    return meta


def open_tokens(directory: Path, split: str, meta: dict[str, Any]) -> np.ndarray:
    """A split's token file as a read-only memmap, checked against meta.json for size and ids."""
    path = directory / f"{split}.bin"
    dtype = np.dtype(meta["dtype"])
    expected = meta["splits"][split]["tokens"] * dtype.itemsize
    if not path.is_file() or path.stat().st_size != expected:
        size = path.stat().st_size if path.is_file() else "missing"
        raise ZerotrainError(f"{path}: expected {expected} bytes, found {size}; the prepared data is "
                             "truncated or changed, prepare it again")
    if expected == 0:
        return np.zeros(0, dtype=dtype)
    tokens = np.memmap(path, dtype=dtype, mode="r")
    # Out-of-vocab ids would index past the embedding: check once, in chunks.
    for start in range(0, len(tokens), 1 << 24):
        top = int(tokens[start:start + (1 << 24)].max())
        if top >= meta["vocab_size"]:
            raise ZerotrainError(f"{path}: token id {top} is outside the vocabulary ({meta['vocab_size']}); "
                                 "the file is corrupt or from another tokenizer, prepare it again")
    return tokens
