"""Data: raw files -> checked records -> token files on disk -> sharded, resumable batches.

Pretraining text is tokenized once (the fast tokenizer's encode_batch over chunks of a few MB of
text, so memory does not grow with the corpus), an EOS after every document, and stored as one
flat memmap token file per split. SFT conversations
are rendered with the tokenizer's chat template; all loss masking happens here, while the data
is prepared (labels are -100 everywhere but the assistant's tokens); the collators only pad.
Preference pairs (kind "pref", engine/pref_data.py) use the same rendering and labelling rule.

A prepared directory holds::

    meta.json                 kind, dtype, vocab size, tokenizer fingerprint, source hashes, counts
    train.bin / val.bin       token ids (uint16 when the vocab fits, else uint32)
    train.mask.bin, ...       SFT and pref: 1 where the token is trained on (uint8)
    train.idx.npy, ...        SFT and pref: example start offsets into the token file (n + 1)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections import deque
from dataclasses import dataclass, field
from itertools import chain, islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from common.errors import ZerotrainError
from common.publish import publishing

FORMAT_VERSION = 1
# Part of an SFT preparation's key: raised when the same raw files come to read as other
# conversations, so that cached preparations are made again (2: Alpaca's `history` is read).
SFT_READER_VERSION = 2
IGNORE_INDEX = -100
DATA_KINDS = ("pretrain", "sft", "pref")
PRETRAIN_SUFFIXES = (".txt", ".jsonl", ".parquet")
SFT_SUFFIXES = (".json", ".jsonl", ".parquet")
ROLE_ALIASES = {
    "system": "system",
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bot": "assistant",
}


@dataclass
class ReadStats:
    """Counts of what a read skipped, reported in meta.json and to the user."""

    bad_lines: int = 0
    dropped_no_label: int = 0
    truncated: int = 0
    dropped_identical: int = 0  # preference pairs whose chosen and rejected responses are the same

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


# --------------------------------------------------------------------------- reading raw files

def _lines(path: Path, skip_bad: bool, stats: ReadStats,
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


def _json_records(path: Path, skip_bad: bool, stats: ReadStats,
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
    for lineno, line in _lines(path, skip_bad, stats, on_bytes):
        try:
            yield f"{path}:{lineno}", json.loads(line)
        except json.JSONDecodeError as e:
            if skip_bad:
                stats.bad_lines += 1
                continue
            raise ZerotrainError(f"{path}:{lineno}: invalid JSON ({e.msg}, column {e.colno}); "
                                 "fix the line or pass --skip-bad-lines to skip and count such lines") from None


def _check_input(path: str | Path, suffixes: tuple[str, ...], kind: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise ZerotrainError(f"{kind} input {path} does not exist (or is not a file)")
    if path.suffix not in suffixes:
        raise ZerotrainError(f"{path}: unsupported {kind} input type '{path.suffix}'; use one of "
                             + ", ".join(suffixes))
    if path.stat().st_size == 0:
        raise ZerotrainError(f"{path}: the file is empty")
    return path


def check_inputs(kind: str, paths: list[str]) -> None:
    """Every raw input of a data kind exists, is not empty and has a suffix that kind reads."""
    from engine.pref_data import PREF_SUFFIXES  # pref_data imports this module

    suffixes = {"pretrain": PRETRAIN_SUFFIXES, "sft": SFT_SUFFIXES, "pref": PREF_SUFFIXES}[kind]
    name = {"pretrain": "pretraining", "sft": "SFT", "pref": "preference"}[kind]
    for p in paths:
        _check_input(p, suffixes, name)


def read_documents(path: str | Path, skip_bad_lines: bool = False, stats: ReadStats | None = None,
                   on_bytes: Callable[[int], None] | None = None) -> Iterator[str]:
    """Pretraining documents of one file.

    `.txt`: paragraphs (blank-line separated); `.jsonl`: `{"text": ...}` a line (MiniMind's
    format); `.parquet`: the `text` column. `on_bytes` counts the bytes read (_json_records).
    """
    path = _check_input(path, PRETRAIN_SUFFIXES, "pretraining")
    stats = stats if stats is not None else ReadStats()
    if path.suffix == ".txt":
        paragraph: list[str] = []
        previous = 0
        for lineno, line in _lines(path, skip_bad_lines, stats, on_bytes):
            if paragraph and lineno > previous + 1:
                yield "".join(paragraph).rstrip("\n")
                paragraph = []
            paragraph.append(line)
            previous = lineno
        if paragraph:
            yield "".join(paragraph).rstrip("\n")
        return
    for where, record in _json_records(path, skip_bad_lines, stats, on_bytes):
        text = record.get("text") if isinstance(record, dict) else None
        if isinstance(text, str) and text.strip():
            yield text
            continue
        if skip_bad_lines:
            stats.bad_lines += 1
            continue
        if not isinstance(record, dict) or "text" not in record:
            found = sorted(record) if isinstance(record, dict) else type(record).__name__
            problem = f"no \"text\" field (found {found})"
        elif not isinstance(text, str):
            problem = f"\"text\" is {type(text).__name__}, not a string"
        else:
            problem = "empty document"
        raise ZerotrainError(f"{where}: {problem}; pretraining records need a non-empty \"text\" "
                             "string (or pass --skip-bad-lines to skip and count them)")


def _detect_sft_format(record: Any) -> str | None:
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


SFT_SHAPES = ("ShareGPT {conversations: [{from, value}], system?}, OpenAI {messages: [{role, content}]}, "
              "MiniMind {conversations: [{role, content}]}, Alpaca {instruction, input?, output, system?, "
              "history?: [[user, assistant]...]}, Dolly {instruction, context?, response}, "
              "Alpaca seed {instruction, instances: [{input, output}]}; anything else: --columns")


def detect_kind(paths: list[str], columns: str = "") -> str:
    """pref for .json/.jsonl/.parquet whose first record is a preference pair; sft for other .json
    files and .jsonl/.parquet whose first record is a conversation; else pretrain. A --columns
    mapping says what its records are (pairs or conversations) instead."""
    from engine.pref_data import detect_pref_format

    mapping = parse_columns(columns)
    kinds = set()
    for path in map(Path, paths):
        if mapping and path.suffix in (".json", ".jsonl", ".parquet"):
            kinds.add(mapping.kind)
        elif path.suffix in (".json", ".jsonl", ".parquet") and path.is_file() and path.stat().st_size:
            first = next(_json_records(path, True, ReadStats()), (None, None))[1]
            # Pairs first: a ShareGPT pair also has "conversations".
            if detect_pref_format(first):
                kinds.add("pref")
            else:
                kinds.add("sft" if path.suffix == ".json" or _detect_sft_format(first) else "pretrain")
        else:
            # .txt, or a missing/unsupported file that prepare() will name
            kinds.add("sft" if path.suffix == ".json" else "pretrain")
    if len(kinds) > 1:
        names = {"pretrain": "pretraining text", "sft": "SFT conversations", "pref": "preference pairs"}
        raise ZerotrainError(f"{', '.join(paths)} mix " + " and ".join(names[k] for k in names if k in kinds)
                             + "; evaluate them separately or pass --kind")
    return kinds.pop()


def message(turn: Any, role_key: str, text_key: str, where: str, name: str) -> dict[str, str]:
    """One {role, content} message from a raw turn (roles through ROLE_ALIASES); `name` says
    where the turn is in its record, for errors."""
    if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
        raise ZerotrainError(f"{where}: {name} needs '{role_key}' and '{text_key}'")
    role = ROLE_ALIASES.get(str(turn[role_key]).lower())
    if role is None:
        raise ZerotrainError(f"{where}: {name} has unknown role {turn[role_key]!r}; "
                             f"expected one of {sorted(ROLE_ALIASES)}")
    if not isinstance(turn[text_key], str):
        raise ZerotrainError(f"{where}: {name}.{text_key} must be a string")
    return {"role": role, "content": turn[text_key]}


def system_message(record: dict) -> list[dict[str, str]]:
    """The record's optional "system" string as a message list (empty when absent or blank)."""
    system = record.get("system")
    return [{"role": "system", "content": system}] if isinstance(system, str) and system.strip() else []


