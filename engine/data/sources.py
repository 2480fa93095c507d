"""--data: which sources a run reads (plain files of the launcher's data kind, or KIND:PATH[:WEIGHT]
entries mixed by weight), each raw files or one prepared directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.errors import ZerotrainError
from engine.data.kinds import KINDS, check_inputs


@dataclass
class DataSource:
    """One entry of --data: a kind, its files (or one prepared directory), and a mixing weight."""

    kind: str
    paths: list[str]
    weight: float | None = None


def parse_data_sources(entries: list[str], default_kind: str) -> list[DataSource]:
    """`FILE...` or `KIND:PATH[:WEIGHT]...` -> sources. Plain files form one source of the
    launcher's kind; every KIND:PATH entry is a source of its own, and mixing needs weights."""
    sources: list[DataSource] = []
    plain: list[str] = []
    for entry in entries:
        parts = entry.split(":")
        if parts[0] in KINDS and len(parts) in (2, 3):
            try:
                weight = float(parts[2]) if len(parts) == 3 else None
            except ValueError:
                raise ZerotrainError(f"--data {entry}: the weight '{parts[2]}' is not a number (KIND:PATH:WEIGHT)") from None
            sources.append(DataSource(parts[0], [parts[1]], weight))
        else:
            plain.append(entry)
    if plain:
        sources.insert(0, DataSource(default_kind, plain))
    if not sources:
        raise ZerotrainError("no training data: pass --data FILE... (raw files or a `zerotrain prepare` directory)")
    if len(sources) > 1 and any(s.weight is None for s in sources):
        raise ZerotrainError("mixing data sources needs a weight on each: --data pretrain:FILE:0.7 --data sft:FILE:0.3"
                             f" (got {entries})")
    for source in sources:
        dirs = [p for p in source.paths if Path(p).is_dir()]
        if dirs and len(source.paths) > 1:
            raise ZerotrainError(f"--data takes one prepared directory or raw files per source, got {source.paths}")
        if not dirs:
            check_inputs(source.kind, source.paths)
    return sources
