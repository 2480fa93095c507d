"""Data-preparation throughput: `zerotrain prepare` (pretraining) against raw `tokenizers`
`encode_batch` on the same documents, in the same run.

    python scripts/bench/data_prep.py [--repeat 4] [--rounds 3]

The baseline encodes documents already in memory; `prepare` is timed end to end (reading and
hashing the files, encoding chunk by chunk, writing the token file and its metadata). Memory
as the corpus grows (200 MB to 2 GB) is scripts/bench/prep_memory.py's.
The corpus is the shipped English and Chinese samples, repeated `--repeat` times (each copy a
separate file, so the preparation does real work on each). Rounds alternate the two sides;
the median of each is reported, and the ratio of medians.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "data" / "samples"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from engine.data.prepare import prepare
    from engine.data.text import read_documents
    from model.tokenizer import load_tokenizer, train_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        inputs = []
        for i in range(args.repeat):
            for name in ("tinyshakespeare.txt", "tang_poems_5k.jsonl"):
                copy = tmp / f"{i}-{name}"
                copy.write_bytes((SAMPLES / name).read_bytes())
                inputs.append(str(copy))
        train_tokenizer((d for p in inputs[:2] for d in read_documents(p)), 6400, str(tmp / "tok"),
                        show_progress=False)
        tokenizer = load_tokenizer(str(tmp / "tok"))
        backend = tokenizer.backend_tokenizer

        raw, ours = [], []
        tokens = 0
        for round_ in range(args.rounds):
            docs = [d for p in inputs for d in read_documents(p)]  # in memory: the baseline only encodes
            start = time.perf_counter()
            encoded = backend.encode_batch(docs, add_special_tokens=False)
            tokens = sum(len(e.ids) + 1 for e in encoded)
            raw.append(tokens / (time.perf_counter() - start))

            start = time.perf_counter()
            meta = prepare("pretrain", inputs, tokenizer, tmp / f"prep{round_}", val_fraction=0.0,
                           show_progress=False)
            ours.append(meta["splits"]["train"]["tokens"] / (time.perf_counter() - start))
            assert meta["splits"]["train"]["tokens"] == tokens

        mb = sum(Path(p).stat().st_size for p in inputs) / 1e6
        print(f"corpus: {len(inputs)} files, {mb:.1f} MB, {tokens:,} tokens (vocab 6400)")
        print(f"raw tokenizers encode_batch: {statistics.median(raw):,.0f} tokens/s (median of {args.rounds})")
        print(f"zerotrain prepare:           {statistics.median(ours):,.0f} tokens/s (median of {args.rounds})")
        print(f"ratio prepare / encode_batch: {statistics.median(ours) / statistics.median(raw):.2f}x")


if __name__ == "__main__":
    main()