def _turns(record: dict, key: str, role_key: str, text_key: str, where: str) -> list[dict[str, str]]:
    return system_message(record) + [message(turn, role_key, text_key, where, f"{key}[{i}]")
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
    if _detect_sft_format(record) != fmt:
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


# --------------------------------------------------------------------------- --columns mappings

# Each shape's (required, optional) keys. Keys name record fields, except user/assistant/system
# in a message-list mapping and user/assistant in a pair mapping: those are role values.
COLUMN_SHAPES = {
    "single-turn": (("prompt", "response"), ("input", "system", "history")),
    "message-list": (("messages",), ("role", "content", "user", "assistant", "system")),
    "pair": (("chosen", "rejected"), ("prompt", "system", "role", "content", "user", "assistant")),
}
_ROLE_VALUE_KEYS = {"single-turn": (), "message-list": ("user", "assistant", "system"), "pair": ("user", "assistant")}
COLUMNS_HELP = ("single-turn SFT: prompt=FIELD,response=FIELD[,input=FIELD,system=FIELD,history=FIELD]; "
                "message lists: messages=FIELD[,role=FIELD,content=FIELD,user=VALUE,assistant=VALUE,system=VALUE]; "
                "preference pairs: chosen=FIELD,rejected=FIELD[,prompt=FIELD,system=FIELD,role=FIELD,content=FIELD,"
                "user=VALUE,assistant=VALUE]")


@dataclass(frozen=True)
class Columns:
    """A checked --columns mapping: which record fields (and, in message lists, which role values)
    hold the parts of a conversation or a preference pair (LLaMA-Factory's dataset_info.json idea)."""

    shape: str  # a key of COLUMN_SHAPES
    fields: dict[str, str]

    @property
    def kind(self) -> str:
        """The data kind the mapping reads: pref for pairs, sft for conversations."""
        return "pref" if self.shape == "pair" else "sft"

    @property
    def roles(self) -> dict[str, str]:
        """Mapped role values (lower case) -> user / assistant / system."""
        return {self.fields[k].lower(): k for k in _ROLE_VALUE_KEYS[self.shape] if k in self.fields}

    def spec(self) -> str:
        """The mapping as sorted KEY=VALUE text: equal mappings give equal text (the cache key)."""
        return ",".join(f"{k}={v}" for k, v in sorted(self.fields.items()))


def parse_columns(spec: str) -> Columns | None:
    """The checked mapping of a --columns KEY=VALUE,... string (None when empty); its shape is
    told by its keys (chosen/rejected: pairs; messages: message lists; else single-turn)."""
    if not spec.strip():
        return None
    known = sorted({k for required, optional in COLUMN_SHAPES.values() for k in required + optional})
    fields: dict[str, str] = {}
    for entry in spec.split(","):
        key, equals, value = (part.strip() for part in entry.partition("="))
        if not equals or not key or not value:
            raise ZerotrainError(f"--columns {spec!r}: {entry.strip()!r} is not KEY=VALUE; {COLUMNS_HELP}")
        if key not in known:
            raise ZerotrainError(f"--columns {spec!r}: unknown key '{key}' (valid keys: {', '.join(known)}); "
                                 f"{COLUMNS_HELP}")
        if key in fields:
            raise ZerotrainError(f"--columns {spec!r}: '{key}' is given twice; give each key once")
        fields[key] = value
    shape = ("pair" if {"chosen", "rejected"} & fields.keys() else
             "message-list" if "messages" in fields else "single-turn")
    required, optional = COLUMN_SHAPES[shape]
    stray = [k for k in fields if k not in required + optional]
    if stray:
        raise ZerotrainError(f"--columns {spec!r}: '{stray[0]}' is not a key of a {shape} mapping (its keys: "
                             f"{', '.join(required + optional)}); {COLUMNS_HELP}")
    missing = [k for k in required if k not in fields]
    if missing:
        raise ZerotrainError(f"--columns {spec!r}: missing '{missing[0]}': a {shape} mapping needs "
                             f"{' and '.join(required)}; {COLUMNS_HELP}")
    return Columns(shape, fields)


def columns_for(kind: str, spec: str) -> Columns | None:
    """The checked --columns mapping for raw data of `kind` (None without one)."""
    mapping = parse_columns(spec)
    if mapping is None or mapping.kind == kind:
        return mapping
    if kind == "pretrain":
        raise ZerotrainError(f"--columns {spec!r} maps SFT conversations or preference pairs; pretraining "
                             "records are read from their \"text\" field: drop --columns for pretraining data")
    raise ZerotrainError(f"--columns {spec!r} is a {mapping.shape} mapping, for {mapping.kind} data, but the data "
                         f"is {kind}; {COLUMNS_HELP}")


def mapped_field(record: Any, name: str, where: str, what: str = "the record") -> Any:
    """record[name] for a field that --columns names; a record without it is an error naming the
    fields it has."""
    if not isinstance(record, dict):
        raise ZerotrainError(f"{where}: {what} must be a JSON object, not {type(record).__name__}")
    if name not in record:
        raise ZerotrainError(f"{where}: {what} has no field '{name}' (named by --columns); it has "
                             f"{sorted(record)}: fix the record or the mapping")
    return record[name]


def mapped_turn(turn: Any, columns: Columns, where: str, name: str) -> dict[str, str]:
    """One {role, content} message from a turn read through a mapping's role/content names and
    role values (other role values go through ROLE_ALIASES)."""
    role = mapped_field(turn, columns.fields.get("role", "role"), where, name)
    content = mapped_field(turn, columns.fields.get("content", "content"), where, name)
    role = columns.roles.get(str(role).lower(), role)
    return message({"role": role, "content": content}, "role", "content", where, name)


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


def read_shaped(path: str | Path, suffixes: tuple[str, ...], what: str, detect: Callable[[Any], str | None],
                parse: Callable[[Any, str, str], Any], shapes: str, skip_bad_lines: bool,
                stats: ReadStats, on_bytes: Callable[[int], None] | None = None) -> Iterator[tuple[str, Any]]:
    """(location, parse(record, fmt, location)) for each record of a JSON-records file whose shape
    `fmt` is detected from its first record; a bad record is an error, or skipped and counted.
    `on_bytes` counts the bytes read (_json_records)."""
    path = _check_input(path, suffixes, what)
    fmt = None
    for where, record in _json_records(path, skip_bad_lines, stats, on_bytes):
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


def read_conversations(path: str | Path, skip_bad_lines: bool = False, stats: ReadStats | None = None,
                       columns: Columns | None = None, on_bytes: Callable[[int], None] | None = None
                       ) -> Iterator[tuple[str, list[dict[str, str]]]]:
    """(location, messages) for each conversation of an SFT file; the format is detected per file,
    or read through a --columns mapping. `on_bytes` counts the bytes read (_json_records)."""
    stats = stats if stats is not None else ReadStats()
    detect, parse = _detect_sft_format, to_messages
    if columns:
        detect = lambda record: columns.shape
        parse = lambda record, fmt, where: [mapped_messages(record, columns, where)]
    for where, conversations in read_shaped(path, SFT_SUFFIXES, "SFT", detect, parse, SFT_SHAPES,
                                            skip_bad_lines, stats, on_bytes):
        for messages in conversations:
            yield where, messages


# --------------------------------------------------------------------------- encoding

def assistant_spans(messages: list[dict[str, str]], tokenizer,
                    where: str = "conversation") -> tuple[str, list[tuple[int, int]]]:
    """The conversation rendered with the chat template, and the character spans of its
    assistant replies: the reply and its end-of-turn token, not the whitespace after.

    Spans are found by rendering each prefix of the conversation (with the generation prompt
    before an assistant turn), so any prefix-stable template works. This is the one rule for
    which tokens are trained on, for SFT and for preference pairs.
    """
    return assistant_spans_batch([messages], tokenizer, [where])[0]


def _chatml_spans(messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]] | None:
    """What rendering every prefix with model.tokenizer.CHAT_TEMPLATE would give assistant_spans,
    computed from its one rule (each message is '<|im_start|>' role '\\n' content '<|im_end|>\\n',
    the generation prompt '<|im_start|>assistant\\n'); None for a message that is not plain text."""
    pieces, spans, at = [], [], 0
    for i, turn in enumerate(messages):
        role, content = turn.get("role"), turn.get("content")
        if type(role) is not str or type(content) is not str:
            return None
        head = "<|im_start|>" + role + "\n"
        piece = head + content + "<|im_end|>\n"
        if role == "assistant":
            # The prefix with the generation prompt ends after the header (nothing before a first
            # turn), and the reply's prefix ends with '<|im_end|>\n', whose newline is stripped.
            spans.append((at + len(head) if i else 0, at + len(piece) - 1))
        pieces.append(piece)
        at += len(piece)
    return "".join(pieces), spans


