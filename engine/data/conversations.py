"""The sft data kind: conversations in the common shapes (ShareGPT, OpenAI messages, MiniMind,
Alpaca and Dolly with history, Alpaca seed tasks) or through a --columns mapping, rendered with
the chat template and labelled on the assistant's replies (engine.data.chat) while they are
prepared, so the collators only pad."""

from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from common.errors import ZerotrainError
from engine.data.chat import encode_chats, message, system_message
from engine.data.columns import Columns, mapped_field, mapped_turn
from engine.data.files import ReadStats, read_shaped
from engine.data.format import IGNORE_INDEX, open_tokens, read_meta
from engine.data.writer import chunks, ordered_map, write_examples

SFT_SUFFIXES = (".json", ".jsonl", ".parquet")


# Part of an SFT preparation's key: raised when the same raw files come to read as other
# conversations, so that cached preparations are made again (2: Alpaca's `history` is read;
# 3: assistant turns' `reasoning_content` is read).
SFT_READER_VERSION = 3


def detect_sft_format(record: Any) -> str | None:
    if not isinstance(record, dict):
        return None
    turns = record.get("conversations")
    if isinstance(turns, list) and turns and isinstance(turns[0], dict):
        if "from" in turns[0] and "value" in turns[0]:
            return "sharegpt"
        if "role" in turns[0] and "content" in turns[0]:
            return "minimind"
    turns = record.get("messages")
    if isinstance(turns, list) and turns and isinstance(turns[0], dict) and "role" in turns[0]:
        return "openai"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "instruction" in record and "response" in record:
        return "dolly"
    if "instruction" in record and isinstance(record.get("instances"), list):
        return "alpaca-seed"
    return None


SFT_SHAPES = ("ShareGPT {conversations: [{from, value}], system?}, OpenAI {messages: [{role, content, "
              "reasoning_content?}]}, MiniMind {conversations: [{role, content}]}, Alpaca {instruction, input?, "
              "output, system?, history?: [[user, assistant]...]}, Dolly {instruction, context?, response}, "
              "Alpaca seed {instruction, instances: [{input, output}]}; anything else: --columns")


def _turns(record: dict, key: str, role_key: str, text_key: str, where: str) -> list[dict[str, str]]:
    return system_message(record) + [message(turn, role_key, text_key, where, f"{key}[{i}]", "reasoning_content")
                                     for i, turn in enumerate(record.get(key) or [])]


ALPACA_FIELDS = ("instruction", "input", "output", "history")
DOLLY_FIELDS = ("instruction", "context", "response", "history")


