"""Conversations as {role, content} messages, rendered with the tokenizer's chat template and
labelled: the one rule for which tokens are trained on, for SFT and for preference pairs (the
assistant's replies, each with its end-of-turn token; every other token is IGNORE_INDEX)."""

from __future__ import annotations

from itertools import chain
from typing import Any

import numpy as np

from common.errors import ZerotrainError
from engine.data.format import IGNORE_INDEX

ROLE_ALIASES = {
    "system": "system",
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bot": "assistant",
}


def message(turn: Any, role_key: str, text_key: str, where: str, name: str,
            reasoning_key: str | None = None) -> dict[str, str]:
    """One {role, content} message from a raw turn (roles through ROLE_ALIASES); `name` says
    where the turn is in its record, for errors. With `reasoning_key`, an assistant turn's reasoning
    (DeepSeek's and OpenAI's `reasoning_content`, null meaning none) is carried as
    "reasoning_content", which the chat template renders as a `<think>` block before the reply."""
    if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
        raise ZerotrainError(f"{where}: {name} needs '{role_key}' and '{text_key}'")
    role = ROLE_ALIASES.get(str(turn[role_key]).lower())
    if role is None:
        raise ZerotrainError(f"{where}: {name} has unknown role {turn[role_key]!r}; "
                             f"expected one of {sorted(ROLE_ALIASES)}")
    if not isinstance(turn[text_key], str):
        raise ZerotrainError(f"{where}: {name}.{text_key} must be a string")
    out = {"role": role, "content": turn[text_key]}
    reasoning = turn.get(reasoning_key) if reasoning_key and role == "assistant" else None
    if reasoning is not None:
        if not isinstance(reasoning, str):
            raise ZerotrainError(f"{where}: {name}.{reasoning_key} must be a string (the reasoning before the "
                                 f"reply) or null, not {type(reasoning).__name__}")
        out["reasoning_content"] = reasoning
    return out


def system_message(record: dict) -> list[dict[str, str]]:
    """The record's optional "system" string as a message list (empty when absent or blank)."""
    system = record.get("system")
    return [{"role": "system", "content": system}] if isinstance(system, str) and system.strip() else []


def assistant_spans(messages: list[dict[str, str]], tokenizer,
                    where: str = "conversation") -> tuple[str, list[tuple[int, int]]]:
    """The conversation rendered with the chat template, and the character spans of its
    assistant replies: the reply and its end-of-turn token, not the whitespace after.

    Spans are found by rendering each prefix of the conversation (with the generation prompt
    before an assistant turn), so any prefix-stable template works. This is the one rule for
    which tokens are trained on, for SFT and for preference pairs.
    """
    return assistant_spans_batch([messages], tokenizer, [where])[0]


# Other names transformers reads as an assistant's reasoning, as some templates do: left to rendering.
_OTHER_REASONING_KEYS = ("thinking", "reasoning")


def _chatml_spans(messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]] | None:
    """What rendering every prefix with model.tokenizer.CHAT_TEMPLATE would give assistant_spans,
    computed from its one rule (each message is '<|im_start|>' role '\\n' content '<|im_end|>\\n',
    an assistant's non-empty reasoning_content as '<think>\\n' reasoning '\\n</think>\\n' before a
    content that does not start with '<think>', the generation prompt '<|im_start|>assistant\\n');
    None for a message that is not plain text."""
    pieces, spans, at = [], [], 0
    for i, turn in enumerate(messages):
        role, content, reasoning = turn.get("role"), turn.get("content"), turn.get("reasoning_content")
        if (type(role) is not str or type(content) is not str or (reasoning is not None and type(reasoning) is not str)
                or any(turn.get(key) is not None for key in _OTHER_REASONING_KEYS)):
            return None
        head = "<|im_start|>" + role + "\n"
        if role == "assistant" and reasoning and not content.startswith("<think>"):
            # Part of the reply: the generation prompt ends before it, so it is trained on.
            content = "<think>\n" + reasoning + "\n</think>\n" + content
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
    SFT preparation (a conversation with k replies has 2k of them). Tokenizers saved before the
    template rendered reasoning carry CHATML_WITHOUT_REASONING, which follows the same rule for
    messages without reasoning; one with reasoning renders otherwise there, so takes the general path."""
    from model.tokenizer import CHAT_TEMPLATE, CHATML_WITHOUT_REASONING

    if not conversations or tokenizer.chat_template not in (CHAT_TEMPLATE, CHATML_WITHOUT_REASONING):
        results = _rendered_spans(conversations, tokenizer, wheres)
    else:
        texts = tokenizer.apply_chat_template(conversations, tokenize=False)
        results = [_chatml_spans(messages) for messages in conversations]
        odd = [i for i, (text, derived) in enumerate(zip(texts, results)) if derived is None or derived[0] != text]
        for i, result in zip(odd, _rendered_spans([conversations[i] for i in odd], tokenizer,
                                                  [wheres[i] for i in odd])):
            results[i] = result
    _check_reasoning_rendered(conversations, results, wheres)
    return results


def _check_reasoning_rendered(conversations: list[list[dict[str, str]]],
                              results: list[tuple[str, list[tuple[int, int]]]], wheres: list[str]) -> None:
    """An error for a template that leaves out an assistant's reasoning_content, which would
    otherwise train on the reply without its thinking (a reply that starts with its own <think>
    block is rendered instead of it, on purpose)."""
    for messages, (text, _), where in zip(conversations, results, wheres):
        for turn in messages:
            reasoning = turn.get("reasoning_content")
            if (reasoning and isinstance(reasoning, str) and turn.get("role") == "assistant"
                    and not str(turn.get("content")).startswith("<think>") and reasoning not in text):
                raise ZerotrainError(
                    f"{where}: an assistant turn has reasoning_content, but the tokenizer's chat template leaves it "
                    "out (zerotrain's before reasoning did, as do many); give the tokenizer a template that renders "
                    "it, such as model/default_tokenizer/chat_template.jinja copied into its directory, or put the "
                    "reasoning in the reply as <think>...</think>")


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
    backend = fast_backend(tokenizer)
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


def fast_backend(tokenizer):
    """The Rust `tokenizers` backend of a transformers tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ZerotrainError("a fast (Rust `tokenizers`) tokenizer is needed; load it with load_tokenizer()")
    return backend
