"""Preparation at scale: the work is cut into chunks of bounded size, the result does not depend
on where the cuts fall, nothing is kept per example in memory, and the progress bar accounts
for every input byte (scripts/bench/prep_memory.py measures the memory itself)."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common.errors import ZerotrainError
from engine.data import conversations, text, writer
from engine.data.files import ReadStats
from engine.data.prepare import prepare
from engine.data.writer import PrepareProgress
from tests.helpers import SAMPLES


def write_jsonl(path, records, trailer=""):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records) + trailer, encoding="utf-8")
    return path


def test_text_chunks_keep_order_and_their_bounds():
    texts = ["a" * n for n in (3, 5, 1, 9, 20, 2, 2, 2, 2)]
    chunks = list(writer.text_chunks(texts, max_texts=3, max_chars=10))
    assert [t for c in chunks for t in c] == texts
    assert all(len(c) <= 3 for c in chunks)
    # Over the character bound only where one text alone is longer than it.
    assert all(sum(map(len, c)) <= 10 or len(c) == 1 for c in chunks)
    assert [len(c) for c in chunks] == [3, 1, 1, 3, 1]


def test_pretrain_tokens_do_not_depend_on_the_chunk_size(tokenizer, tmp_path, monkeypatch):
    src = [str(SAMPLES / "tang_poems_5k.jsonl")]
    whole = prepare("pretrain", src, tokenizer, tmp_path / "whole", val_fraction=0.1, show_progress=False)
    monkeypatch.setattr(text, "PRETRAIN_CHUNK_CHARS", 500)
    monkeypatch.setattr(text, "PRETRAIN_CHUNK_DOCS", 7)
    cut = prepare("pretrain", src, tokenizer, tmp_path / "cut", val_fraction=0.1, show_progress=False)
    assert cut["splits"] == whole["splits"]
    for split in ("train", "val"):
        assert (tmp_path / "cut" / f"{split}.bin").read_bytes() == (tmp_path / "whole" / f"{split}.bin").read_bytes()


@pytest.mark.parametrize("num_proc", [1, pytest.param(2, marks=pytest.mark.slow)])  # 2: worker processes
def test_progress_counts_every_input_byte_document_and_token(tokenizer, tmp_path, monkeypatch, num_proc):
    monkeypatch.setattr(text, "PRETRAIN_CHUNK_DOCS", 50)
    monkeypatch.setattr(conversations, "SFT_CHUNK", 40)  # several chunks, so that workers run ahead of the writer
    docs = write_jsonl(tmp_path / "a.jsonl", [{"text": f"document {i} " * (i % 7 + 1)} for i in range(230)],
                       trailer="\n\n")  # blank lines after the last document are read too
    table = tmp_path / "b.parquet"  # read in batches of 4096 rows: the file's bytes are shared out by rows
    pq.write_table(pa.table({"text": [f"row {i}" for i in range(5000)]}), table)
    pretrain = [str(docs), str(SAMPLES / "tinyshakespeare.txt"), str(table)]
    progress = PrepareProgress("pretrain", "docs", pretrain, show=False)
    splits = text.write_pretrain(pretrain, tokenizer, tmp_path, val_fraction=0.1, skip_bad_lines=False, stats=ReadStats(),
                                  progress=progress)
    assert progress.bytes == progress.bar.total == sum(os.path.getsize(p) for p in pretrain)
    assert progress.items == sum(s["documents"] for s in splits.values())
    assert progress.tokens == sum(s["tokens"] for s in splits.values())

    chats = write_jsonl(tmp_path / "c.jsonl", [{"instruction": f"q{i}", "output": f"answer {i}"} for i in range(150)],
                        trailer="\n")
    sft = [str(chats), str(SAMPLES / "sharegpt_identity_500.json")]  # .jsonl read by line, .json at once
    out = tmp_path / "sft"
    out.mkdir()
    progress = PrepareProgress("sft", "convs", sft, show=False)
    splits = conversations.write_sft(sft, tokenizer, out, seq_len=512, val_fraction=0.1, skip_bad_lines=False,
                                     stats=ReadStats(), progress=progress, columns=None, num_proc=num_proc)
    assert progress.bytes == progress.bar.total == sum(os.path.getsize(p) for p in sft)
    assert progress.tokens == sum(s["tokens"] for s in splits.values())
    assert progress.items == 150 + len(json.loads((SAMPLES / "sharegpt_identity_500.json").read_text()))


def test_example_offsets_are_streamed_to_the_index_file(tokenizer, tmp_path):
    groups = [[([1] * n, [-100] * (n - 1) + [1])] for n in (3, 1, 4, 1, 5)]
    splits, _ = writer.write_examples(groups, tokenizer, tmp_path, val_fraction=0.0)
    assert splits["train"] == {"tokens": 14, "examples": 5}
    assert np.load(tmp_path / "train.idx.npy").tolist() == [0, 3, 4, 8, 9, 14]
    assert np.load(tmp_path / "val.idx.npy").tolist() == [0]
    assert not list(tmp_path.glob("*.tmp"))


def test_parquet_rows_are_numbered_across_read_batches(tmp_path):
    texts = ["x"] * 5000  # read 4096 rows at a time
    texts[4500] = ""
    pq.write_table(pa.table({"text": texts}), tmp_path / "r.parquet")
    with pytest.raises(ZerotrainError, match="row 4501: empty document"):
        list(text.read_documents(tmp_path / "r.parquet"))
