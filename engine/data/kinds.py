"""The data kinds zerotrain trains on, declared in one place: what their raw files are, how they
are prepared, read back and batched. Everything else (the preparation, a run's --data, `zerotrain
prepare` and `eval`) learns about kinds from KINDS alone; a new kind (RL prompts, say) is one module
beside text.py, conversations.py and pairs.py and one entry here.

    pretrain   text documents -> fixed-length windows of one token stream (text.py)
    sft        conversations -> one labelled sequence each (conversations.py)
    pref       preference pairs -> a chosen and a rejected sequence each (pairs.py)
    prompt     RL prompts and their columns -> left-padded prompts to sample from (prompts.py)
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from common.errors import ZerotrainError
from engine.data.collate import collate_packed, collate_pad, collate_stack
from engine.data.columns import parse_columns
from engine.data.conversations import (
    SFT_READER_VERSION,
    SFT_SUFFIXES,
    SFTDataset,
    detect_sft_format,
    write_sft,
)
from engine.data.files import ReadStats, check_input, json_records
from engine.data.pairs import (
    PREF_SUFFIXES,
    PrefDataset,
    collate_pref,
    collate_pref_packed,
    detect_pref_format,
    write_pref,
)
from engine.data.prompts import (
    PROMPT_SUFFIXES,
    PromptDataset,
    collate_prompts,
    detect_prompt_format,
    write_prompts,
)
from engine.data.text import PRETRAIN_SUFFIXES, PretrainDataset, write_pretrain

Batch = dict[str, torch.Tensor]
Collate = Callable[[list[dict[str, torch.Tensor]]], Batch]


@dataclass(frozen=True)
class DataKind:
    """One kind of training data."""

    name: str
    """As --data KIND:PATH, `zerotrain prepare --kind` and meta.json name it."""
    title: str
    """What its raw files hold, for messages: "preference pairs"."""
    reader: str
    """Its reader's name in messages about an input file: "SFT input a.txt does not exist"."""
    suffixes: tuple[str, ...]
    """The raw file types it reads."""
    write: Callable[..., dict[str, dict[str, int]]]
    """Its preparation: write(inputs, tokenizer, out, *, seq_len, val_fraction, skip_bad_lines, stats,
    progress, columns, num_proc) -> the splits' counts."""
    dataset: Callable[..., torch.utils.data.Dataset]
    """(prepared directory, split, seq_len, document_eos) -> its examples; document_eos is the
    end-of-document token under --document-mask (pretraining windows), else None."""
    collate: Callable[[int, int, bool], Collate]
    """(seq_len, pad id, pack) -> the collate of its examples into micro-batches."""
    item: str
    """What one example of its dataset is, counted in the logs: "samples", "pairs"."""
    unit: str
    """What its preparation's progress bar counts besides bytes: "docs", "convs", "pairs"."""
    language_modeling: bool
    """Its examples are sequences with labels (input_ids, labels), scored token by token: several
    such kinds can be mixed in one run, and `zerotrain eval` measures a model's loss on them."""
    mapped: bool = False
    """Its records can be read through a --columns mapping."""
    cut_at_seq_len: bool = True
    """Its examples are cut to --seq-len while prepared, so a prepared directory is for one
    seq_len (pretraining's token stream is cut into windows when read instead)."""
    reader_version: int | None = None
    """Part of the preparation key: raised when the same raw files come to read otherwise."""
    progress_by_bytes: bool = True
    """Its writer reports the bytes it has read (a progress bar with an end), not only items."""
    also_reads: tuple[str, ...] = ()
    """Other kinds whose raw records it reads too (RL prompts from conversations: their turns up to
    the last user turn)."""

    def check_inputs(self, paths: list[str]) -> None:
        """Every raw input exists, is not empty and has a suffix this kind reads."""
        for path in paths:
            check_input(path, self.suffixes, self.reader)


def _lm_collate(seq_len: int, pad_id: int, pack: bool) -> Collate:
    """Sequences of any length: packed into rows of at most seq_len tokens, or right-padded."""
    return partial(collate_packed, seq_len=seq_len, pad_id=pad_id) if pack else partial(collate_pad, pad_id=pad_id)


def _sequences(dataset: Callable[..., torch.utils.data.Dataset]) -> Callable[..., torch.utils.data.Dataset]:
    """A kind's dataset that has no windows to split into documents (document_eos does not apply)."""
    return lambda directory, split, seq_len, document_eos: dataset(directory, split, seq_len)


