"""SFT preparation in batches and over processes writes exactly what the per-conversation
encoder wrote: the reference below is that encoder, kept as it was."""

import copy
import dataclasses
import json
import os

import numpy as np
import pytest

from common.errors import ZerotrainError
from engine.data import chat, conversations, writer
from engine.data.conversations import read_conversations
from engine.data.format import IGNORE_INDEX
from engine.data.kinds import KINDS
from engine.data.prepare import prepare
from tests.helpers import SAMPLES

SHAREGPT = SAMPLES / "sharegpt_identity_500.json"
ALPACA_SEED = SAMPLES / "alpaca_seed_tasks.jsonl"


# ----------------------------------------------------------------------------- the reference

def reference_spans(messages, tokenizer, where):
    render = lambda msgs, gen: tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    text = render(messages, False)
    spans = []
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        start = len(render(messages[:i], True)) if i else 0
        end_text = render(messages[: i + 1], False)
        if not text.startswith(end_text) or start > len(end_text):
            raise ZerotrainError(f"{where}: the chat template is not prefix-stable")
        spans.append((start, start + len(end_text[start:].rstrip())))
    return text, spans


def reference_encode(messages, tokenizer, seq_len, where):
    text, spans = reference_spans(messages, tokenizer, where)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoding["input_ids"]
    labels = [IGNORE_INDEX] * len(ids)
    for t, (a, b) in enumerate(encoding["offset_mapping"]):
        if b > a and any(s <= a and b <= e for s, e in spans):
            labels[t] = ids[t]
    return ids[:seq_len], labels[:seq_len], len(ids) > seq_len


def reference_write_sft(inputs, tokenizer, out, *, seq_len, val_fraction, skip_bad_lines, stats, progress, columns,
                        num_proc=1):
    def conversations():
        for path in inputs:
            for where, messages in read_conversations(path, skip_bad_lines, stats, columns):
                ids, labels, truncated = reference_encode(messages, tokenizer, seq_len, where)
                stats.truncated += truncated
                progress(1)
                if all(label == IGNORE_INDEX for label in labels):
                    stats.dropped_no_label += 1
                    continue
                yield [(ids, labels)]

    splits, written = writer.write_examples(conversations(), tokenizer, out, val_fraction)
    assert sum(written.values())
    return splits


# ----------------------------------------------------------------------------- inputs

@pytest.fixture(scope="module")
def sft_inputs(tmp_path_factory):
    """The shipped ShareGPT and Alpaca samples, plus multi-turn chats with a system prompt and
    Alpaca records with a history, so every turn layout is covered."""
    tmp = tmp_path_factory.mktemp("sft")
    chats = json.loads(SHAREGPT.read_text())
    multi = tmp / "multi_turn.jsonl"
    multi.write_text("".join(json.dumps(dict(r, system="Be brief."), ensure_ascii=False) + "\n"
                             for r in chats if len(r["conversations"]) >= 4))
    history = tmp / "alpaca_history.jsonl"
    seed = [json.loads(line) for line in ALPACA_SEED.open()]
    history.write_text("".join(json.dumps({"instruction": r["instruction"], "output": r["instances"][0]["output"],
                                           "history": [[seed[i - 1]["instruction"],
                                                        seed[i - 1]["instances"][0]["output"]]]},
                                          ensure_ascii=False) + "\n" for i, r in enumerate(seed)))
    return [str(SHAREGPT), str(ALPACA_SEED), str(multi), str(history)]


def prepared_bytes(directory):
    files = {p.name: p.read_bytes() for p in directory.iterdir() if p.name != "meta.json"}
    meta = json.loads((directory / "meta.json").read_text())
    return files, meta


@pytest.mark.parametrize("seq_len", [64, 512])
@pytest.mark.slow
def test_batched_and_parallel_preparation_is_byte_identical_to_the_per_conversation_encoder(
        tokenizer, sft_inputs, tmp_path, monkeypatch, seq_len):
    with monkeypatch.context() as m:
        m.setitem(KINDS, "sft", dataclasses.replace(KINDS["sft"], write=reference_write_sft))
        reference = prepare("sft", sft_inputs, tokenizer, tmp_path / "ref", seq_len=seq_len, val_fraction=0.05,
                            show_progress=False)
    ref_files, ref_meta = prepared_bytes(tmp_path / "ref")
    if seq_len == 64:  # the short length cuts conversations and leaves some with no reply token
        assert reference["stats"]["truncated"] > 0 and reference["stats"]["dropped_no_label"] > 0
    monkeypatch.setattr(conversations, "SFT_CHUNK", 97)  # many chunks, so the pool really shares them out
    for num_proc in (1, 2):
        out = tmp_path / f"np{num_proc}"
        prepare("sft", sft_inputs, tokenizer, out, seq_len=seq_len, val_fraction=0.05, show_progress=False,
                num_proc=num_proc)
        files, meta = prepared_bytes(out)
        assert files.keys() == ref_files.keys()
        for name in files:
            assert files[name] == ref_files[name], (num_proc, name)
        assert meta == ref_meta


def test_labels_are_the_tokens_inside_assistant_spans(tokenizer):
    conversations = [(f"c{i}", m) for i, (_, m) in enumerate(read_conversations(SHAREGPT)) if i < 60]
    for (where, messages), (ids, labels, truncated) in zip(conversations,
                                                           chat.encode_chats(conversations, tokenizer, 4096)):
        ref_ids, ref_labels, ref_truncated = reference_encode(messages, tokenizer, 4096, where)
        assert ids.tolist() == ref_ids and labels.tolist() == ref_labels and truncated == ref_truncated