def assistant_spans_batch(conversations: list[list[dict[str, str]]], tokenizer,
                          wheres: list[str]) -> list[tuple[str, list[tuple[int, int]]]]:
    """assistant_spans of many conversations. The renders are asked of the template in two
    batched calls (without and with the generation prompt), which costs far less than one call
    each; the prefix through a final assistant turn is the whole conversation, rendered once.

    With zerotrain's own ChatML template the prefixes' lengths follow from its rule, so only the
    whole conversations are rendered (one call), and a conversation whose render differs from
    what the rule gives takes the general path: rendering the prefixes was most of the time of
    SFT preparation (a conversation with k replies has 2k of them)."""
    from model.tokenizer import CHAT_TEMPLATE

    if not conversations or tokenizer.chat_template != CHAT_TEMPLATE:
        return _rendered_spans(conversations, tokenizer, wheres)
    texts = tokenizer.apply_chat_template(conversations, tokenize=False)
    results = [_chatml_spans(messages) for messages in conversations]
    odd = [i for i, (text, derived) in enumerate(zip(texts, results)) if derived is None or derived[0] != text]
    for i, result in zip(odd, _rendered_spans([conversations[i] for i in odd], tokenizer, [wheres[i] for i in odd])):
        results[i] = result
    return results


def _rendered_spans(conversations: list[list[dict[str, str]]], tokenizer,
                    wheres: list[str]) -> list[tuple[str, list[tuple[int, int]]]]:
    """assistant_spans_batch for any prefix-stable template: every prefix rendered."""
    plain: list[list[dict[str, str]]] = []  # rendered without the generation prompt
    prompted: list[list[dict[str, str]]] = []  # rendered with it
    plans = []
    for messages in conversations:
        full = len(plain)
        plain.append(messages)
        turns = []
        for i, turn in enumerate(messages):
            if turn["role"] != "assistant":
                continue
            start = None
            if i:
                start = len(prompted)
                prompted.append(messages[:i])
            end = full
            if i + 1 < len(messages):
                end = len(plain)
                plain.append(messages[: i + 1])
            turns.append((start, end))
        plans.append((full, turns))
    render = lambda batch, gen: (tokenizer.apply_chat_template(batch, tokenize=False, add_generation_prompt=gen)
                                 if batch else [])
    plain_texts, prompted_texts = render(plain, False), render(prompted, True)
    results = []
    for (full, turns), where in zip(plans, wheres):
        text = plain_texts[full]
        spans = []
        for start_at, end_at in turns:
            start = len(prompted_texts[start_at]) if start_at is not None else 0
            end_text = plain_texts[end_at]
            if not text.startswith(end_text) or start > len(end_text):
                raise ZerotrainError(f"{where}: the chat template is not prefix-stable, so assistant turns "
                                     "cannot be located; use a ChatML-style template")
            body = end_text[start:]
            spans.append((start, start + len(body.rstrip())))
        results.append((text, spans))
    return results


