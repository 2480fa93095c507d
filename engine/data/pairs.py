"""The pref data kind, preference pairs for DPO-style training: raw files -> checked pairs -> token
files -> pairs of sequences -> one batch of the chosen sequences then the rejected ones.

A pair is prompt turns plus two assistant replies. Each reply is rendered after the prompt with
the tokenizer's chat template and labelled by SFT's rule (engine.data.chat.assistant_spans): only the
final reply's tokens, its end-of-turn token included, are trained on; assistant turns inside the
prompt are not. The prompt is tokenized apart from the reply (as TRL does), so the chosen and
rejected sequences of a pair start with exactly the same prompt tokens.

A prepared "pref" directory is an SFT-style one (engine.data.format) whose example 2i is pair i's
chosen sequence and example 2i + 1 its rejected sequence; meta.json's splits also count pairs.

A batch of B pairs is 2B sequences, the chosen ones then the rejected ones: one padded row each
(collate_pref), or, with --pack, packed into rows of at most --seq-len tokens with a
`sequence_ids` map of which token is whose (collate_pref_packed).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from common.errors import ZerotrainError
from engine.data.chat import assistant_spans, label_tokens, message, system_message
from engine.data.collate import collate_packed, collate_pad
from engine.data.columns import Columns, mapped_field, mapped_turn
from engine.data.conversations import SFTDataset
from engine.data.files import ReadStats, read_shaped
from engine.data.format import IGNORE_INDEX
from engine.data.writer import write_examples

PREF_SUFFIXES = (".json", ".jsonl", ".parquet")


PREF_SHAPES = ("MiniMind {chosen: [{role, content}...], rejected: [{role, content}...]} (the same prompt turns, then "
               "the final assistant reply; UltraFeedback's {prompt, chosen: [...], rejected: [...]} too), "
               "{prompt: str or [{role, content}], chosen: str, rejected: str, system?} (HH-RLHF, UltraFeedback "
               "style), ShareGPT {conversations: [{from, value}], chosen: {from, value}, rejected: {from, value}, "
               "system?} (LLaMA-Factory); anything else: --columns chosen=FIELD,rejected=FIELD,prompt=FIELD,...")


_REQUIRED = {"messages": ("chosen", "rejected"), "prompt": ("prompt", "chosen", "rejected"),
             "sharegpt": ("conversations", "chosen", "rejected")}


Example = tuple[list[int], list[int]]  # (input_ids, labels)


@dataclass
class PrefPair:
    """Prompt turns ({role, content} messages) and the two assistant replies to them."""

    prompt: list[dict[str, str]]
    chosen: str
    rejected: str


def detect_pref_format(record: Any) -> str | None:
    """The preference shape of a raw record (messages, prompt or sharegpt), None if not a pair."""
    if not isinstance(record, dict) or "chosen" not in record or "rejected" not in record:
        return None
    if "conversations" in record:
        return "sharegpt"
    if isinstance(record["chosen"], list):
        return "messages"
    return "prompt" if "prompt" in record else None


def _messages(record: dict, key: str, role_key: str, text_key: str, where: str) -> list[dict[str, str]]:
    turns = record[key]
    if not isinstance(turns, list) or not turns:
        raise ZerotrainError(f"{where}: '{key}' must be a non-empty list of {{{role_key}, {text_key}}} messages")
    return [message(turn, role_key, text_key, where, f"{key}[{i}]") for i, turn in enumerate(turns)]


def _prompt_turns(record: dict, where: str) -> list[dict[str, str]]:
    prompt = record["prompt"]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ZerotrainError(f"{where}: 'prompt' is empty")
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list):
        return _messages(record, "prompt", "role", "content", where)
    raise ZerotrainError(f"{where}: 'prompt' must be a string or a list of {{role, content}} messages, "
                         f"not {type(prompt).__name__}")


def _reply(record: dict, key: str, where: str) -> dict[str, str]:
    if not isinstance(record[key], str):
        raise ZerotrainError(f"{where}: '{key}' must be a string (the reply), not {type(record[key]).__name__}")
    return {"role": "assistant", "content": record[key]}


def _shared_prompt(record: dict, where: str) -> tuple[list[dict[str, str]], dict[str, str], dict[str, str]]:
    """Prompt turns and final messages of chosen/rejected message lists that share their prompt."""
    chosen = _messages(record, "chosen", "role", "content", where)
    rejected = _messages(record, "rejected", "role", "content", where)
    if chosen[:-1] != rejected[:-1]:
        at = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), None)
        how = (f"they differ at message {at}" if at is not None and at < min(len(chosen), len(rejected)) - 1 else
               f"'chosen' has {len(chosen) - 1} of them, 'rejected' {len(rejected) - 1}")
        raise ZerotrainError(f"{where}: 'chosen' and 'rejected' must share their prompt turns (every message but "
                             f"the last), but {how}; fix the record")
    # UltraFeedback's lists repeat the prompt, so its string "prompt" beside them is not used; TRL's
    # explicit-prompt shape {prompt, chosen: [reply], rejected: [reply]} has the prompt only there.
    prompt = chosen[:-1]
    if not prompt and "prompt" in record:
        prompt = _prompt_turns(record, where)
    if prompt and prompt[0]["role"] != "system":
        prompt = system_message(record) + prompt
    return prompt, chosen[-1], rejected[-1]


def to_pair(record: Any, fmt: str, where: str) -> PrefPair:
    """The checked preference pair of one record of a known shape (detect_pref_format)."""
    if not isinstance(record, dict):
        raise ZerotrainError(f"{where}: a record must be a JSON object, not {type(record).__name__}")
    missing = [key for key in _REQUIRED[fmt] if key not in record]
    if missing:
        raise ZerotrainError(f"{where}: no {' or '.join(repr(k) for k in missing)} (found {sorted(record)}); every "
                             f"record of a file must have the shape of its first ({fmt}): {PREF_SHAPES}")
    if fmt == "sharegpt":
        prompt = system_message(record) + _messages(record, "conversations", "from", "value", where)
        chosen, rejected = (message(record[k], "from", "value", where, k) for k in ("chosen", "rejected"))
    elif fmt == "prompt":
        prompt = system_message(record) + _prompt_turns(record, where)
        chosen, rejected = _reply(record, "chosen", where), _reply(record, "rejected", where)
    else:
        prompt, chosen, rejected = _shared_prompt(record, where)
    for key, reply in (("chosen", chosen), ("rejected", rejected)):
        if reply["role"] != "assistant":
            raise ZerotrainError(f"{where}: the '{key}' reply is a {reply['role']} message, not the assistant's; "
                                 "a pair ends with two assistant replies to the same prompt")
    if all(turn["role"] == "system" for turn in prompt):
        raise ZerotrainError(f"{where}: no prompt turns before the replies; a pair needs a prompt")
    return PrefPair(prompt, chosen["content"], rejected["content"])


def mapped_pair(record: Any, columns: Columns, where: str) -> PrefPair:
    """The pair in a record read through a --columns pair mapping. Its fields are renamed into
    the native shapes (turns into {role, content}; a single reply turn {role, content} into a
    one-message list) and read as those are: a string or message-list prompt, string replies or
    message lists that share their prompt turns."""
    fields = columns.fields

    def native(key: str) -> Any:
        value = mapped_field(record, fields[key], where)
        if isinstance(value, dict):
            return [mapped_turn(value, columns, where, fields[key])]
        if isinstance(value, list):
            return [mapped_turn(turn, columns, where, f"{fields[key]}[{i}]") for i, turn in enumerate(value)]
        return value

    renamed = {key: native(key) for key in ("prompt", "chosen", "rejected") if key in fields}
    if "system" in fields:
        renamed["system"] = mapped_field(record, fields["system"], where)
    fmt = detect_pref_format(renamed)
    if fmt is None:
        raise ZerotrainError(f"{where}: '{fields['chosen']}' holds a {type(renamed['chosen']).__name__}, not a message "
                             "list, so the prompt must come from a field of its own: add prompt=FIELD to --columns")
    try:
        return to_pair(renamed, fmt, where)
    except ZerotrainError as e:
        raise ZerotrainError(f"{e} (fields read through --columns {columns.spec()})") from None


def read_pairs(path: str | Path, skip_bad_lines: bool = False, stats: ReadStats | None = None,
               columns: Columns | None = None) -> Iterator[tuple[str, PrefPair]]:
    """(location, pair) for each record of a preference file; the shape is detected per file, or
    read through a --columns pair mapping."""
    stats = stats if stats is not None else ReadStats()
    detect, parse = detect_pref_format, to_pair
    if columns:
        detect = lambda record: columns.shape
        parse = lambda record, fmt, where: mapped_pair(record, columns, where)
    yield from read_shaped(path, PREF_SUFFIXES, "preference", detect, parse, PREF_SHAPES, skip_bad_lines, stats)


def _prompt_and_reply(prompt: list[dict[str, str]], reply: str, tokenizer,
                      where: str) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, reply ids, reply labels): SFT's assistant span of the final reply, tokenized
    apart from the prompt text before it."""
    text, spans = assistant_spans(prompt + [{"role": "assistant", "content": reply}], tokenizer, where)
    start, end = spans[-1]
    prompt_ids, _ = label_tokens(text[:start], [], tokenizer)
    ids, labels = label_tokens(text[start:], [(0, end - start)], tokenizer)
    return prompt_ids, ids, labels


