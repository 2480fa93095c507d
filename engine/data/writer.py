"""Writing a prepared directory's token files: one split writer per split, examples or token
streams appended in order (every k-th document, conversation or pair to validation), memory flat
whatever the input size; the progress bar; and an ordered map over worker processes for the
kinds whose encoding pays for them."""

from __future__ import annotations

import os
import shutil
import time
from collections import deque
from itertools import chain, islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from common.errors import ZerotrainError
from engine.data.format import IGNORE_INDEX, token_dtype


class SplitWriter:
    """Appends tokens (and SFT/pref masks and offsets) of one split to files in a directory.
    The offsets go to a scratch file too, not a list, so memory stays flat however many examples
    there are; close() turns them into the .npy file."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, sft: bool):
        self.dtype, self.sft, self.count, self.examples = dtype, sft, 0, 0
        self.tokens = open(directory / f"{split}.bin", "wb")
        self.mask = open(directory / f"{split}.mask.bin", "wb") if sft else None
        self.idx_path = directory / f"{split}.idx.npy"
        self.ends = open(directory / f"{split}.idx.tmp", "w+b") if sft else None

    def add_stream(self, ids: np.ndarray, documents: int) -> None:
        self.tokens.write(ids.astype(self.dtype, copy=False).tobytes())
        self.count += len(ids)
        self.examples += documents

    def add_example(self, ids: list[int], labels: list[int]) -> None:
        self.tokens.write(np.asarray(ids, dtype=self.dtype).tobytes())
        self.mask.write((np.asarray(labels) != IGNORE_INDEX).astype(np.uint8).tobytes())
        self.count += len(ids)
        self.examples += 1
        self.ends.write(np.int64(self.count).tobytes())

    def close(self) -> dict[str, int]:
        self.tokens.close()
        if self.sft:
            self.mask.close()
            # The .npy header (its shape is known only now), the leading 0, then the ends as written.
            with open(self.idx_path, "wb") as f:
                np.lib.format.write_array_header_1_0(
                    f, {"descr": np.lib.format.dtype_to_descr(np.dtype("<i8")), "fortran_order": False,
                        "shape": (self.examples + 1,)})
                f.write(np.zeros(1, dtype="<i8").tobytes())
                self.ends.seek(0)
                shutil.copyfileobj(self.ends, f)
            self.ends.close()
            os.remove(self.ends.name)
        return {"tokens": self.count, ("examples" if self.sft else "documents"): self.examples}


def chunks(iterable: Iterable, size: int) -> Iterator[list]:
    """Lists of `size` items of `iterable` in order (the last one shorter)."""
    it = iter(iterable)
    while chunk := list(islice(it, size)):
        yield chunk


def text_chunks(texts: Iterable[str], max_texts: int, max_chars: int) -> Iterator[list[str]]:
    """Lists of at most `max_texts` texts and, unless one text alone is longer, `max_chars`
    characters: a bound on the memory of one chunk's encodings (the tokenizer holds about 100
    bytes a token) whether documents are tweets or books."""
    chunk: list[str] = []
    chars = 0
    for text in texts:
        if chunk and (len(chunk) == max_texts or chars + len(text) > max_chars):
            yield chunk
            chunk, chars = [], 0
        chunk.append(text)
        chars += len(text)
    if chunk:
        yield chunk


def is_val(index: int, val_fraction: float) -> bool:
    """Every k-th document or conversation goes to validation (deterministic, spread over files)."""
    return val_fraction > 0 and index % max(2, round(1 / val_fraction)) == 1


def write_examples(groups: Iterable[list[tuple[list[int], list[int]]]], tokenizer, out: Path,
                   val_fraction: float) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """Write groups of (input_ids, labels) examples (a conversation; a pair's chosen and rejected
    sequences) in order; every k-th group goes to validation. Returns the splits' counts and the
    number of groups in each split."""
    dtype = token_dtype(len(tokenizer))
    writers = {s: SplitWriter(out, s, dtype, sft=True) for s in ("train", "val")}
    groups_in = {"train": 0, "val": 0}
    for index, group in enumerate(groups):
        split = "val" if is_val(index, val_fraction) else "train"
        for ids, labels in group:
            writers[split].add_example(ids, labels)
        groups_in[split] += 1
    return {s: w.close() for s, w in writers.items()}, groups_in


class PrepareProgress:
    """The preparation's progress bar: input bytes read out of the inputs' total size (so it has
    an end, and its rate is MB/s), with the documents or conversations done, the tokens written
    and tokens/s after it. Writers call it once a chunk, as progress(items, nbytes, tokens);
    with by_bytes=False the bar counts items instead (writers that do not report bytes)."""

    def __init__(self, kind: str, unit: str, inputs: Iterable[str | Path], show: bool, by_bytes: bool = True):
        from tqdm import tqdm

        self.unit, self.by_bytes = unit, by_bytes
        self.items = self.bytes = self.tokens = 0
        self.start = time.perf_counter()
        if by_bytes:
            self.bar = tqdm(desc=f"prepare {kind}", total=sum(Path(p).stat().st_size for p in inputs), unit="B",
                            unit_scale=True, disable=not show)
        else:
            self.bar = tqdm(desc=f"prepare {kind}", unit=f" {self.unit}", disable=not show)

    def __call__(self, items: int, nbytes: int = 0, tokens: int = 0) -> None:
        self.items += items
        self.bytes += nbytes
        self.tokens += tokens
        if self.by_bytes:
            rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
            self.bar.set_postfix_str(f"{self.items:,} {self.unit}, {self.bar.format_sizeof(self.tokens)} tokens, "
                                     f"{self.bar.format_sizeof(rate)} tokens/s", refresh=False)
        self.bar.update(nbytes if self.by_bytes else items)

    def close(self) -> None:
        self.bar.close()


_worker_tokenizer = None  # set in each worker process of ordered_map


def _init_worker(tokenizer) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer
    # One process per core already: the tokenizer's own threads would only compete with them.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _call_in_worker(fn: Callable, task: dict[str, Any]):
    return fn(tokenizer=_worker_tokenizer, **task)


def resolve_num_proc(num_proc: int) -> int:
    """Processes to prepare data with: `num_proc`, or every core for 0."""
    if num_proc < 0:
        raise ZerotrainError(f"--num-proc must be 0 (all cores) or a positive count, got {num_proc}")
    return num_proc or os.cpu_count() or 1


def _worker_context(fn: Callable):
    """A fork server that has imported this module and `fn`'s once, not a plain fork: training
    prepares its data after the process group has started its communication threads, and a fork of
    a threaded process can inherit a lock one of them held (the workers fork from the clean server
    instead)."""
    import multiprocessing

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__, fn.__module__])
    return context


def ordered_map(fn: Callable, tasks: Iterable[dict[str, Any]], num_proc: int, tokenizer) -> Iterator:
    """fn(tokenizer=tokenizer, **task) for each task, in order, over `num_proc` worker processes
    that are given the tokenizer once. At most 2 x num_proc tasks are in flight, so a long input
    is never all in memory; with one process, or a single task, the work is done here.

    concurrent.futures' pool, not multiprocessing.Pool: a worker that dies (the kernel's OOM
    killer, a crash in native code) breaks it, which ends the run with an error, where Pool would
    start a new worker and wait for the lost task's result forever."""
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    tasks = iter(tasks)
    first = list(islice(tasks, 2))
    if num_proc <= 1 or len(first) < 2:
        for task in chain(first, tasks):
            yield fn(tokenizer=tokenizer, **task)
        return
    pool = ProcessPoolExecutor(num_proc, mp_context=_worker_context(fn), initializer=_init_worker,
                               initargs=(tokenizer,))
    pending: deque = deque()
    try:
        for task in chain(first, tasks):
            pending.append(pool.submit(_call_in_worker, fn, task))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BrokenProcessPool as e:
        raise ZerotrainError(f"a data preparation worker process died ({e}): if the machine ran out of memory, "
                             "prepare with fewer processes (--num-proc), or with --num-proc 1 to see the error "
                             "in this process") from e
    finally:
        # On an error, or when the caller stops early: the queued tasks are dropped and the at most
        # num_proc running ones finish, so no worker outlives the call.
        pool.shutdown(wait=True, cancel_futures=True)
