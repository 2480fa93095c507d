"""Shared fixtures: one small tokenizer for the whole session, trained on the shipped samples."""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "data" / "samples"


def sample_texts(english_lines: int = 4000, poems: int = 1500) -> list[str]:
    """A slice of the English and Chinese samples, as documents."""
    with open(SAMPLES / "tinyshakespeare.txt", encoding="utf-8") as f:
        english = "".join(islice(f, english_lines)).split("\n\n")
    with open(SAMPLES / "tang_poems_5k.jsonl", encoding="utf-8") as f:
        chinese = [json.loads(line)["text"] for line in islice(f, poems)]
    return english + chinese


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    from model.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer(sample_texts(), vocab_size=1000, output_dir=str(out), show_progress=False)
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from model.tokenizer import load_tokenizer

    return load_tokenizer(str(tokenizer_dir))


@pytest.fixture(scope="session")
def pretrain_data(tokenizer, tmp_path_factory) -> Path:
    """Prepared pretraining tokens (a slice of the English and Chinese samples), shared by every run."""
    from engine.data.prepare import prepare

    tmp = tmp_path_factory.mktemp("pretrain")
    src = tmp / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in sample_texts(2000, 600)))
    prepare("pretrain", [str(src)], tokenizer, tmp / "prepared", val_fraction=0.05, show_progress=False)
    return tmp / "prepared"


@pytest.fixture(scope="session")
def base_model_dir(tokenizer, tmp_path_factory) -> Path:
    """A debug-preset model with a little structure in it, saved in HF format with the tokenizer."""
    import torch

    from model.build import build_model

    torch.manual_seed(0)
    model = build_model("debug", vocab_size=len(tokenizer))
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.config, name, getattr(tokenizer, name))
    out = tmp_path_factory.mktemp("base") / "model"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
