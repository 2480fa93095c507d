"""What a newcomer runs first works as given: a short pretraining smoke run from scratch, with no
--tokenizer (zerotrain's shipped default, named in the log) and no --warmup-steps (a default that
fits 16 steps)."""

from __future__ import annotations

import pytest

from tests.helpers import SAMPLES, metrics, run_launcher

pytestmark = pytest.mark.system


def test_the_readme_smoke_run_trains_as_given(tmp_path):
    from transformers import AutoTokenizer

    from model.tokenizer import DEFAULT_TOKENIZER

    out = tmp_path / "x"
    proc = run_launcher("pretrain.py", ["--preset", "debug", "--data", str(SAMPLES / "tinyshakespeare.txt"),
                                        "--output-dir", str(out), "--max-steps", "16",
                                        "--data-cache-dir", str(tmp_path / "cache")], nproc=1, launcher="python")
    assert f"tokenizer {DEFAULT_TOKENIZER}: 6400 tokens (zerotrain's default" in proc.stdout
    steps = [r for r in metrics(out) if "loss" in r]
    assert steps[-1]["step"] == 16 and steps[-1]["loss"] < steps[0]["loss"]
    assert len(AutoTokenizer.from_pretrained(out / "final")) == 6400  # the run carries the tokenizer it used


def test_the_shipped_tokenizer_round_trips_english_and_chinese_with_pieces_of_its_own():
    from model.tokenizer import DEFAULT_TOKENIZER, load_tokenizer

    tokenizer = load_tokenizer(str(DEFAULT_TOKENIZER))
    for text in ("To be, or not to be: that is the question.", "床前明月光，疑是地上霜。"):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
        assert len(ids) < len(text.encode())  # merged pieces, not bytes
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False).startswith("<|im_start|>")