def _inside_spans(offsets: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """True for each token (character offsets a, b) that is not empty and lies inside one of the
    `spans`: some span has s <= a and b <= e, i.e. the largest end among spans starting at or
    before a reaches b (a search over the spans sorted by start, exact for any spans)."""
    if not spans or not len(offsets):
        return np.zeros(len(offsets), dtype=bool)
    ordered = np.asarray(sorted(spans), dtype=np.int64).reshape(-1, 2)
    reach = np.maximum.accumulate(ordered[:, 1])
    a, b = offsets[:, 0], offsets[:, 1]
    k = np.searchsorted(ordered[:, 0], a, side="right") - 1
    return (b > a) & (k >= 0) & (b <= reach[np.maximum(k, 0)])


def label_tokens_batch(texts: list[str], spans: list[list[tuple[int, int]]],
                       tokenizer) -> list[tuple[np.ndarray, np.ndarray]]:
    """label_tokens of many texts in one tokenizer call, as (input_ids, labels) int64 arrays."""
    if not texts:
        return []
    backend = _fast_backend(tokenizer)
    if (getattr(tokenizer, "split_special_tokens", False) or backend.encode_special_tokens or backend.truncation
            or backend.padding):
        # Settings that tokenizer() would override on the backend: let it.
        encoding = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True,
                             return_attention_mask=False, return_token_type_ids=False)
        encoded = zip(encoding["input_ids"], encoding["offset_mapping"])
    else:
        # The Rust tokenizer's own encodings, as pretraining reads them: tokenizer() would copy
        # each into Python lists first, about a sixth of the time of labelling.
        encoded = ((e.ids, e.offsets) for e in backend.encode_batch(texts, add_special_tokens=False))
    out = []
    for (ids, offsets), text_spans in zip(encoded, spans):
        ids = np.asarray(ids, dtype=np.int64)
        offsets = np.fromiter(chain.from_iterable(offsets), dtype=np.int64, count=2 * len(ids)).reshape(-1, 2)
        out.append((ids, np.where(_inside_spans(offsets, text_spans), ids, IGNORE_INDEX)))
    return out


def label_tokens(text: str, spans: list[tuple[int, int]], tokenizer) -> tuple[list[int], list[int]]:
    """Tokenize `text` (no special tokens added): (input_ids, labels), labels being the ids of the
    tokens that lie inside one of the character `spans` and -100 elsewhere."""
    [(ids, labels)] = label_tokens_batch([text], [spans], tokenizer)
    return ids.tolist(), labels.tolist()


def encode_chats(conversations: list[tuple[str, list[dict[str, str]]]], tokenizer,
                 seq_len: int) -> list[tuple[np.ndarray, np.ndarray, bool]]:
    """encode_chat of many (location, messages) conversations at once, as arrays: the work of
    one chunk of SFT preparation (a batch each for the template and the tokenizer)."""
    rendered = assistant_spans_batch([m for _, m in conversations], tokenizer, [w for w, _ in conversations])
    labelled = label_tokens_batch([text for text, _ in rendered], [spans for _, spans in rendered], tokenizer)
    return [(ids[:seq_len], labels[:seq_len], len(ids) > seq_len) for ids, labels in labelled]


