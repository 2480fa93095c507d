"""zerotrain extend-tokenizer: new text's pieces appended to a byte-level BPE or a sentencepiece
model, every old id kept, the new text encoded in fewer tokens."""

from __future__ import annotations

import io
import json
from itertools import islice

import pytest

from common.errors import ZerotrainError
from tests.helpers import SAMPLES


def poems(count: int, skip: int = 0) -> list[str]:
    """Tang poems from the shipped sample (Chinese), past the ones the session tokenizer saw."""
    with open(SAMPLES / "tang_poems_5k.jsonl", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in islice(f, skip, skip + count)]


def tokens_per_char(tokenizer, texts: list[str]) -> float:
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return sum(map(len, ids)) / sum(map(len, texts))


def assert_keeps_ids(base, extended) -> None:
    """Every token of the base encodes to its own id in the extended tokenizer, and the new ones follow."""
    vocab = base.get_vocab()
    assert [extended.convert_tokens_to_ids(token) for token in vocab] == list(vocab.values())
    new = set(extended.get_vocab().values()) - set(vocab.values())
    assert min(new) == len(base)


def test_byte_level_bpe_extension(tokenizer, tokenizer_dir, tmp_path, capsys):
    from engine.apps.cli import main
    from model.tokenizer import load_tokenizer

    text = poems(300, skip=3000)
    (tmp_path / "poems.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in text))
    out = tmp_path / "extended"
    assert main(["extend-tokenizer", "--base", str(tokenizer_dir), "--input", str(tmp_path / "poems.jsonl"),
                 "--add-vocab", "300", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    extended = load_tokenizer(str(out))
    assert 0 < len(extended) - len(tokenizer) <= 300
    assert f"tokenizer with {len(extended)} tokens" in printed and "tokens per character of the input" in printed
    assert_keeps_ids(tokenizer, extended)
    assert tokens_per_char(extended, text) < 0.9 * tokens_per_char(tokenizer, text)
    # special tokens, chat template and exact round trips kept
    assert extended.special_tokens_map == tokenizer.special_tokens_map
    assert extended.chat_template == tokenizer.chat_template
    assert all(extended.decode(extended.encode(t)) == t for t in text[:20] + ["Hello, my lord.\n"])
    # an English text the new merges do not touch encodes as before
    assert extended.encode("Hello, my good lord.") == tokenizer.encode("Hello, my good lord.")


def train_sentencepiece(byte_fallback: bool = True):
    """A tiny unigram sentencepiece model of a few KB of English (no Chinese piece in it)."""
    import sentencepiece

    with open(SAMPLES / "tinyshakespeare.txt", encoding="utf-8") as f:
        lines = [line for line in islice(f, 600) if line.strip()]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=400,
                                             byte_fallback=byte_fallback, hard_vocab_limit=False, minloglevel=2)
    return model.getvalue()


def test_sentencepiece_extension(tmp_path):
    import sentencepiece

    from model.tokenizer import extend_tokenizer, load_tokenizer

    (tmp_path / "base.model").write_bytes(train_sentencepiece())
    text = poems(80)
    done = extend_tokenizer(str(tmp_path / "base.model"), text, 2000, str(tmp_path / "extended"))
    base_sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "base.model"))
    new_sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "extended" / "tokenizer.model"))
    assert 0 < done.added <= 2000 and new_sp.get_piece_size() == base_sp.get_piece_size() + done.added
    assert [new_sp.piece_to_id(base_sp.id_to_piece(i)) for i in range(base_sp.get_piece_size())] == \
        list(range(base_sp.get_piece_size()))
    base, extended = load_tokenizer(str(tmp_path / "base.model")), load_tokenizer(str(tmp_path / "extended"))
    assert_keeps_ids(base, extended)
    assert done.tokens_after < 0.6 * done.tokens_before
    assert tokens_per_char(extended, text) == done.tokens_after / done.characters
    # the HF directory and sentencepiece itself agree on the new pieces
    line = text[5].splitlines()[1]
    assert extended.encode(line, add_special_tokens=False) == new_sp.encode(line)
    assert base.encode("Good morrow, my lord.") == extended.encode("Good morrow, my lord.")


def test_non_prefix_tokenizer_detected(tokenizer, tmp_path):
    from model.tokenizer import id_changes, train_tokenizer

    other = train_tokenizer(poems(300), vocab_size=1100, output_dir=str(tmp_path / "other"), show_progress=False)
    changed = id_changes(tokenizer, other)
    assert changed and len(changed) < len(tokenizer)
    assert id_changes(tokenizer, tokenizer) == []


def test_refusals_leave_the_output_alone(tokenizer_dir, tmp_path):
    from model.tokenizer import extend_tokenizer, load_tokenizer

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("earlier output")
    (tmp_path / "base.model").write_bytes(train_sentencepiece(byte_fallback=False))
    with pytest.raises(ZerotrainError, match="--add-vocab must be a positive"):
        extend_tokenizer(str(tokenizer_dir), poems(5), 0, str(out))
    with pytest.raises(ZerotrainError, match="no text"):
        extend_tokenizer(str(tokenizer_dir), ["  ", ""], 10, str(out))
    # sentencepiece needs a piece for every character of the new text
    with pytest.raises(ZerotrainError, match="could not learn 10 pieces .*Vocabulary size is smaller"):
        extend_tokenizer(str(tmp_path / "base.model"), poems(50), 10, str(out))
    # an HF directory that is no byte-level BPE (sentencepiece's unigram converted)
    load_tokenizer(str(tmp_path / "base.model")).save_pretrained(tmp_path / "unigram")
    with pytest.raises(ZerotrainError, match="Unigram model .*pass its tokenizer.model"):
        extend_tokenizer(str(tmp_path / "unigram"), poems(5), 10, str(out))
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_the_model_grows_only_for_an_extension_of_its_own_tokenizer(tokenizer, tokenizer_dir, tmp_path):
    import torch

    from engine.checkpoint.run_dir import Resolved
    from engine.training.init_from import fit_vocabulary
    from model.build import build_model
    from model.tokenizer import extend_tokenizer

    extended = extend_tokenizer(str(tokenizer_dir), poems(100, skip=3000), 50, str(tmp_path / "extended")).tokenizer
    model = build_model("debug", vocab_size=len(tokenizer))
    before = model.get_input_embeddings().weight.detach().clone()
    with pytest.raises(ZerotrainError, match="no tokenizer of its own beside it"):
        fit_vocabulary(model, extended, Resolved("hf", tmp_path / "model", None))
    assert fit_vocabulary(model, tokenizer, Resolved("hf", tmp_path / "model", None)) is model  # fits already
    fit_vocabulary(model, extended, Resolved("hf", tmp_path / "model", tokenizer_dir))
    grown = model.get_input_embeddings().weight
    assert grown.shape[0] == len(extended) == model.config.vocab_size
    assert torch.equal(grown[:len(tokenizer)], before) and model.get_output_embeddings().weight is grown