def _alpaca(instruction: Any, inp: Any, output: Any, system: Any, history: Any, where: str,
            names: tuple[str, ...] = ALPACA_FIELDS) -> list[dict[str, str]]:
    """A single-turn record as messages: system, the `history` turns ([[user, assistant]...], as
    Chinese-LLaMA-Alpaca and BELLE have them), then the instruction (with its input, when there
    is one, after a blank line) and the output. `names` are the record's field names, for errors."""
    for value, name in ((instruction, names[0]), (inp or "", names[1]), (output, names[2])):
        if not isinstance(value, str):
            raise ZerotrainError(f"{where}: '{name}' must be a string, not {type(value).__name__}")
    if not isinstance(history or [], list):
        raise ZerotrainError(f"{where}: '{names[3]}' must be a list of [user, assistant] pairs, "
                             f"not {type(history).__name__}")
    messages = [{"role": "system", "content": system}] if isinstance(system, str) and system.strip() else []
    for i, pair in enumerate(history or []):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise ZerotrainError(f"{where}: '{names[3]}[{i}]' must be a [user, assistant] pair of strings")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    prompt = instruction if not inp else f"{instruction}\n\n{inp}"
    return messages + [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def to_messages(record: Any, fmt: str, where: str) -> list[list[dict[str, str]]]:
    """The conversations (lists of {role, content}) in one record of a known format."""
    if detect_sft_format(record) != fmt:
        raise ZerotrainError(f"{where}: record does not match this file's format ({fmt}, detected from its "
                             f"first record); every record of a file must have one shape: {SFT_SHAPES}")
    if fmt == "sharegpt":
        return [_turns(record, "conversations", "from", "value", where)]
    if fmt == "minimind":
        return [_turns(record, "conversations", "role", "content", where)]
    if fmt == "openai":
        return [_turns(record, "messages", "role", "content", where)]
    if fmt == "alpaca":
        return [_alpaca(record["instruction"], record.get("input"), record["output"], record.get("system"),
                        record.get("history"), where)]
    if fmt == "dolly":
        return [_alpaca(record["instruction"], record.get("context"), record["response"], record.get("system"),
                        None, where, DOLLY_FIELDS)]
    return [_alpaca(record["instruction"], inst.get("input"), inst.get("output"), None, None,
                    f"{where}.instances[{i}]") for i, inst in enumerate(record["instances"]) if isinstance(inst, dict)]


def mapped_messages(record: Any, columns: Columns, where: str) -> list[dict[str, str]]:
    """The conversation in a record read through a single-turn or message-list mapping."""
    fields = columns.fields
    if columns.shape == "message-list":
        turns = mapped_field(record, fields["messages"], where)
        if not isinstance(turns, list):
            raise ZerotrainError(f"{where}: '{fields['messages']}' must be a list of turns, "
                                 f"not {type(turns).__name__}")
        return [mapped_turn(turn, columns, where, f"{fields['messages']}[{i}]") for i, turn in enumerate(turns)]
    get = {key: mapped_field(record, name, where) for key, name in fields.items()}
    return _alpaca(get["prompt"], get.get("input"), get["response"], get.get("system"), get.get("history"), where,
                   tuple(fields.get(k, k) for k in ("prompt", "input", "response", "history")))


def read_conversations(path: str | Path, skip_bad_lines: bool = False, stats: ReadStats | None = None,
                       columns: Columns | None = None, on_bytes: Callable[[int], None] | None = None
                       ) -> Iterator[tuple[str, list[dict[str, str]]]]:
    """(location, messages) for each conversation of an SFT file; the format is detected per file,
    or read through a --columns mapping. `on_bytes` counts the bytes read (json_records)."""
    stats = stats if stats is not None else ReadStats()
    detect, parse = detect_sft_format, to_messages
    if columns:
        detect = lambda record: columns.shape
        parse = lambda record, fmt, where: [mapped_messages(record, columns, where)]
    for where, conversations in read_shaped(path, SFT_SUFFIXES, "SFT", detect, parse, SFT_SHAPES,
                                            skip_bad_lines, stats, on_bytes):
        for messages in conversations:
            yield where, messages


# Conversations per unit of work: large enough that batching the template and the tokenizer
# pays, small enough that memory stays flat (only a few chunks are in flight at a time).
SFT_CHUNK = 512


def write_sft(inputs: list[str], tokenizer, out: Path, *, seq_len: int, val_fraction: float, skip_bad_lines: bool,
              stats: ReadStats, progress, columns: Columns | None, num_proc: int = 1) -> dict[str, dict[str, int]]:
    """engine.data.prepare's writer for kind "sft": one example a conversation, encoded in chunks
    (over `num_proc` worker processes), conversations with no trained token within seq_len dropped
    and counted."""
    read = 0
    read_at: deque[int] = deque()  # bytes read when each chunk in flight was cut

    def count(nbytes: int) -> None:
        nonlocal read
        read += nbytes

    def tasks() -> Iterator[dict[str, Any]]:
        conversations = ((where, messages) for path in inputs
                         for where, messages in read_conversations(path, skip_bad_lines, stats, columns, count))
        for chunk in chunks(conversations, SFT_CHUNK):
            read_at.append(read)
            yield {"conversations": chunk, "seq_len": seq_len}

    def examples() -> Iterator[list[tuple[np.ndarray, np.ndarray]]]:
        told = 0
        for encoded in ordered_map(encode_chats, tasks(), num_proc, tokenizer):
            tokens = 0
            for ids, labels, truncated in encoded:
                stats.truncated += truncated
                if not (labels != IGNORE_INDEX).any():
                    stats.dropped_no_label += 1
                    continue
                tokens += len(ids)
                yield [(ids, labels)]
            # Bytes as of the chunk's cut, not as of now: with workers, reading runs ahead.
            done = read_at.popleft()
            progress(len(encoded), done - told, tokens)
            told = done
        progress(0, read - told)  # the reader's last bytes, after its last conversation

    splits, written = write_examples(examples(), tokenizer, out, val_fraction)
    if not sum(written.values()):
        raise ZerotrainError(f"no usable conversations in {', '.join(inputs)} "
                             f"({stats.dropped_no_label} had no assistant token within seq_len {seq_len})")
    return splits


class SFTDataset(torch.utils.data.Dataset):
    """Prepared conversations: input_ids and labels (-100 where not trained on)."""

    kind, kind_name = "sft", "SFT"

    def __init__(self, directory: str | Path, split: str, seq_len: int):
        self.directory = Path(directory)
        self.meta = read_meta(directory)
        if self.meta["kind"] != self.kind:
            raise ZerotrainError(f"{directory} holds {self.meta['kind']} data, not {self.kind_name} data")
        if self.meta["seq_len"] != seq_len:
            raise ZerotrainError(f"{directory} was prepared with seq_len {self.meta['seq_len']}, the run uses "
                                 f"{seq_len}: prepare again with --seq-len {seq_len}")
        self.tokens = open_tokens(self.directory, split, self.meta)
        self.offsets = np.load(self.directory / f"{split}.idx.npy")
        self.mask = np.memmap(self.directory / f"{split}.mask.bin", dtype=np.uint8, mode="r") if len(self.tokens) else None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        a, b = self.offsets[i], self.offsets[i + 1]
        ids = torch.from_numpy(self.tokens[a:b].astype(np.int64))
        keep = torch.from_numpy(self.mask[a:b].astype(np.bool_))
        return {"input_ids": ids, "labels": torch.where(keep, ids, IGNORE_INDEX)}
