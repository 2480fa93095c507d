"""The pretrain data kind: documents of .txt/.jsonl/.parquet files, tokenized once (the fast
tokenizer's encode_batch over chunks of a few MB of text, so memory does not grow with the
corpus), an EOS after every document, into one flat token stream per split; trained on as
fixed-length windows of it."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from common.errors import ZerotrainError
from engine.data.chat import fast_backend
from engine.data.files import ReadStats, check_input, json_records, read_lines
from engine.data.format import open_tokens, read_meta, token_dtype
from engine.data.writer import SplitWriter, is_val, text_chunks

PRETRAIN_SUFFIXES = (".txt", ".jsonl", ".parquet")


def read_documents(path: str | Path, skip_bad_lines: bool = False, stats: ReadStats | None = None,
                   on_bytes: Callable[[int], None] | None = None) -> Iterator[str]:
    """Pretraining documents of one file.

    `.txt`: paragraphs (blank-line separated); `.jsonl`: `{"text": ...}` a line (MiniMind's
    format); `.parquet`: the `text` column. `on_bytes` counts the bytes read (json_records).
    """
    path = check_input(path, PRETRAIN_SUFFIXES, "pretraining")
    stats = stats if stats is not None else ReadStats()
    if path.suffix == ".txt":
        paragraph: list[str] = []
        previous = 0
        for lineno, line in read_lines(path, skip_bad_lines, stats, on_bytes):
            if paragraph and lineno > previous + 1:
                yield "".join(paragraph).rstrip("\n")
                paragraph = []
            paragraph.append(line)
            previous = lineno
        if paragraph:
            yield "".join(paragraph).rstrip("\n")
        return
    for where, record in json_records(path, skip_bad_lines, stats, on_bytes):
        text = record.get("text") if isinstance(record, dict) else None
        if isinstance(text, str) and text.strip():
            yield text
            continue
        if skip_bad_lines:
            stats.bad_lines += 1
            continue
        if not isinstance(record, dict) or "text" not in record:
            found = sorted(record) if isinstance(record, dict) else type(record).__name__
            problem = f"no \"text\" field (found {found})"
        elif not isinstance(text, str):
            problem = f"\"text\" is {type(text).__name__}, not a string"
        else:
            problem = "empty document"
        raise ZerotrainError(f"{where}: {problem}; pretraining records need a non-empty \"text\" "
                             "string (or pass --skip-bad-lines to skip and count them)")


# Pretraining documents per encode_batch call: at most this many, and at most this many characters
# (one document longer than that goes alone). A few MB of text keeps every core of the tokenizer
# busy, and holds the chunk's encodings (about 100 bytes a token) to a few hundred MB at most.
# Pretraining documents per encode_batch call: at most this many, and at most this many characters
# (one document longer than that goes alone). A few MB of text keeps every core of the tokenizer
# busy, and holds the chunk's encodings (about 100 bytes a token) to a few hundred MB at most.
PRETRAIN_CHUNK_DOCS = 16384
PRETRAIN_CHUNK_CHARS = 1 << 21


def write_pretrain(inputs: list[str], tokenizer, out: Path, *, val_fraction: float, skip_bad_lines: bool,
                   stats: ReadStats, progress, seq_len: int = 0, columns: None = None,
                   num_proc: int = 1) -> dict[str, dict[str, int]]:
    """engine.data.prepare's writer for kind "pretrain": the documents of `inputs` tokenized chunk
    by chunk (the Rust tokenizer's own threads), straight to the split's token file; nothing is
    kept between chunks, so memory does not depend on the corpus size. The stream is cut into
    windows when read, so `seq_len` does not matter here; pretraining text takes no --columns."""
    backend = fast_backend(tokenizer)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ZerotrainError("the tokenizer has no eos token; pretraining puts one between documents")
    dtype = token_dtype(len(tokenizer))
    writers = {s: SplitWriter(out, s, dtype, sft=False) for s in ("train", "val")}
    read = told = 0

    def count(nbytes: int) -> None:
        nonlocal read
        read += nbytes

    documents = (doc for path in inputs for doc in read_documents(path, skip_bad_lines, stats, count))
    index = 0
    for chunk in text_chunks(documents, PRETRAIN_CHUNK_DOCS, PRETRAIN_CHUNK_CHARS):
        split_docs: dict[str, list[str]] = {"train": [], "val": []}
        for doc in chunk:
            split_docs["val" if is_val(index, val_fraction) else "train"].append(doc)
            index += 1
        tokens = 0
        for split, docs in split_docs.items():
            if docs:
                encoded = backend.encode_batch(docs, add_special_tokens=False)
                ids = np.concatenate([np.asarray(e.ids + [eos], dtype=dtype) for e in encoded])
                del encoded
                writers[split].add_stream(ids, len(docs))
                tokens += len(ids)
        progress(len(chunk), read - told, tokens)
        told = read
    if index == 0:
        raise ZerotrainError(f"no documents in {', '.join(inputs)}")
    progress(0, read - told)  # what the last chunk's reader read after its last document
    return {s: w.close() for s, w in writers.items()}


def document_positions(input_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Positions that restart at 0 after every `eos_id` (along the last dimension).

    Passed without an attention_mask, these make transformers build a block-diagonal causal mask
    (and flash-attention's varlen path), so each document attends to itself only, as in Llama 3's
    pretraining. Labels stay as they are: the token after an end-of-document is still predicted
    from that document, exactly the targets an unmasked window trains on.
    """
    index = torch.arange(input_ids.shape[-1]).expand_as(input_ids)
    starts = torch.zeros_like(index)
    starts[..., 1:] = torch.where(input_ids[..., :-1] == eos_id, index[..., 1:], 0)
    return index - starts.cummax(dim=-1).values


class PretrainDataset(torch.utils.data.Dataset):
    """Fixed-length windows of `seq_len` tokens over a split's token stream (labels = inputs;
    transformers shifts them inside the model).

    With `document_eos` (--document-mask) each window also carries position_ids that restart
    after every end-of-document token, so the documents a window holds neither attend to each
    other nor see a position they never had on their own (document_positions).
    """

    def __init__(self, directory: str | Path, split: str, seq_len: int, document_eos: int | None = None):
        self.directory, self.seq_len, self.document_eos = Path(directory), seq_len, document_eos
        self.meta = read_meta(directory)
        if self.meta["kind"] != "pretrain":
            raise ZerotrainError(f"{directory} holds {self.meta['kind']} data, not pretraining data")
        self.tokens = open_tokens(self.directory, split, self.meta)

    def __len__(self) -> int:
        return len(self.tokens) // self.seq_len

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        window = torch.from_numpy(self.tokens[i * self.seq_len:(i + 1) * self.seq_len].astype(np.int64))
        if self.document_eos is not None:
            return {"input_ids": window, "labels": window, "position_ids": document_positions(window, self.document_eos)}
        return {"input_ids": window, "labels": window}
