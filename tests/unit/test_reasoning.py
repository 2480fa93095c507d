"""Reasoning models: `reasoning_content` and `<think>` replies through the chat template, SFT data
and labels, and `zerotrain serve`'s split of a completion into reasoning_content and content."""

from __future__ import annotations

import copy
import itertools
import json
import random
import types

import anyio
import pytest
import torch

from common.errors import ZerotrainError
from engine.apps.serve import Generator, ReasoningStream, create_app, split_reasoning
from engine.data import chat
from engine.data.conversations import SFTDataset, read_conversations
from engine.data.format import IGNORE_INDEX
from engine.data.prepare import prepare
from model.tokenizer import CHAT_TEMPLATE, CHATML_WITHOUT_REASONING, DEFAULT_TOKENIZER, load_tokenizer
from tests.helpers import SAMPLES, load_module

REASONING_SAMPLE = SAMPLES / "arithmetic" / "reasoning.jsonl"
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


def test_the_reasoning_sample_is_what_its_script_makes(tokenizer, tmp_path):
    load_module("scripts/make_arithmetic.py").build(tmp_path)
    for name in ("sft.jsonl", "prompts.jsonl", "held_out.jsonl", "reasoning.jsonl"):
        assert (tmp_path / name).read_bytes() == (SAMPLES / "arithmetic" / name).read_bytes(), name
    conversations = [m for _, m in read_conversations(REASONING_SAMPLE)]
    assert 20 <= len(conversations) <= 40
    for messages in conversations:
        reply = messages[-1]
        a, b = map(int, messages[0]["content"].removeprefix("What is ").removesuffix("?").split(" + "))
        assert reply["reasoning_content"].endswith(f"So {a} + {b} = {a + b}.")
        assert reply["content"] == f"<answer>{a + b}</answer>"
        assert chat._chatml_spans(messages) is not None


# ----------------------------------------------------------------------------- serve: the split

SPLITS = [
    # (completion, prompt opened the block, (reasoning_content, content))
    ("<think>\nadd 2 and 3\n</think>\nThe answer is 5.", False, ("add 2 and 3", "The answer is 5.")),
    ("<think>\n\nr\n\n</think>\n\nc\n", False, ("r", "c\n")),  # Qwen3's blank lines
    ("<think></think>c", False, ("", "c")),
    ("<think>\n\n</think>\n", False, ("", "")),
    ("<think>\nstill thinking when the tokens ran out", False, ("still thinking when the tokens ran out", "")),
    ("<think>a </thin", False, ("a </thin", "")),
    ("<think>a</think>b</think>c", False, ("a", "b</think>c")),  # the first close ends the block
    ("The answer is 5.", False, (None, "The answer is 5.")),
    ("\n<think>x</think>y", False, (None, "\n<think>x</think>y")),  # not leading: content, unchanged
    ("<thin", False, (None, "<thin")),
    ("", False, (None, "")),
    ("<", False, (None, "<")),
    ("reasoning without the tag\n</think>\nanswer", True, ("reasoning without the tag", "answer")),  # DeepSeek-R1
    ("no close", True, ("no close", "")),
    ("", True, ("", "")),
]


@pytest.mark.parametrize("text, opened, expected", SPLITS)
def test_split_reasoning(text, opened, expected):
    assert split_reasoning(text, opened) == expected


def streamed(pieces: list[str], opened: bool) -> tuple[str | None, str]:
    """What a client reassembles from the deltas a stream of `pieces` gives."""
    stream = ReasoningStream(opened)
    deltas = [d for piece in pieces for d in stream.feed(piece)] + stream.feed("", final=True)
    kinds = [key for d in deltas for key in d]
    assert kinds == sorted(kinds, key=lambda k: k != "reasoning_content"), "reasoning after content"
    assert all(len(d) == 1 and next(iter(d.values())) for d in deltas), "an empty or mixed delta"
    reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
    return (reasoning if "reasoning_content" in kinds else None), "".join(d.get("content", "") for d in deltas)


def none_if_empty(split: tuple[str | None, str]) -> tuple[str | None, str]:
    # A stream sends no delta for empty reasoning: the client cannot tell it from none.
    return (split[0] or None), split[1]


@pytest.mark.parametrize("text, opened, expected", SPLITS)
def test_a_stream_split_anywhere_gives_the_whole_text_split(text, opened, expected):
    cuts = range(len(text) + 1)
    for points in itertools.chain(itertools.combinations(cuts, 1), itertools.combinations(cuts, 2)):
        bounds = [0, *points, len(text)]
        pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
        assert streamed(pieces, opened) == none_if_empty(expected), pieces


def test_a_stream_in_random_pieces_gives_the_whole_text_split():
    rng = random.Random(0)
    alphabet = ["<think>", "</think>", "<", "/", "think", ">", "\n", "a", "b ", "\n\n"]
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(12)))
        opened = rng.random() < 0.2
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randrange(1, 6))))
        bounds = [0, *cuts, len(text)]
        pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
        assert streamed(pieces, opened) == none_if_empty(split_reasoning(text, opened)), pieces


# ----------------------------------------------------------------------------- serve: the app

