"""Reading raw data files: lines of text, JSON records of .jsonl/.json/.parquet files, and records
of one detected shape, each located (file:line, file[index] or file:row N) for error messages;
malformed input is an error naming its place, or with --skip-bad-lines skipped and counted."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from common.errors import ZerotrainError


@dataclass
class ReadStats:
    """Counts of what a read skipped, reported in meta.json and to the user."""

    bad_lines: int = 0
    dropped_no_label: int = 0
    truncated: int = 0
    dropped_identical: int = 0  # preference pairs whose chosen and rejected responses are the same

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def read_lines(path: Path, skip_bad: bool, stats: ReadStats,
           on_bytes: Callable[[int], None] | None = None) -> Iterator[tuple[int, str]]:
    """(line number, text) of each non-blank line; invalid UTF-8 is an error naming the line.
    `on_bytes` is told the size of every line read (blank ones too), for progress bars."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if on_bytes:
                on_bytes(len(raw))
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                if skip_bad:
                    stats.bad_lines += 1
                    continue
                raise ZerotrainError(f"{path}:{lineno}: invalid UTF-8 ({e.reason} at byte {e.start}); "
                                     "fix the file or pass --skip-bad-lines") from None
            if line.strip():
                yield lineno, line


def json_records(path: Path, skip_bad: bool, stats: ReadStats,
                  on_bytes: Callable[[int], None] | None = None) -> Iterator[tuple[str, Any]]:
    """(location, record) from a .jsonl file (one object a line), a .json array or a .parquet
    file; `on_bytes` is told how much of the file each step read (in all, its size)."""
    if path.suffix == ".json":
        raw = path.read_bytes()
        if on_bytes:
            on_bytes(len(raw))
        try:
            data = json.loads(raw.decode("utf-8"))
            del raw  # the records are all in memory now; not the file's bytes as well
        except UnicodeDecodeError as e:
            raise ZerotrainError(f"{path}: invalid UTF-8 at byte {e.start}") from None
        except json.JSONDecodeError as e:
            raise ZerotrainError(f"{path}:{e.lineno}: invalid JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(data, list):
            raise ZerotrainError(f"{path}: expected a JSON array of records (or use .jsonl, one record a line)")
        for i, record in enumerate(data):
            yield f"{path}[{i}]", record
        return
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(path)
        size, rows, told = path.stat().st_size, max(1, parquet.metadata.num_rows), 0
        offset = 0
        for batch in parquet.iter_batches(batch_size=4096):
            if on_bytes:  # compressed columns: the file's bytes shared out by rows
                share = size * (offset + batch.num_rows) // rows
                on_bytes(share - told)
                told = share
            for record in batch.to_pylist():
                offset += 1
                yield f"{path}:row {offset}", record
        return
    for lineno, line in read_lines(path, skip_bad, stats, on_bytes):
        try:
            yield f"{path}:{lineno}", json.loads(line)
        except json.JSONDecodeError as e:
            if skip_bad:
                stats.bad_lines += 1
                continue
            raise ZerotrainError(f"{path}:{lineno}: invalid JSON ({e.msg}, column {e.colno}); "
                                 "fix the line or pass --skip-bad-lines to skip and count such lines") from None


def check_input(path: str | Path, suffixes: tuple[str, ...], kind: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise ZerotrainError(f"{kind} input {path} does not exist (or is not a file)")
    if path.suffix not in suffixes:
        raise ZerotrainError(f"{path}: unsupported {kind} input type '{path.suffix}'; use one of "
                             + ", ".join(suffixes))
    if path.stat().st_size == 0:
        raise ZerotrainError(f"{path}: the file is empty")
    return path


def read_shaped(path: str | Path, suffixes: tuple[str, ...], what: str, detect: Callable[[Any], str | None],
                parse: Callable[[Any, str, str], Any], shapes: str, skip_bad_lines: bool,
                stats: ReadStats, on_bytes: Callable[[int], None] | None = None) -> Iterator[tuple[str, Any]]:
    """(location, parse(record, fmt, location)) for each record of a JSON-records file whose shape
    `fmt` is detected from its first record; a bad record is an error, or skipped and counted.
    `on_bytes` counts the bytes read (json_records)."""
    path = check_input(path, suffixes, what)
    fmt = None
    for where, record in json_records(path, skip_bad_lines, stats, on_bytes):
        if fmt is None:
            fmt = detect(record)
            if fmt is None:
                found = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ZerotrainError(f"{where}: unknown {what} format (keys {found}); "
                                     f"supported shapes: {shapes}")
        try:
            parsed = parse(record, fmt, where)
        except ZerotrainError as e:
            if skip_bad_lines:
                stats.bad_lines += 1
                continue
            raise ZerotrainError(f"{e} (or pass --skip-bad-lines to skip and count such records)") from None
        yield where, parsed