def encode_pair(pair: PrefPair, tokenizer, seq_len: int,
                where: str = "pair") -> tuple[Example, Example, bool]:
    """(chosen (input_ids, labels), rejected (input_ids, labels), truncated).

    A pair longer than `seq_len` (prompt + longer reply) loses prompt tokens from the left
    first, keeping at least min(prompt length, seq_len // 2) of them, then reply tokens from
    the right, so that each sequence fits.
    """
    prompt_ids, chosen_ids, chosen_labels = _prompt_and_reply(pair.prompt, pair.chosen, tokenizer, where)
    rejected_prompt, rejected_ids, rejected_labels = _prompt_and_reply(pair.prompt, pair.rejected, tokenizer, where)
    if rejected_prompt != prompt_ids:
        raise ZerotrainError(f"{where}: the chat template renders the prompt differently before the two replies; "
                             "use a ChatML-style (prefix-stable) template")
    longest = max(len(chosen_ids), len(rejected_ids))
    truncated = len(prompt_ids) + longest > seq_len
    if truncated:
        keep = max(min(len(prompt_ids), seq_len // 2), seq_len - longest)
        prompt_ids = prompt_ids[len(prompt_ids) - keep:]
        room = seq_len - keep
        chosen_ids, chosen_labels = chosen_ids[:room], chosen_labels[:room]
        rejected_ids, rejected_labels = rejected_ids[:room], rejected_labels[:room]
    masked = [IGNORE_INDEX] * len(prompt_ids)
    return ((prompt_ids + chosen_ids, masked + chosen_labels),
            (prompt_ids + rejected_ids, masked + rejected_labels), truncated)


def write_pref(inputs: list[str], tokenizer, out: Path, *, seq_len: int, val_fraction: float, skip_bad_lines: bool,
               stats: ReadStats, progress, columns: Columns | None, num_proc: int = 1) -> dict[str, dict[str, int]]:
    """engine.data.prepare's writer for kind "pref": two examples a pair, chosen then rejected
    (in this process: `num_proc` is for the kinds whose encoding pays for workers)."""

    def pairs() -> Iterator[list[Example]]:
        for path in inputs:
            for where, pair in read_pairs(path, skip_bad_lines, stats, columns):
                progress(1)
                if pair.chosen == pair.rejected:
                    stats.dropped_identical += 1
                    continue
                chosen, rejected, truncated = encode_pair(pair, tokenizer, seq_len, where)
                stats.truncated += truncated
                if any(all(label == IGNORE_INDEX for label in labels) for _, labels in (chosen, rejected)):
                    stats.dropped_no_label += 1
                    continue
                if chosen[0] == rejected[0]:  # the replies differ only past seq_len
                    stats.dropped_identical += 1
                    continue
                yield [chosen, rejected]

    splits, written = write_examples(pairs(), tokenizer, out, val_fraction)
    if not sum(written.values()):
        raise ZerotrainError(f"no usable preference pairs in {', '.join(inputs)} ({stats.dropped_identical} had "
                             f"identical replies, {stats.dropped_no_label} no reply token within seq_len {seq_len}, "
                             f"{stats.bad_lines} were bad records)")
    return {split: {**counts, "pairs": written[split]} for split, counts in splits.items()}


class PrefDataset(SFTDataset):
    """Prepared preference pairs: item i holds pair i's chosen and rejected input_ids and labels
    (-100 where not trained on)."""

    kind, kind_name = "pref", "preference-pair"

    def __init__(self, directory: str | Path, split: str, seq_len: int):
        super().__init__(directory, split, seq_len)
        if super().__len__() % 2:
            raise ZerotrainError(f"{self.directory}: {split} holds an odd number of sequences, not pairs; the "
                                 "prepared data is changed or corrupt, prepare it again")

    def __len__(self) -> int:
        return super().__len__() // 2

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        chosen, rejected = super().__getitem__(2 * i), super().__getitem__(2 * i + 1)
        return {"chosen_input_ids": chosen["input_ids"], "chosen_labels": chosen["labels"],
                "rejected_input_ids": rejected["input_ids"], "rejected_labels": rejected["labels"]}


def _sequences(examples: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """B pairs -> their 2B sequences: the chosen ones, then the rejected ones."""
    return [{"input_ids": e[f"{side}_input_ids"], "labels": e[f"{side}_labels"]}
            for side in ("chosen", "rejected") for e in examples]


def _add_ref_logps(batch: dict[str, torch.Tensor], examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Examples that carry precomputed `ref_chosen_logps` / `ref_rejected_logps` add `ref_logps`
    (float32 [2B], chosen then rejected, the order of _sequences)."""
    with_ref = ["ref_chosen_logps" in e and "ref_rejected_logps" in e for e in examples]
    if any(with_ref):
        if not all(with_ref):
            raise ValueError("some pairs of the batch carry reference log-probs and some do not")
        batch["ref_logps"] = torch.tensor([float(e[f"ref_{side}_logps"]) for side in ("chosen", "rejected")
                                           for e in examples], dtype=torch.float32)
    return batch


def collate_pref(examples: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """B pairs -> one batch of 2B rows for one forward: rows 0..B-1 the chosen sequences, rows
    B..2B-1 the rejected ones, right-padded to the longest (collate_pad), plus `ref_logps` when
    the pairs carry precomputed reference log-probs."""
    return _add_ref_logps(collate_pad(_sequences(examples), pad_id), examples)


def collate_pref_packed(examples: list[dict[str, torch.Tensor]], seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """B pairs -> their 2B sequences (chosen ones, then rejected ones) packed by collate_packed
    into rows of at most `seq_len` tokens, plus `sequence_ids` (rows x length): which of the 2B
    sequences each token belongs to, -1 on padding, so per-sequence sums need no row of their
    own (engine.objectives.preference.sequence_logps). `ref_logps` as in collate_pref."""
    return _add_ref_logps(collate_packed(_sequences(examples), seq_len, pad_id, sequence_ids=True), examples)
