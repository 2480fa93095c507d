"""Reasoning models: `reasoning_content` and `<think>` replies through the chat template, SFT data
and labels, and `zerotrain serve`'s split of a completion into reasoning_content and content."""

from __future__ import annotations

import copy
import json

import pytest

from common.errors import ZerotrainError
from engine.data import chat
from engine.data.conversations import SFTDataset, read_conversations
from engine.data.format import IGNORE_INDEX
from engine.data.prepare import prepare
from model.tokenizer import CHAT_TEMPLATE, CHATML_WITHOUT_REASONING, DEFAULT_TOKENIZER, load_tokenizer
from tests.helpers import SAMPLES

QUESTION = {"role": "user", "content": "What is 2 + 3?"}
REPLY = {"role": "assistant", "content": "<answer>5</answer>", "reasoning_content": "2 + 3 = 5."}


def render(tokenizer, messages, generation_prompt=False, **kwargs) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt, **kwargs)


# ----------------------------------------------------------------------------- the chat template

def test_reasoning_renders_as_a_think_block_inside_the_reply(tokenizer):
    assert render(tokenizer, [QUESTION, REPLY]) == (
        "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n2 + 3 = 5.\n</think>\n<answer>5</answer><|im_end|>\n")
    # Every turn keeps its reasoning (unlike Qwen3's template), so prefixes stay prefixes.
    two = render(tokenizer, [QUESTION, REPLY, QUESTION, REPLY])
    assert two.count("<think>\n2 + 3 = 5.\n</think>\n") == 2
    assert two.startswith(render(tokenizer, [QUESTION, REPLY, QUESTION], True))


@pytest.mark.parametrize("reply, expected", [
    ({"content": "<think>\nmine\n</think>\nok", "reasoning_content": "dropped"}, "<think>\nmine\n</think>\nok"),
    ({"content": "<think>\nmine\n</think>\nok"}, "<think>\nmine\n</think>\nok"),  # data with <think> in the reply
    ({"content": "ok", "reasoning_content": ""}, "ok"),
    ({"content": "ok", "reasoning_content": None}, "ok"),
])
def test_a_reply_that_has_its_own_think_block_or_no_reasoning_renders_as_it_is(tokenizer, reply, expected):
    assert render(tokenizer, [QUESTION, {"role": "assistant", **reply}]).endswith(
        f"<|im_start|>assistant\n{expected}<|im_end|>\n")


def test_reasoning_on_other_turns_is_not_rendered(tokenizer):
    assert render(tokenizer, [dict(QUESTION, reasoning_content="mine")]) == render(tokenizer, [QUESTION])


def test_enable_thinking_false_closes_an_empty_think_block_after_the_generation_prompt(tokenizer):
    # transformers hands apply_chat_template's extra keyword arguments to the template as variables.
    prompt = render(tokenizer, [QUESTION], True)
    assert prompt.endswith("<|im_start|>assistant\n")
    assert render(tokenizer, [QUESTION], True, enable_thinking=True) == prompt
    assert render(tokenizer, [QUESTION], True, enable_thinking=False) == prompt + "<think>\n\n</think>\n"
    assert render(tokenizer, [QUESTION], False, enable_thinking=False) == render(tokenizer, [QUESTION])


def test_conversations_without_reasoning_render_as_before(tokenizer):
    """Prepared data, its fingerprints' meaning and the shipped samples depend on it."""
    before = copy.deepcopy(tokenizer)
    before.chat_template = CHATML_WITHOUT_REASONING
    conversations = [m for name in ("sharegpt_identity_500.json", "alpaca_seed_tasks.jsonl", "arithmetic/sft.jsonl")
                     for _, m in read_conversations(SAMPLES / name)]
    for generation_prompt in (False, True):
        assert render(tokenizer, conversations, generation_prompt) == render(before, conversations, generation_prompt)


def test_the_shipped_tokenizer_carries_the_template():
    assert load_tokenizer(str(DEFAULT_TOKENIZER)).chat_template == CHAT_TEMPLATE


# ----------------------------------------------------------------------------- spans and labels