class ScriptedModel(torch.nn.Module):
    """Answers every prompt with `reply` then eos, token by token to the streamer as generate does;
    keeps the prompts it was given."""

    def __init__(self, tokenizer, reply: str):
        super().__init__()
        self.config = types.SimpleNamespace(max_position_embeddings=1024)
        self.device = torch.device("cpu")
        self.tokenizer, self.reply, self.prompts = tokenizer, reply, []

    def generate(self, input_ids: torch.Tensor, streamer=None, **kwargs) -> torch.Tensor:
        self.prompts.append(self.tokenizer.decode(input_ids[0]))
        new = self.tokenizer.encode(self.reply, add_special_tokens=False) + [self.tokenizer.eos_token_id]
        if streamer is not None:
            streamer.put(input_ids)
            for token in new:
                streamer.put(torch.tensor([token]))
            streamer.end()
        return torch.cat([input_ids, torch.tensor([new])], dim=1)


def post(app, path: str, body: dict) -> tuple[int, bytes]:
    """Status and body of a POST to the ASGI `app`, in process."""
    sent: list[dict] = []

    async def receive() -> dict:
        if not sent and not receive.asked:
            receive.asked = True
            return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
        await anyio.sleep_forever()  # the client stays: a response may listen for it leaving

    receive.asked = False

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
             "headers": [(b"content-type", b"application/json")], "client": ("test", 1), "server": ("test", 80)}
    anyio.run(app, scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def serve_app(tokenizer, reply: str):
    model = ScriptedModel(tokenizer, reply)
    return create_app(Generator(model, tokenizer, "scripted")), model


def events(body: bytes) -> list[dict]:
    lines = [line.removeprefix("data: ") for line in body.decode().split("\n\n") if line]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


REASONING_REPLY = "<think>\nadd 2 and 3: 5\n</think>\nThe answer is 5."


def test_serve_returns_reasoning_content_apart_from_content(tokenizer):
    app, _ = serve_app(tokenizer, REASONING_REPLY)
    status, body = post(app, "/v1/chat/completions", {"messages": [QUESTION]})
    assert status == 200, body
    assert json.loads(body)["choices"][0]["message"] == {"role": "assistant", "content": "The answer is 5.",
                                                        "reasoning_content": "add 2 and 3: 5"}
    status, body = post(app, "/v1/completions", {"prompt": "q", "max_tokens": 64})
    assert json.loads(body)["choices"][0]["text"] == REASONING_REPLY  # raw completions are not split


def test_serve_streams_reasoning_deltas_then_content_deltas(tokenizer):
    app, _ = serve_app(tokenizer, REASONING_REPLY)
    status, body = post(app, "/v1/chat/completions", {"messages": [QUESTION], "stream": True})
    assert status == 200
    deltas = [e["choices"][0]["delta"] for e in events(body)]
    assert deltas[0] == {"role": "assistant", "content": ""} and deltas[-1] == {}
    kinds = [key for d in deltas[1:-1] for key in d]
    assert kinds == sorted(kinds, key=lambda k: k != "reasoning_content") and len(set(kinds)) == 2
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "add 2 and 3: 5"
    assert "".join(d.get("content", "") for d in deltas) == "The answer is 5."


def test_serve_leaves_a_reply_without_a_think_block_as_it_is(tokenizer):
    app, _ = serve_app(tokenizer, "Five.")
    _, body = post(app, "/v1/chat/completions", {"messages": [QUESTION]})
    assert json.loads(body)["choices"][0]["message"] == {"role": "assistant", "content": "Five."}
    _, body = post(app, "/v1/chat/completions", {"messages": [QUESTION], "stream": True})
    deltas = [e["choices"][0]["delta"] for e in events(body)]
    assert all(list(d) == ["content"] for d in deltas[1:-1])
    assert "".join(d["content"] for d in deltas[1:-1]) == "Five."


def test_serve_renders_request_reasoning_and_chat_template_kwargs(tokenizer):
    app, model = serve_app(tokenizer, "Five.")
    history = [QUESTION, {"role": "assistant", "content": "5", "reasoning_content": "2 + 3"}, QUESTION]
    status, _ = post(app, "/v1/chat/completions", {"messages": history,
                                                   "chat_template_kwargs": {"enable_thinking": False}})
    assert status == 200
    assert model.prompts[-1] == render(tokenizer, history, True, enable_thinking=False)
    assert "<think>\n2 + 3\n</think>\n5" in model.prompts[-1]
    assert model.prompts[-1].endswith("<|im_start|>assistant\n<think>\n\n</think>\n")
    status, body = post(app, "/v1/chat/completions",
                        {"messages": [QUESTION], "chat_template_kwargs": {"tokenize": True}})
    assert status == 400 and json.loads(body)["error"]["param"] == "chat_template_kwargs"


def test_serve_splits_a_completion_whose_prompt_opened_the_think_block(tokenizer):
    opening = copy.deepcopy(tokenizer)  # DeepSeek-R1's template ends its generation prompt with "<think>\n"
    opening.chat_template = CHAT_TEMPLATE.replace("'<|im_start|>assistant\\n' }}",
                                                  "'<|im_start|>assistant\\n<think>\\n' }}")
    assert opening.chat_template != CHAT_TEMPLATE
    model = ScriptedModel(opening, "add them\n</think>\n5")
    app = create_app(Generator(model, opening, "scripted"))
    _, body = post(app, "/v1/chat/completions", {"messages": [QUESTION]})
    assert model.prompts[-1].endswith("<think>\n")
    assert json.loads(body)["choices"][0]["message"]["reasoning_content"] == "add them"