def encode_chat(messages: list[dict[str, str]], tokenizer, seq_len: int,
                where: str = "conversation") -> tuple[list[int], list[int], bool]:
    """Render with the chat template; return (input_ids, labels, truncated).

    Labels are the token ids inside assistant replies (their end-of-turn token included) and
    -100 elsewhere (assistant_spans); the conversation is cut to `seq_len` tokens.
    """
    [(ids, labels, truncated)] = encode_chats([(where, messages)], tokenizer, seq_len)
    return ids.tolist(), labels.tolist(), truncated


def _fast_backend(tokenizer):
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ZerotrainError("a fast (Rust `tokenizers`) tokenizer is needed; load it with load_tokenizer()")
    return backend


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


# --------------------------------------------------------------------------- preparing

def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def preparation_key(kind: str, inputs: list[str], tokenizer, *, seq_len: int, val_fraction: float,
                    skip_bad_lines: bool, columns: Columns | None = None) -> tuple[str, list[dict[str, Any]]]:
    """A hash of everything a prepared directory depends on, and the source records it came from."""
    from model.tokenizer import tokenizer_fingerprint

    sources = [{"path": str(Path(p).resolve()), "sha256": file_sha256(p), "bytes": Path(p).stat().st_size}
               for p in inputs]
    parts = {"version": FORMAT_VERSION, "kind": kind, "tokenizer": tokenizer_fingerprint(tokenizer),
             "sources": [s["sha256"] for s in sources], "val_fraction": val_fraction,
             "skip_bad_lines": skip_bad_lines, "seq_len": seq_len if kind != "pretrain" else None}
    # Parts added only where they apply, so that other preparations keep their keys.
    if kind == "sft":
        parts["sft_reader"] = SFT_READER_VERSION
    if columns:
        parts["columns"] = columns.spec()
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16], sources


