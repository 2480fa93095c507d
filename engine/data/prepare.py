"""Preparing raw files of a data kind into a prepared directory (engine.data.format), once:
keyed by a hash of the files' contents, the tokenizer and the settings, built under a temporary
name and put in place whole (common.publish), reused while the key is the same."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from common.errors import ZerotrainError
from common.publish import publishing
from engine.data.columns import Columns, columns_for
from engine.data.files import ReadStats
from engine.data.format import FORMAT_VERSION, read_meta, token_dtype
from engine.data.kinds import check_inputs, data_kind
from engine.data.writer import PrepareProgress, resolve_num_proc


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's contents, read a MiB at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def preparation_key(kind: str, inputs: list[str], tokenizer, *, seq_len: int, val_fraction: float,
                    skip_bad_lines: bool, columns: Columns | None = None) -> tuple[str, list[dict[str, Any]]]:
    """A hash of everything a prepared directory depends on, and the source records it came from."""
    from model.tokenizer import tokenizer_fingerprint

    declared = data_kind(kind)
    sources = [{"path": str(Path(p).resolve()), "sha256": file_sha256(p), "bytes": Path(p).stat().st_size}
               for p in inputs]
    parts = {"version": FORMAT_VERSION, "kind": kind, "tokenizer": tokenizer_fingerprint(tokenizer),
             "sources": [s["sha256"] for s in sources], "val_fraction": val_fraction,
             "skip_bad_lines": skip_bad_lines, "seq_len": seq_len if declared.cut_at_seq_len else None}
    # Parts added only where they apply, so that other preparations keep their keys.
    if declared.reader_version is not None:
        parts[f"{kind}_reader"] = declared.reader_version
    if columns:
        parts["columns"] = columns.spec()
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16], sources


def prepare(kind: str, inputs: list[str], tokenizer, output_dir: str | Path, *, seq_len: int = 512,
            val_fraction: float = 0.01, skip_bad_lines: bool = False, show_progress: bool = True,
            columns: str = "", num_proc: int = 1) -> dict[str, Any]:
    """Tokenize `inputs` into `output_dir` (reused as is when nothing changed); return its meta.
    `columns` is a --columns mapping (KEY=FIELD,...) that says where SFT or pair records keep
    their parts, for every input file, instead of detecting each file's shape. `num_proc`
    processes encode SFT conversations (0: every core); the result does not depend on it.

    The directory is built under a temporary name and put in place once complete
    (common.publish), so a crash never leaves a half-written one behind.
    """
    declared = data_kind(kind)
    if not inputs:
        raise ZerotrainError("no input files given (--input / --data)")
    mapping = columns_for(kind, columns)
    num_proc = resolve_num_proc(num_proc)
    check_inputs(kind, inputs)
    key, sources = preparation_key(kind, inputs, tokenizer, seq_len=seq_len, val_fraction=val_fraction,
                                   skip_bad_lines=skip_bad_lines, columns=mapping)
    output_dir = Path(output_dir)
    existing = read_meta(output_dir) if (output_dir / "meta.json").is_file() else None
    if existing and existing.get("key") == key:
        return existing

    from model.tokenizer import tokenizer_fingerprint

    stats = ReadStats()
    bar = PrepareProgress(kind, declared.unit, inputs, show_progress, by_bytes=declared.progress_by_bytes)
    try:
        # Another rank or node preparing the same data at once is harmless: the two results are
        # identical, and whichever lands last replaces the other in one step.
        with publishing(output_dir, directory=True) as tmp:
            splits = declared.write(list(map(str, inputs)), tokenizer, tmp, seq_len=seq_len, val_fraction=val_fraction,
                                    skip_bad_lines=skip_bad_lines, stats=stats, progress=bar, columns=mapping,
                                    num_proc=num_proc)
            meta = {"format_version": FORMAT_VERSION, "key": key, "kind": kind,
                    "dtype": str(token_dtype(len(tokenizer))), "vocab_size": len(tokenizer),
                    "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
                    "seq_len": seq_len if declared.cut_at_seq_len else None, "val_fraction": val_fraction,
                    "columns": mapping.spec() if mapping else "",
                    "sources": sources, "splits": splits, "stats": stats.to_dict()}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    finally:
        bar.close()
    return meta


def prepare_cached(kind: str, inputs: list[str], tokenizer, cache_dir: str | Path, *, seq_len: int,
                   val_fraction: float, skip_bad_lines: bool, show_progress: bool = True, columns: str = "",
                   num_proc: int = 1) -> Path:
    """Prepare into `cache_dir/<kind>-<key>/`, keyed by the inputs' contents, the tokenizer and the
    --columns mapping."""
    key, _ = preparation_key(kind, inputs, tokenizer, seq_len=seq_len, val_fraction=val_fraction,
                             skip_bad_lines=skip_bad_lines, columns=columns_for(kind, columns))
    target = Path(cache_dir) / f"{kind}-{key}"
    prepare(kind, inputs, tokenizer, target, seq_len=seq_len, val_fraction=val_fraction,
            skip_bad_lines=skip_bad_lines, show_progress=show_progress, columns=columns, num_proc=num_proc)
    return target
