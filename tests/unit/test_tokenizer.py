"""model/tokenizer.py: training, exact round trips, loading, chat template, fingerprints."""

import json
from pathlib import Path

import pytest
import sentencepiece
from transformers import AutoTokenizer

from common.errors import ZerotrainError
from model.tokenizer import (
    CHAT_TEMPLATE,
    load_tokenizer,
    tokenizer_fingerprint,
    train_tokenizer,
)

SAMPLES = Path(__file__).resolve().parents[2] / "data" / "samples"
MESSAGES = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "床前明月光 means?"},
    {"role": "assistant", "content": "Moonlight before my bed."},
    {"role": "user", "content": "Thanks!\n  Bye."},
    {"role": "assistant", "content": "  Bye,\nfriend. "},
]


def shakespeare_lines(n: int) -> list[str]:
    return (SAMPLES / "tinyshakespeare.txt").read_text(encoding="utf-8").split("\n")[:n]


def tang_texts(n: int) -> list[str]:
    with open(SAMPLES / "tang_poems_5k.jsonl", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line, _ in zip(f, range(n))]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "bpe"
    texts = shakespeare_lines(4000) + tang_texts(500)
    tokenizer = train_tokenizer(texts, vocab_size=1000, output_dir=str(out), show_progress=False)
    return tokenizer, out


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("spm")
    corpus = tmp / "corpus.txt"
    corpus.write_text("\n".join(shakespeare_lines(3000)), encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp / "sp"), vocab_size=500, minloglevel=2
    )
    return tmp / "sp.model"


def test_round_trip_exact(trained):
    tokenizer, _ = trained
    lines = shakespeare_lines(300) + [line for text in tang_texts(100) for line in text.split("\n")]
    lines += ["  two leading spaces", "multiple    spaces\tand a tab", "trailing  ", "\n\nnew\nlines\n"]
    lines += ["emoji 🙂, ＡＢＣ", " 床前明月光，  疑是地上霜。"]
    for line in lines:
        assert tokenizer.decode(tokenizer.encode(line, add_special_tokens=False)) == line
    whole = "\n".join(lines)
    assert tokenizer.decode(tokenizer.encode(whole, add_special_tokens=False)) == whole


def test_special_tokens(trained):
    tokenizer, _ = trained
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    # Nothing is added on encode: pretraining puts eos between documents itself.
    assert tokenizer.encode("hello") == tokenizer.encode("hello", add_special_tokens=False)
    assert tokenizer.encode("<|im_start|>hi<|im_end|>")[0] == 1
    assert len(tokenizer) == 1000


def test_saved_and_loaded(trained):
    tokenizer, out = trained
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # staging dir cleaned up
    for loaded in (AutoTokenizer.from_pretrained(out), load_tokenizer(str(out))):
        assert loaded.encode("To be, or not 明月") == tokenizer.encode("To be, or not 明月")
        assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (0, 1, 2)
        assert loaded.chat_template == CHAT_TEMPLATE
        assert loaded.model_max_length >= 2048


def test_retrain_replaces_output(tmp_path):
    out = tmp_path / "tok"
    train_tokenizer(shakespeare_lines(500), vocab_size=300, output_dir=str(out), show_progress=False)
    train_tokenizer(shakespeare_lines(500), vocab_size=400, output_dir=str(out), show_progress=False)
    assert len(load_tokenizer(str(out))) == 400
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]


def test_chat_template_chatml_and_prefix_stable(trained):
    tokenizer, _ = trained
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False)
    assert text == "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in MESSAGES)
    for i, message in enumerate(MESSAGES):
        if message["role"] == "assistant":
            prompt = tokenizer.apply_chat_template(MESSAGES[:i], tokenize=False, add_generation_prompt=True)
            full = tokenizer.apply_chat_template(MESSAGES[: i + 1], tokenize=False)
            assert prompt.endswith("<|im_start|>assistant\n")
            assert full.startswith(prompt)
            assert full[len(prompt) :] == message["content"] + "<|im_end|>\n"


def test_sentencepiece_model(sp_model):
    tokenizer = load_tokenizer(str(sp_model))
    reference = sentencepiece.SentencePieceProcessor(model_file=str(sp_model))
    for line in shakespeare_lines(200):
        assert tokenizer.encode(line, add_special_tokens=False) == reference.encode(line)
    text = "First Citizen: speak."
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    assert tokenizer.pad_token is not None  # sentencepiece has no pad by default: falls back to eos
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert tokenizer_fingerprint(tokenizer) == tokenizer_fingerprint(load_tokenizer(str(sp_model)))


def test_fingerprint(trained, sp_model):
    tokenizer, out = trained
    loaded = load_tokenizer(str(out))
    assert tokenizer_fingerprint(tokenizer) == tokenizer_fingerprint(loaded)
    assert tokenizer_fingerprint(loaded) == tokenizer_fingerprint(load_tokenizer(str(out)))
    loaded(["a", "a b c"], padding=True, truncation=True, max_length=4)  # sets padding on the backend
    assert tokenizer_fingerprint(loaded) == tokenizer_fingerprint(tokenizer)
    assert tokenizer_fingerprint(tokenizer) != tokenizer_fingerprint(load_tokenizer(str(sp_model)))
    # Another chat template renders conversations differently but maps text to the same ids.
    from model.tokenizer import CHATML_WITHOUT_REASONING

    older = load_tokenizer(str(out))
    older.chat_template = CHATML_WITHOUT_REASONING
    assert tokenizer_fingerprint(older) != tokenizer_fingerprint(loaded)
    assert tokenizer_fingerprint(older, chat_template=False) == tokenizer_fingerprint(loaded, chat_template=False)


def test_missing_path(tmp_path):
    with pytest.raises(ZerotrainError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nope"))