def test_span_search_matches_the_any_rule_for_overlapping_and_unsorted_spans():
    rng = np.random.default_rng(0)
    for _ in range(200):
        spans = [tuple(sorted(rng.integers(0, 60, 2))) for _ in range(rng.integers(0, 5))]
        offsets = np.sort(rng.integers(0, 64, (40, 2)), axis=1)
        expected = [b > a and any(s <= a and b <= e for s, e in spans) for a, b in offsets]
        assert chat._inside_spans(offsets, spans).tolist() == expected


@pytest.mark.slow
def test_bad_records_name_their_line_with_several_processes(tokenizer, tmp_path, monkeypatch):
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    bad = {"messages": [{"role": "wizard", "content": "q"}]}
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [good] * 30 + [bad] + [good] * 5))
    monkeypatch.setattr(conversations, "SFT_CHUNK", 4)
    with pytest.raises(ZerotrainError, match=rf"{path}:31: messages\[0\] has unknown role 'wizard'"):
        prepare("sft", [str(path)], tokenizer, tmp_path / "out", seq_len=64, show_progress=False, num_proc=2)
    assert not (tmp_path / "out").exists()
    meta = prepare("sft", [str(path)], tokenizer, tmp_path / "skip", seq_len=64, show_progress=False, num_proc=2,
                   skip_bad_lines=True)
    assert meta["stats"]["bad_lines"] == 1 and meta["splits"]["train"]["examples"] + meta["splits"]["val"]["examples"] == 35


@pytest.mark.slow
def test_a_template_that_is_not_prefix_stable_is_named_from_a_worker(tokenizer, tmp_path, monkeypatch):
    reversed_template = copy.deepcopy(tokenizer)
    reversed_template.chat_template = ("{%- for message in messages|reverse %}{{ message['content'] + '\\n' }}"
                                       "{%- endfor %}")
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                     {"role": "assistant", "content": "a"},
                                                     {"role": "user", "content": "more"}]}) + "\n"
                            for i in range(12)))
    monkeypatch.setattr(conversations, "SFT_CHUNK", 4)
    with pytest.raises(ZerotrainError, match=rf"{path}:1: the chat template is not prefix-stable"):
        prepare("sft", [str(path)], reversed_template, tmp_path / "out", seq_len=64, show_progress=False,
                num_proc=2)


def _die(tokenizer, **task):
    os._exit(3)


@pytest.mark.slow
def test_a_worker_that_dies_ends_the_map_with_an_error_not_a_hang(tokenizer):
    with pytest.raises(ZerotrainError, match="a data preparation worker process died"):
        list(writer.ordered_map(_die, ({"i": i} for i in range(6)), 2, tokenizer))


def test_num_proc_must_not_be_negative(tokenizer, tmp_path):
    with pytest.raises(ZerotrainError, match="--num-proc must be 0"):
        prepare("sft", [str(SHAREGPT)], tokenizer, tmp_path / "out", num_proc=-1, show_progress=False)


def test_chatml_spans_derived_from_the_template_rule_match_rendering_every_prefix(tokenizer, sft_inputs):
    from model.tokenizer import CHAT_TEMPLATE

    assert tokenizer.chat_template == CHAT_TEMPLATE  # else the derived path is not what runs
    turn = lambda role, content: {"role": role, "content": content}
    awkward = [
        [turn("assistant", "first, with no prompt before it")],
        [turn("user", ""), turn("assistant", "")],
        [turn("user", "q"), turn("assistant", "trailing space and newlines  \n\n")],
        [turn("system", "s"), turn("assistant", "a1"), turn("assistant", "a2 <|im_end|>\n"), turn("user", "u")],
        [turn("user", "emoji \U0001F600 and 中文"), turn("assistant", "\t"), turn("user", "again")],
        [dict(turn("user", "q"), reasoning_content=None), dict(turn("assistant", "a"), thinking="hidden")],
        # Reasoning renders inside the reply, except where the reply already starts with <think>.
        [turn("user", "q"), dict(turn("assistant", "a"), reasoning_content="r\n\n"), turn("user", "u"),
         dict(turn("assistant", ""), reasoning_content="\nsecond <|im_end|>")],
        [dict(turn("assistant", "<think>\nmine\n</think>\na"), reasoning_content="ignored"),
         dict(turn("user", "q"), reasoning_content="not an assistant's"),
         dict(turn("assistant", "a"), reasoning_content="")],
        [turn("user", "q"), dict(turn("assistant", "a"), reasoning_content=["not", "text"])],
    ]
    conversations = awkward + [m for path in sft_inputs for _, m in read_conversations(path)]
    wheres = [f"c{i}" for i in range(len(conversations))]
    assert chat.assistant_spans_batch(conversations, tokenizer, wheres) == \
        chat._rendered_spans(conversations, tokenizer, wheres)
    for messages in awkward:
        assert chat.assistant_spans(messages, tokenizer) == reference_spans(messages, tokenizer, "c")


def test_a_conversation_the_chatml_rule_cannot_derive_is_rendered(tokenizer, monkeypatch):
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    monkeypatch.setattr(chat, "_chatml_spans", lambda m: ("not the render", []))
    assert chat.assistant_spans(messages, tokenizer) == reference_spans(messages, tokenizer, "c")