REASONING_CONVERSATIONS = [
    [QUESTION, REPLY],
    [REPLY, QUESTION, dict(REPLY, reasoning_content="\nline one\n\nline two\n"), QUESTION],
    [{"role": "system", "content": "s"}, QUESTION, dict(REPLY, content="", reasoning_content="only thinking")],
    [QUESTION, {"role": "assistant", "content": "<think>\nin the reply\n</think>\nok"}],
]


def test_the_chatml_rule_derives_reasoning_turns_as_rendering_every_prefix_does(tokenizer):
    wheres = [f"c{i}" for i in range(len(REASONING_CONVERSATIONS))]
    rendered = chat._rendered_spans(REASONING_CONVERSATIONS, tokenizer, wheres)
    # The fast rule itself handles them (not only its fallback): reasoning data keeps its speed.
    assert [chat._chatml_spans(m) for m in REASONING_CONVERSATIONS] == rendered
    assert chat.assistant_spans_batch(REASONING_CONVERSATIONS, tokenizer, wheres) == rendered


def test_a_template_that_leaves_reasoning_out_is_an_error_naming_the_conversation(tokenizer, tmp_path):
    before = copy.deepcopy(tokenizer)  # zerotrain's template before reasoning, as older run directories carry
    before.chat_template = CHATML_WITHOUT_REASONING
    plain = [m for _, m in read_conversations(SAMPLES / "arithmetic" / "sft.jsonl")][:20]
    wheres = [f"c{i}" for i in range(len(plain))]
    assert chat.assistant_spans_batch(plain, before, wheres) == chat._rendered_spans(plain, before, wheres)
    in_reply = [REASONING_CONVERSATIONS[-1]]  # <think> inside the reply needs nothing of the template
    assert chat.assistant_spans_batch(in_reply, before, ["c"]) == chat._rendered_spans(in_reply, before, ["c"])
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [QUESTION, dict(REPLY, reasoning_content="")]}) + "\n"
                    + json.dumps({"messages": [QUESTION, REPLY]}) + "\n")
    with pytest.raises(ZerotrainError, match=rf"{path}:2: an assistant turn has reasoning_content, but the "
                                             "tokenizer's chat template leaves it out"):
        prepare("sft", [str(path)], before, tmp_path / "out", seq_len=64, show_progress=False)


def test_reasoning_content_prepares_to_labels_over_the_think_block_and_the_reply(tokenizer, tmp_path):
    path = tmp_path / "reasoning.jsonl"
    path.write_text(json.dumps({"messages": [QUESTION, REPLY]}) + "\n")
    prepare("sft", [str(path)], tokenizer, tmp_path / "prepared", seq_len=128, val_fraction=0, show_progress=False)
    [example] = SFTDataset(tmp_path / "prepared", "train", 128)
    ids, labels = example["input_ids"].tolist(), example["labels"].tolist()
    trained = [i for i, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert tokenizer.decode(trained) == "<think>\n2 + 3 = 5.\n</think>\n<answer>5</answer><|im_end|>"
    assert tokenizer.decode(ids) == render(tokenizer, [QUESTION, REPLY])


def test_sft_turns_carry_reasoning_content_and_reject_a_non_string(tmp_path):
    path = tmp_path / "chat.jsonl"
    good = {"messages": [dict(QUESTION, reasoning_content="a user's: not carried"), REPLY]}
    sharegpt = {"conversations": [{"from": "human", "value": "q"},
                                  {"from": "gpt", "value": "a", "reasoning_content": None}]}
    path.write_text(json.dumps(good) + "\n")
    [(_, messages)] = read_conversations(path)
    assert messages == [QUESTION, REPLY]
    (tmp_path / "sharegpt.json").write_text(json.dumps([sharegpt]))
    [(_, messages)] = read_conversations(tmp_path / "sharegpt.json")
    assert messages == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]  # null: none
    path.write_text(json.dumps(good) + "\n" + json.dumps({"messages": [QUESTION, dict(REPLY, reasoning_content=7)]}))
    with pytest.raises(ZerotrainError, match=rf"{path}:2: messages\[1\].reasoning_content must be a string .* not int"):
        list(read_conversations(path))
