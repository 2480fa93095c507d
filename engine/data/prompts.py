"""The prompt data kind, for RL: raw files -> checked prompts with their extra columns -> prompt
token files + records -> left-padded batches of prompts.

Shapes, told from a file's first record:

    TRL         {"prompt": str | [{role, content}...], <any other columns>}
    MiniMind    {"conversations": [{role, content}...]} (rlaif.jsonl): the turns up to the last
                user turn; a final assistant turn is a placeholder and is dropped
    messages    {"messages": [{role, content}...]}: the same rule
    --columns   prompt=FIELD[,system=FIELD]: the prompt (a string or a message list) from FIELD

A conversational prompt (a message list) is rendered with the chat template and its generation
prompt, and its completions are messages (TRL's convention); a string prompt is tokenized as it
is and its completions are strings. Every field besides the prompt (and "system") is a column,
kept as it is and handed to the reward functions by name.

A prepared "prompt" directory is an SFT-style one (engine.data.format) with one example per
prompt (its tokens, none trained) and, per split, SPLIT.records.jsonl: line i holds prompt i as
given ("prompt": string or messages) and its columns ("columns": {name: value}).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import torch

from common.errors import ZerotrainError
from engine.data.chat import message, system_message
from engine.data.columns import Columns, mapped_field, mapped_turn
from engine.data.conversations import SFTDataset
from engine.data.files import ReadStats, read_shaped
from engine.data.format import IGNORE_INDEX
from engine.data.writer import is_val, write_examples

PROMPT_SUFFIXES = (".json", ".jsonl", ".parquet")
PROMPT_SHAPES = ("TRL {prompt: str or [{role, content}], <columns>...}, MiniMind rlaif {conversations: [{role, "
                 "content}]} (a final assistant turn is a placeholder, dropped), {messages: [{role, content}]}; "
                 "anything else: --columns prompt=FIELD")
_PROMPT_FIELDS = {"trl": "prompt", "minimind": "conversations", "messages": "messages"}

Prompt = str | list[dict[str, str]]


def detect_prompt_format(record: Any) -> str | None:
    if not isinstance(record, dict):
        return None
    if "prompt" in record:
        return "trl"
    for fmt in ("minimind", "messages"):
        turns = record.get(_PROMPT_FIELDS[fmt])
        if isinstance(turns, list) and turns and isinstance(turns[0], dict):
            return fmt
    return None


def _conversation(turns: Any, where: str, name: str, columns: Columns | None = None) -> list[dict[str, str]]:
    if not isinstance(turns, list) or not turns:
        raise ZerotrainError(f"{where}: '{name}' must be a non-empty list of {{role, content}} messages")
    if columns is not None:
        return [mapped_turn(turn, columns, where, f"{name}[{i}]") for i, turn in enumerate(turns)]
    return [message(turn, "role", "content", where, f"{name}[{i}]") for i, turn in enumerate(turns)]


def to_prompt(record: Any, fmt: str, where: str, columns: Columns | None = None) -> tuple[Prompt, dict[str, Any]]:
    """(the prompt, its columns) of one record of a known shape (detect_prompt_format)."""
    if not isinstance(record, dict):
        raise ZerotrainError(f"{where}: a record must be a JSON object, not {type(record).__name__}")
    if columns is not None:
        field = columns.fields["prompt"]
        value = mapped_field(record, field, where)
        system = mapped_field(record, columns.fields["system"], where) if "system" in columns.fields else None
        used = {field, columns.fields.get("system")}
    else:
        field = _PROMPT_FIELDS[fmt]
        if field not in record:
            raise ZerotrainError(f"{where}: no '{field}' (found {sorted(record)}); every record of a file must have "
                                 f"the shape of its first: {PROMPT_SHAPES}")
        value, system, used = record[field], record.get("system"), {field, "system"}
    extra = {k: v for k, v in record.items() if k not in used}
    if isinstance(value, str):
        if not value.strip():
            raise ZerotrainError(f"{where}: '{field}' is empty")
        if isinstance(system, str) and system.strip():  # a system prompt makes the prompt a conversation
            return [{"role": "system", "content": system}, {"role": "user", "content": value}], extra
        return value, extra
    if not isinstance(value, list):
        raise ZerotrainError(f"{where}: '{field}' must be a string or a list of {{role, content}} messages, "
                             f"not {type(value).__name__}")
    turns = _conversation(value, where, field, columns)
    if fmt != "trl" and turns[-1]["role"] == "assistant":
        turns = turns[:-1]  # rlaif's placeholder reply: the policy writes this one
    if not turns or turns[-1]["role"] != "user":
        raise ZerotrainError(f"{where}: '{field}' must end with a user turn (the one the model answers)")
    if turns[0]["role"] != "system":
        turns = system_message({"system": system}) + turns
    return turns, extra


def read_prompts(path: str | Path, skip_bad_lines: bool = False, stats: ReadStats | None = None,
                 columns: Columns | None = None) -> Iterator[tuple[str, tuple[Prompt, dict[str, Any]]]]:
    """(location, (prompt, columns)) for each record of a prompt file."""
    stats = stats if stats is not None else ReadStats()
    detect = (lambda record: "mapped") if columns else detect_prompt_format
    parse = lambda record, fmt, where: to_prompt(record, fmt, where, columns)  # noqa: E731
    yield from read_shaped(path, PROMPT_SUFFIXES, "prompt", detect, parse, PROMPT_SHAPES, skip_bad_lines, stats)


def encode_prompt(prompt: Prompt, tokenizer) -> list[int]:
    """A conversational prompt through the chat template with its generation prompt; a string as
    it is (the tokenizer's own special tokens, as TRL tokenizes a plain prompt)."""
    if isinstance(prompt, str):
        return list(tokenizer(prompt)["input_ids"])
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def write_prompts(inputs: list[str], tokenizer, out: Path, *, seq_len: int, val_fraction: float,
                  skip_bad_lines: bool, stats: ReadStats, progress, columns: Columns | None,
                  num_proc: int = 1) -> dict[str, dict[str, int]]:
    """engine.data.prepare's writer for kind "prompt": one example per prompt, its tokens cut from
    the left to `seq_len` - 1 (room for one generated token at least), and its record."""
    records = {split: open(out / f"{split}.records.jsonl", "w") for split in ("train", "val")}

    def prompts() -> Iterator[list[tuple[list[int], list[int]]]]:
        index = 0
        for path in inputs:
            for where, (prompt, extra) in read_prompts(path, skip_bad_lines, stats, columns):
                progress(1)
                ids = encode_prompt(prompt, tokenizer)
                if len(ids) > seq_len - 1:
                    stats.truncated += 1
                    ids = ids[len(ids) - (seq_len - 1):]
                try:
                    line = json.dumps({"prompt": prompt, "columns": extra}, ensure_ascii=False)
                except TypeError as e:
                    raise ZerotrainError(f"{where}: a column is not JSON data ({e})") from None
                records["val" if is_val(index, val_fraction) else "train"].write(line + "\n")
                index += 1
                yield [(ids, [IGNORE_INDEX] * len(ids))]

    try:
        splits, written = write_examples(prompts(), tokenizer, out, val_fraction)
    finally:
        for f in records.values():
            f.close()
    if not sum(written.values()):
        raise ZerotrainError(f"no usable prompts in {', '.join(inputs)} ({stats.bad_lines} were bad records)")
    return {split: {**counts, "prompts": written[split]} for split, counts in splits.items()}


class PromptDataset(SFTDataset):
    """Prepared prompts: item i is prompt i's token ids and its index; `record(i)` is the prompt
    as given and its columns."""

    kind, kind_name = "prompt", "prompt"

    def __init__(self, directory: str | Path, split: str, seq_len: int):
        super().__init__(directory, split, seq_len)
        path = self.directory / f"{split}.records.jsonl"
        with open(path) as f:
            self.records = [json.loads(line) for line in f]
        if len(self.records) != len(self):
            raise ZerotrainError(f"{path}: {len(self.records)} records for {len(self)} prompts; the prepared data is "
                                 "changed or corrupt, prepare it again")

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"prompt_ids": super().__getitem__(i)["input_ids"], "index": torch.tensor(i)}

    def record(self, i: int) -> tuple[Prompt, dict[str, Any]]:
        entry = self.records[i]
        return entry["prompt"], entry["columns"]


def collate_prompts(examples: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Prompts left-padded to the longest, so that every row's generation starts at the same
    position: prompt_ids, prompt_mask (1 on prompt tokens) and each prompt's dataset index."""
    width = max(len(e["prompt_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, e in enumerate(examples):
        n = len(e["prompt_ids"])
        ids[r, width - n:] = e["prompt_ids"]
        mask[r, width - n:] = 1
    return {"prompt_ids": ids, "prompt_mask": mask, "index": torch.stack([e["index"] for e in examples])}
