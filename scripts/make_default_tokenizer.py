"""Build the tokenizer zerotrain ships (model/default_tokenizer/): what a run from scratch uses
when no --tokenizer is given, as MiniMind ships its own.

    .venv/bin/python scripts/make_default_tokenizer.py

A byte-level BPE of 6400 tokens (MiniMind's size) with zerotrain's special tokens and ChatML
template (model.tokenizer.train_tokenizer), trained on every shipped sample file
(data/samples/README.md): Shakespeare and Tang poems as text, the ShareGPT and Alpaca
conversations as their turns, so English and Chinese both get pieces of their own. Every byte is
in the alphabet, so any text round-trips.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.data.conversations import read_conversations
from engine.data.text import read_documents
from model.tokenizer import DEFAULT_TOKENIZER, train_tokenizer  # noqa: E402

SAMPLES = ROOT / "data" / "samples"
VOCAB_SIZE = 6400


def texts() -> Iterator[str]:
    for name in ("tinyshakespeare.txt", "tang_poems_5k.jsonl"):
        yield from read_documents(SAMPLES / name)
    for name in ("sharegpt_identity_500.json", "alpaca_seed_tasks.jsonl"):
        for _, messages in read_conversations(SAMPLES / name):
            yield from (turn["content"] for turn in messages)


def main() -> None:
    tokenizer = train_tokenizer(texts(), VOCAB_SIZE, str(DEFAULT_TOKENIZER), show_progress=False)
    print(f"{DEFAULT_TOKENIZER}: {len(tokenizer)} tokens")


if __name__ == "__main__":
    main()
