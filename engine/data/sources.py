"""--data: which sources a run reads (plain files of the launcher's data kind, or KIND:PATH[:WEIGHT]
entries mixed by weight), each raw files or one prepared directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from common.errors import ZerotrainError
from engine.data.columns import parse_columns
from engine.data.format import read_meta
from engine.data.kinds import KINDS, check_inputs, data_kind, detect_kind

if TYPE_CHECKING:
    from engine.config.sections import DataConfig


@dataclass
class DataSource:
    """One entry of --data: a kind, its files (or one prepared directory), and a mixing weight."""

    kind: str
    paths: list[str]
    weight: float | None = None
    held: str | None = None
    """The kind its raw files' records hold (engine.data.kinds.detect_kind); None for a prepared
    directory, which is read as the kind it was prepared as."""


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


def plain_kind(entries: list[str], columns: str) -> str:
    """What plain --data entries hold, for a stage that trains on what it is given: a prepared
    directory says so in its meta.json, raw files by their first record (or the --columns mapping)."""
    plain = [e for e in entries if e.split(":")[0] not in KINDS]
    if len(plain) == 1 and Path(plain[0]).is_dir():
        return read_meta(plain[0])["kind"]
    return detect_kind(plain, columns) if plain else "pretrain"


def run_sources(data: DataConfig, plain: str | None) -> list[DataSource]:
    """A run's --data sources, checked before anything is prepared: plain files taken as kind
    `plain` (None: as what they hold), the kind each raw source holds, a --columns mapping that
    applies to prepared directories, and what --document-mask needs."""
    sources = parse_data_sources(data.data, plain or plain_kind(data.data, data.columns))
    for source in sources:
        raw = [p for p in source.paths if not Path(p).is_dir()]
        # --columns maps the conversation or pair sources; pretraining text is always read from "text"
        mapping = data.columns if data_kind(source.kind).mapped else ""
        source.held = detect_kind(raw, mapping) if raw else None
        if data.columns and not raw and data_kind(source.kind).mapped:
            # A prepared directory is read as it was prepared: a mapping given now would be ignored.
            given, used = parse_columns(data.columns).spec(), read_meta(source.paths[0]).get("columns", "")
            if given != used:
                raise ZerotrainError(f"--columns {data.columns!r} does not apply to {source.paths[0]}, prepared "
                                     + (f"with --columns {used!r}" if used else "without --columns")
                                     + ": drop --columns, or prepare the raw files again with it")
    check_document_mask(data, sources)
    return sources


def check_document_mask(data: DataConfig, sources: list[DataSource]) -> None:
    """--document-mask needs pretraining windows in batches without an attention mask: transformers
    keeps documents apart through restarting position_ids only when no mask is passed."""
    if not data.document_mask:
        return
    kinds = {s.kind for s in sources}
    if "pretrain" not in kinds:
        raise ZerotrainError(f"--document-mask splits pretraining windows at their end-of-document tokens; this run "
                             f"has {'/'.join(sorted(kinds))} data only (one conversation or pair per example already): "
                             "drop --document-mask")
    if kinds != {"pretrain"} and not data.pack:
        raise ZerotrainError("--document-mask with pretraining and SFT data mixed needs --pack: a padded batch's "
                             "attention mask would let a window's documents see each other")