def _pairs_collate(seq_len: int, pad_id: int, pack: bool) -> Collate:
    """Preference pairs: their 2B sequences packed (with a sequence map) or padded, one row each."""
    if pack:
        return partial(collate_pref_packed, seq_len=seq_len, pad_id=pad_id)
    return partial(collate_pref, pad_id=pad_id)


KINDS: dict[str, DataKind] = {kind.name: kind for kind in (
    DataKind("pretrain", "pretraining text", "pretraining", PRETRAIN_SUFFIXES, write_pretrain, PretrainDataset,
             lambda seq_len, pad_id, pack: collate_stack, item="samples", unit="docs", language_modeling=True,
             cut_at_seq_len=False),
    DataKind("sft", "SFT conversations", "SFT", SFT_SUFFIXES, write_sft, _sequences(SFTDataset), _lm_collate,
             item="samples", unit="convs", language_modeling=True, mapped=True, reader_version=SFT_READER_VERSION),
    DataKind("pref", "preference pairs", "preference", PREF_SUFFIXES, write_pref, _sequences(PrefDataset),
             _pairs_collate, item="pairs", unit="pairs", language_modeling=False, mapped=True, progress_by_bytes=False),
    DataKind("prompt", "RL prompts", "prompt", PROMPT_SUFFIXES, write_prompts, _sequences(PromptDataset),
             lambda seq_len, pad_id, pack: partial(collate_prompts, pad_id=pad_id), item="prompts", unit="prompts",
             language_modeling=False, mapped=True, progress_by_bytes=False, also_reads=("sft",)),
)}


def data_kind(name: str) -> DataKind:
    """The kind of that name; an unknown name is an error listing the kinds."""
    if name not in KINDS:
        raise ZerotrainError(f"unknown data kind '{name}': use {', '.join(KINDS)}")
    return KINDS[name]


def check_inputs(kind: str, paths: list[str]) -> None:
    """Every raw input of a data kind exists, is not empty and has a suffix that kind reads."""
    data_kind(kind).check_inputs(paths)


def collate_for(kinds: list[str], seq_len: int, pad_id: int, pack: bool) -> Collate:
    """The collate of a run's sources: their kind's own, or for a mixture of language-modeling
    kinds (pretraining windows with SFT conversations) the one that pads or packs sequences."""
    if len(set(kinds)) == 1:
        return data_kind(kinds[0]).collate(seq_len, pad_id, pack)
    odd = sorted({k for k in kinds if not data_kind(k).language_modeling})
    if odd:
        raise ZerotrainError(f"{' and '.join(data_kind(k).title for k in odd)} cannot be mixed with other data: "
                             "train on them alone")
    return _lm_collate(seq_len, pad_id, pack)


def detect_kind(paths: list[str], columns: str = "") -> str:
    """The kind of raw files, from their first record: pref for .json/.jsonl/.parquet whose first
    record is a preference pair; prompt for one with a "prompt" and no reply (TRL's RL prompts); sft for other .json files and .jsonl/.parquet whose first record
    is a conversation; else pretrain. A --columns mapping says what its records are (pairs or
    conversations) instead."""
    mapping = parse_columns(columns)
    kinds = set()
    for path in map(Path, paths):
        if mapping and path.suffix in (".json", ".jsonl", ".parquet"):
            kinds.add(mapping.kind)
        elif path.suffix in (".json", ".jsonl", ".parquet") and path.is_file() and path.stat().st_size:
            first = next(json_records(path, True, ReadStats()), (None, None))[1]
            # Pairs first: a ShareGPT pair also has "conversations".
            if detect_pref_format(first):
                kinds.add("pref")
            elif detect_prompt_format(first) == "trl" and not {"completion", "response", "output"} & first.keys():
                kinds.add("prompt")
            else:
                kinds.add("sft" if path.suffix == ".json" or detect_sft_format(first) else "pretrain")
        else:
            # .txt, or a missing/unsupported file that prepare() will name
            kinds.add("sft" if path.suffix == ".json" else "pretrain")
    if len(kinds) > 1:
        raise ZerotrainError(f"{', '.join(paths)} mix " + " and ".join(KINDS[k].title for k in KINDS if k in kinds)
                             + "; evaluate them separately or pass --kind")
    return kinds.pop()