class _SplitWriter:
    """Appends tokens (and SFT/pref masks and offsets) of one split to files in a directory.
    The offsets go to a scratch file too, not a list, so memory stays flat however many examples
    there are; close() turns them into the .npy file."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, sft: bool):
        self.dtype, self.sft, self.count, self.examples = dtype, sft, 0, 0
        self.tokens = open(directory / f"{split}.bin", "wb")
        self.mask = open(directory / f"{split}.mask.bin", "wb") if sft else None
        self.idx_path = directory / f"{split}.idx.npy"
        self.ends = open(directory / f"{split}.idx.tmp", "w+b") if sft else None

    def add_stream(self, ids: np.ndarray, documents: int) -> None:
        self.tokens.write(ids.astype(self.dtype, copy=False).tobytes())
        self.count += len(ids)
        self.examples += documents

    def add_example(self, ids: list[int], labels: list[int]) -> None:
        self.tokens.write(np.asarray(ids, dtype=self.dtype).tobytes())
        self.mask.write((np.asarray(labels) != IGNORE_INDEX).astype(np.uint8).tobytes())
        self.count += len(ids)
        self.examples += 1
        self.ends.write(np.int64(self.count).tobytes())

    def close(self) -> dict[str, int]:
        self.tokens.close()
        if self.sft:
            self.mask.close()
            # The .npy header (its shape is known only now), the leading 0, then the ends as written.
            with open(self.idx_path, "wb") as f:
                np.lib.format.write_array_header_1_0(
                    f, {"descr": np.lib.format.dtype_to_descr(np.dtype("<i8")), "fortran_order": False,
                        "shape": (self.examples + 1,)})
                f.write(np.zeros(1, dtype="<i8").tobytes())
                self.ends.seek(0)
                shutil.copyfileobj(self.ends, f)
            self.ends.close()
            os.remove(self.ends.name)
        return {"tokens": self.count, ("examples" if self.sft else "documents"): self.examples}


def _chunks(iterable: Iterable, size: int) -> Iterator[list]:
    it = iter(iterable)
    while chunk := list(islice(it, size)):
        yield chunk


def _text_chunks(texts: Iterable[str], max_texts: int, max_chars: int) -> Iterator[list[str]]:
    """Lists of at most `max_texts` texts and, unless one text alone is longer, `max_chars`
    characters: a bound on the memory of one chunk's encodings (the tokenizer holds about 100
    bytes a token) whether documents are tweets or books."""
    chunk: list[str] = []
    chars = 0
    for text in texts:
        if chunk and (len(chunk) == max_texts or chars + len(text) > max_chars):
            yield chunk
            chunk, chars = [], 0
        chunk.append(text)
        chars += len(text)
    if chunk:
        yield chunk


def _is_val(index: int, val_fraction: float) -> bool:
    """Every k-th document or conversation goes to validation (deterministic, spread over files)."""
    return val_fraction > 0 and index % max(2, round(1 / val_fraction)) == 1


# Pretraining documents per encode_batch call: at most this many, and at most this many characters
# (one document longer than that goes alone). A few MB of text keeps every core of the tokenizer
# busy, and holds the chunk's encodings (about 100 bytes a token) to a few hundred MB at most.
PRETRAIN_CHUNK_DOCS = 16384
PRETRAIN_CHUNK_CHARS = 1 << 21


def _write_pretrain(inputs: list[str], tokenizer, out: Path, val_fraction: float, skip_bad_lines: bool,
                    stats: ReadStats, progress) -> dict[str, dict[str, int]]:
    """Tokenize the documents of `inputs` chunk by chunk, straight to the split's token file:
    nothing is kept between chunks, so memory does not depend on the corpus size."""
    backend = _fast_backend(tokenizer)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ZerotrainError("the tokenizer has no eos token; pretraining puts one between documents")
    dtype = _token_dtype(len(tokenizer))
    writers = {s: _SplitWriter(out, s, dtype, sft=False) for s in ("train", "val")}
    read = told = 0

    def count(nbytes: int) -> None:
        nonlocal read
        read += nbytes

    documents = (doc for path in inputs for doc in read_documents(path, skip_bad_lines, stats, count))
    index = 0
    for chunk in _text_chunks(documents, PRETRAIN_CHUNK_DOCS, PRETRAIN_CHUNK_CHARS):
        split_docs: dict[str, list[str]] = {"train": [], "val": []}
        for doc in chunk:
            split_docs["val" if _is_val(index, val_fraction) else "train"].append(doc)
            index += 1
        tokens = 0
        for split, docs in split_docs.items():
            if docs:
                encoded = backend.encode_batch(docs, add_special_tokens=False)
                ids = np.concatenate([np.asarray(e.ids + [eos], dtype=dtype) for e in encoded])
                del encoded
                writers[split].add_stream(ids, len(docs))
                tokens += len(ids)
        progress(len(chunk), read - told, tokens)
        told = read
    if index == 0:
        raise ZerotrainError(f"no documents in {', '.join(inputs)}")
    progress(0, read - told)  # what the last chunk's reader read after its last document
    return {s: w.close() for s, w in writers.items()}


def write_examples(groups: Iterable[list[tuple[list[int], list[int]]]], tokenizer, out: Path,
                   val_fraction: float) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """Write groups of (input_ids, labels) examples (a conversation; a pair's chosen and rejected
    sequences) in order; every k-th group goes to validation. Returns the splits' counts and the
    number of groups in each split."""
    dtype = _token_dtype(len(tokenizer))
    writers = {s: _SplitWriter(out, s, dtype, sft=True) for s in ("train", "val")}
    groups_in = {"train": 0, "val": 0}
    for index, group in enumerate(groups):
        split = "val" if _is_val(index, val_fraction) else "train"
        for ids, labels in group:
            writers[split].add_example(ids, labels)
        groups_in[split] += 1
    return {s: w.close() for s, w in writers.items()}, groups_in


# Conversations per unit of work: large enough that batching the template and the tokenizer
# pays, small enough that memory stays flat (only a few chunks are in flight at a time).
SFT_CHUNK = 512
_worker_tokenizer = None  # set in each worker process of ordered_map


def _init_worker(tokenizer) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer
    # One process per core already: the tokenizer's own threads would only compete with them.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _call_in_worker(fn: Callable, task: dict[str, Any]):
    return fn(tokenizer=_worker_tokenizer, **task)


def resolve_num_proc(num_proc: int) -> int:
    """Processes to prepare data with: `num_proc`, or every core for 0."""
    if num_proc < 0:
        raise ZerotrainError(f"--num-proc must be 0 (all cores) or a positive count, got {num_proc}")
    return num_proc or os.cpu_count() or 1


def _worker_context():
    """A fork server that has imported this module once, not a plain fork: training prepares its
    data after the process group has started its communication threads, and a fork of a threaded
    process can inherit a lock one of them held (the workers fork from the clean server instead)."""
    import multiprocessing

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


def ordered_map(fn: Callable, tasks: Iterable[dict[str, Any]], num_proc: int, tokenizer) -> Iterator:
    """fn(tokenizer=tokenizer, **task) for each task, in order, over `num_proc` worker processes
    that are given the tokenizer once. At most 2 x num_proc tasks are in flight, so a long input
    is never all in memory; with one process, or a single task, the work is done here."""
    tasks = iter(tasks)
    first = list(islice(tasks, 2))
    if num_proc <= 1 or len(first) < 2:
        for task in chain(first, tasks):
            yield fn(tokenizer=tokenizer, **task)
        return
    with _worker_context().Pool(num_proc, _init_worker, (tokenizer,)) as pool:
        pending: deque = deque()
        for task in chain(first, tasks):
            pending.append(pool.apply_async(_call_in_worker, (fn, task)))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _write_sft(inputs: list[str], tokenizer, out: Path, seq_len: int, val_fraction: float,
               skip_bad_lines: bool, stats: ReadStats, progress, columns: Columns | None,
               num_proc: int = 1) -> dict[str, dict[str, int]]:
    read = 0
    read_at: deque[int] = deque()  # bytes read when each chunk in flight was cut

    def count(nbytes: int) -> None:
        nonlocal read
        read += nbytes

    def chunks() -> Iterator[dict[str, Any]]:
        conversations = ((where, messages) for path in inputs
                         for where, messages in read_conversations(path, skip_bad_lines, stats, columns, count))
        for chunk in _chunks(conversations, SFT_CHUNK):
            read_at.append(read)
            yield {"conversations": chunk, "seq_len": seq_len}

    def examples() -> Iterator[list[tuple[np.ndarray, np.ndarray]]]:
        told = 0
        for encoded in ordered_map(encode_chats, chunks(), num_proc, tokenizer):
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


class PrepareProgress:
    """The preparation's progress bar: input bytes read out of the inputs' total size (so it has
    an end, and its rate is MB/s), with the documents or conversations done, the tokens written
    and tokens/s after it. Writers call it once a chunk, as progress(items, nbytes, tokens);
    with by_bytes=False the bar counts items instead (writers that do not report bytes)."""

    UNITS = {"pretrain": "docs", "sft": "convs", "pref": "pairs"}

    def __init__(self, kind: str, inputs: Iterable[str | Path], show: bool, by_bytes: bool = True):
        from tqdm import tqdm

        self.unit, self.by_bytes = self.UNITS[kind], by_bytes
        self.items = self.bytes = self.tokens = 0
        self.start = time.perf_counter()
        if by_bytes:
            self.bar = tqdm(desc=f"prepare {kind}", total=sum(Path(p).stat().st_size for p in inputs), unit="B",
                            unit_scale=True, disable=not show)
        else:
            self.bar = tqdm(desc=f"prepare {kind}", unit=f" {self.unit}", disable=not show)

    def __call__(self, items: int, nbytes: int = 0, tokens: int = 0) -> None:
        self.items += items
        self.bytes += nbytes
        self.tokens += tokens
        if self.by_bytes:
            rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
            self.bar.set_postfix_str(f"{self.items:,} {self.unit}, {self.bar.format_sizeof(self.tokens)} tokens, "
                                     f"{self.bar.format_sizeof(rate)} tokens/s", refresh=False)
        self.bar.update(nbytes if self.by_bytes else items)

    def close(self) -> None:
        self.bar.close()


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
    if kind not in DATA_KINDS:
        raise ZerotrainError(f"unknown data kind '{kind}': use pretrain, sft or pref")
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
    # The preference writer (engine/pref_data.py) reports pairs, not bytes.
    bar = PrepareProgress(kind, inputs, show_progress, by_bytes=kind != "pref")
    try:
        # Another rank or node preparing the same data at once is harmless: the two results are
        # identical, and whichever lands last replaces the other in one step.
        with publishing(output_dir, directory=True) as tmp:
            files = list(map(str, inputs))
            if kind == "pretrain":
                splits = _write_pretrain(files, tokenizer, tmp, val_fraction, skip_bad_lines, stats, bar)
            elif kind == "sft":
                splits = _write_sft(files, tokenizer, tmp, seq_len, val_fraction, skip_bad_lines, stats, bar,
                                    mapping, num_proc)
            else:
                from engine.pref_data import write_pref  # pref_data imports this module

                splits = write_pref(files, tokenizer, tmp, seq_len, val_fraction, skip_bad_lines, stats, bar,
                                    mapping)
            meta = {"format_version": FORMAT_VERSION, "key": key, "kind": kind,
                    "dtype": str(_token_dtype(len(tokenizer))), "vocab_size": len(tokenizer),
                    "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
                    "seq_len": seq_len if kind != "pretrain" else None, "val_fraction": val_fraction,
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


# --------------------------------------------------------------------------- datasets

def _open_tokens(directory: Path, split: str, meta: dict[str, Any]) -> np.ndarray:
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


class PretrainDataset(torch.utils.data.Dataset):
    """Fixed-length windows of `seq_len` tokens over a split's token stream (labels = inputs;
    transformers shifts them inside the model).

    With `document_eos` (--document-mask) each window also carries position_ids that restart
    after every end-of-document token, so the documents a window holds neither attend to each
    other nor see a position they never had on their own (document_positions).
    """

    def __init__(self, directory: str | Path, split: str, seq_len: int, document_eos: int | None = None):
        self.directory, self.seq_len, self.document_eos = Path(directory), seq_len, document_eos
        self.meta = read_meta(directory)
        if self.meta["kind"] != "pretrain":
            raise ZerotrainError(f"{directory} holds {self.meta['kind']} data, not pretraining data")
        self.tokens = _open_tokens(self.directory, split, self.meta)

    def __len__(self) -> int:
        return len(self.tokens) // self.seq_len

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        window = torch.from_numpy(self.tokens[i * self.seq_len:(i + 1) * self.seq_len].astype(np.int64))
        if self.document_eos is not None:
            return {"input_ids": window, "labels": window, "position_ids": document_positions(window, self.document_eos)}
        return {"input_ids": window, "labels": window}


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
        self.tokens = _open_tokens(self.directory, split, self.meta)
        self.offsets = np.load(self.directory / f"{split}.idx.npy")
        self.mask = np.memmap(self.directory / f"{split}.mask.bin", dtype=np.uint8, mode="r") if len(self.tokens) else None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        a, b = self.offsets[i], self.offsets[i + 1]
        ids = torch.from_numpy(self.tokens[a:b].astype(np.int64))
        keep = torch.from_numpy(self.mask[a:b].astype(np.bool_))
        return {"input_ids": ids, "labels": torch.where(keep, ids, IGNORE_INDEX)}


class MixedDataset(torch.utils.data.Dataset):
    """Several datasets mixed by weight (MiniMind-style pretrain/SFT iteration).

    Position i draws its source from a seeded categorical over `weights`, and takes that
    source's next sample (wrapping around), so any stretch of the sampler's stream mixes the
    sources in proportion. Each sample keeps its own labels (its own loss mask).
    """

    def __init__(self, datasets: list[torch.utils.data.Dataset], weights: list[float], seed: int,
                 length: int | None = None):
        if len(datasets) != len(weights) or not datasets:
            raise ValueError("one weight per dataset")
        if any(w <= 0 for w in weights):
            raise ZerotrainError(f"mixture weights must be positive, got {weights}")
        if any(len(d) == 0 for d in datasets):
            raise ZerotrainError("a mixed data source has no samples: use more data or a shorter --seq-len")
        self.datasets = datasets
        self.weights = [w / sum(weights) for w in weights]
        self.length = length or sum(len(d) for d in datasets)
        rng = np.random.default_rng([seed, 0x6D6978])
        self.source = rng.choice(len(datasets), size=self.length, p=self.weights)
        self.index = np.empty(self.length, dtype=np.int64)
        for k, d in enumerate(datasets):
            where = np.nonzero(self.source == k)[0]
            self.index[where] = np.arange(len(where)) % len(d)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.datasets[self.source[i]][int(self.index[i])]


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
        if parts[0] in DATA_KINDS and len(parts) in (2, 3):
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


# --------------------------------------------------------------------------- batching

def document_positions(input_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Positions that restart at 0 after every `eos_id` (along the last dimension).

    Passed without an attention_mask, these make transformers build a block-diagonal causal mask
    (and flash-attention's varlen path), so each document attends to itself only, as in Llama 3's
    pretraining. Labels stay as they are: the token after an end-of-document is still predicted
    from that document, exactly the targets an unmasked window trains on.
    """
    index = torch.arange(input_ids.shape[-1]).expand_as(input_ids)
    starts = torch.zeros_like(index)
    starts[..., 1:] = torch.where(input_ids[..., :-1] == eos_id, index[..., 1:], 0)
    return index - starts.cummax(dim=-1).values


def collate_stack(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Fixed-length examples (pretraining windows) stacked into a batch."""
    return {k: torch.stack([e[k] for e in examples]) for k in examples[0]}


def collate_pad(examples: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; labels are padded with -100, attention_mask marks real tokens."""
    length = max(len(e["input_ids"]) for e in examples)
    batch = {"input_ids": torch.full((len(examples), length), pad_id, dtype=torch.long),
             "labels": torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long),
             "attention_mask": torch.zeros((len(examples), length), dtype=torch.long)}
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        batch["input_ids"][row, :n] = e["input_ids"]
        batch["labels"][row, :n] = e["labels"]
        batch["attention_mask"][row, :n] = 1
    return batch


def collate_packed(examples: list[dict[str, torch.Tensor]], seq_len: int, pad_id: int,
                   sequence_ids: bool = False) -> dict[str, torch.Tensor]:
    """Pack examples greedily, in order, into rows of at most `seq_len` tokens.

    position_ids restart at 0 for every example and no attention_mask is passed, so
    transformers builds a block-diagonal causal mask from the position_ids: examples in one
    row never attend to each other (the forward must run with use_cache=False, as the
    engine's does: transformers ignores packing when a KV cache is in play). The first label of each example is -100, so no token is
    trained to predict across a boundary. Examples are never split across rows.
    With `sequence_ids`, the batch also says which example each token is (its index in
    `examples`, -1 on padding), for sums per example (engine.objectives.preference).
    """
    rows: list[list[dict[str, torch.Tensor]]] = [[]]
    used = 0
    for e in examples:
        n = len(e["input_ids"])
        if used + n > seq_len and rows[-1]:
            rows.append([])
            used = 0
        rows[-1].append(e)
        used += n
    length = max(sum(len(e["input_ids"]) for e in row) for row in rows)
    batch = {"input_ids": torch.full((len(rows), length), pad_id, dtype=torch.long),
             "labels": torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long),
             "position_ids": torch.zeros((len(rows), length), dtype=torch.long)}
    if sequence_ids:
        batch["sequence_ids"] = torch.full((len(rows), length), -1, dtype=torch.long)
    index = 0
    for r, row in enumerate(rows):
        at = 0
        for e in row:
            n = len(e["input_ids"])
            if sequence_ids:
                batch["sequence_ids"][r, at:at + n] = index
            index += 1
            batch["input_ids"][r, at:at + n] = e["input_ids"]
            batch["labels"][r, at:at + n] = e["labels"]
            batch["labels"][r, at] = IGNORE_INDEX
            # a pretraining window under --document-mask brings its own restarting positions
            batch["position_ids"][r, at:at + n] = e["position_ids"] if "position_ids" in e else torch.arange(n)
            at += n
        # Padding continues as its own "sequence" (positions restart), fully masked by labels.
        batch["position_ids"][r, at:] = torch.arange(length - at)
    return batch


class ShardedSampler:
    """An endless, seeded stream of sample indices shared out between ranks.

    The stream is epoch 0's permutation, then epoch 1's, and so on. Each micro-batch step
    consumes the next `world_size * micro_batch_size` positions of it: rank r takes the r-th
    block. The only state is the global `cursor` (positions consumed), which does not depend
    on the world size: a run can resume on another number of ranks at the same place.
    """

    def __init__(self, num_samples: int, rank: int, world_size: int, seed: int, shuffle: bool = True):
        if num_samples <= 0:
            raise ZerotrainError("the dataset has no samples: use more data or a shorter --seq-len")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.num_samples, self.rank, self.world_size = num_samples, rank, world_size
        self.seed, self.shuffle, self.cursor = seed, shuffle, 0
        self._epoch, self._perm = -1, None

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_samples)
        if not self.shuffle:
            return offset
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        return int(self._perm[offset])

    def next_indices(self, micro_batch_size: int) -> list[int]:
        """This rank's indices for the next micro-batch; advances the shared cursor."""
        start = self.cursor + self.rank * micro_batch_size
        self.cursor += self.world_size * micro_batch_size
        return [self._index(p) for p in range(start, start + micro_batch_size)]

    @property
    def epoch(self) -> float:
        return self.cursor / self.num_samples

    def state_dict(self) -> dict[str, int]:
        return {"cursor": self.cursor, "seed": self.seed, "num_samples": self.num_samples}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["num_samples"] != self.num_samples or state["seed"] != self.seed:
            raise ZerotrainError(
                f"the checkpoint's data position is for {state['num_samples']} samples with seed {state['seed']}, "
                f"this run has {self.num_samples} samples with seed {self.seed}: resume with the same data and "
                "seed, or start a new run from its weights (--init-from the checkpoint, another --output-dir)")
        self.cursor = int(state["cursor"])


@dataclass
class BatchLoader:
    """Micro-batches for one rank: dataset + sampler + collate, resumable through state_dict()."""

    dataset: torch.utils.data.Dataset
    sampler: ShardedSampler
    micro_batch_size: int
    collate: Callable[[list[dict[str, torch.Tensor]]], dict[str, torch.Tensor]]
    stats: dict[str, Any] = field(default_factory=dict)

    def next_batch(self) -> dict[str, torch.Tensor]:
        return self.collate([self.dataset[i] for i in self.sampler.next_indices(self.micro_batch_size)])

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)


def eval_batches(dataset: torch.utils.data.Dataset, rank: int, world_size: int, micro_batch_size: int,
                 max_batches: int, collate) -> Iterator[dict[str, torch.Tensor]]:
    """Validation micro-batches for one rank: a fixed, unshuffled share of the split.

    Every rank yields the same number of batches (the extra samples that do not divide are
    left out), so collective calls in the eval loop stay in step.
    """
    per_step = micro_batch_size * world_size
    steps = min(max_batches, len(dataset) // per_step)
    for step in range(steps):
        start = step * per_step + rank * micro_batch_size
        yield collate([dataset[i] for i in range(start, start + micro_batch_size)])
