"""Peak memory of `zerotrain prepare` as its input grows: does it depend on the input's size?

    python scripts/bench/prep_memory.py --kind pretrain --sizes 200M 2G
    python scripts/bench/prep_memory.py --kind sft --sizes 10M 100M

Each size is prepared by the real command (`zerotrain prepare`, default flags) in a fresh
process, which records its own peak resident memory (VmHWM, scripts/bench/peak_rss.py) at exit.
Pretraining input is one MiniMind-style `{"text": ...}` .jsonl (the shape of pretrain_hq.jsonl)
built from the shipped samples: each line joins 1-8 random Shakespeare paragraphs or Tang poems
(seeded), so lines differ. SFT input is scripts/bench/sft_prep.py's file, copied to the size.
The tokenizer is a 6400-token BPE trained on the samples. Also reported: wall time, input MB/s,
tokens/s, the prepared directory's size, anything left in the `datasets` cache (HF_DATASETS_CACHE,
pointed at the work directory), and for pretraining the raw `encode_batch` rate on the corpus's
first 20,000 documents, measured just before (the machine may be shared: compare within a row).
Everything is written under --workdir and removed at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCH = Path(__file__).resolve().parent
SAMPLES = ROOT / "data" / "samples"
sys.path[:0] = [str(ROOT), str(BENCH)]

# The child: record its own peak RSS at exit, then run the CLI with the given arguments.
CHILD = ("import sys; sys.path[:0] = [{root!r}, {bench!r}]\n"
         "from peak_rss import write_peak_rss_at_exit; write_peak_rss_at_exit(sys.argv[1])\n"
         "from engine.apps.cli import main; sys.exit(main(sys.argv[2:]))")


def parse_size(text: str) -> int:
    units = {"K": 10**3, "M": 10**6, "G": 10**9}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].upper() in units else int(text)


def build_pretrain(path: Path, size: int, seed: int = 0) -> None:
    """~`size` bytes of {"text": ...} lines, each 1-8 random pieces of one of the two samples."""
    from engine.data.text import read_documents

    sources = [[json.dumps(d, ensure_ascii=False)[1:-1] for d in read_documents(SAMPLES / name)]
               for name in ("tinyshakespeare.txt", "tang_poems_5k.jsonl")]
    rng = random.Random(seed)
    written = 0
    with open(path, "wb") as f:
        while written < size:
            lines = []
            for _ in range(10000):
                pieces = rng.choice(sources)
                lines.append('{"text": "' + "\\n".join(rng.choices(pieces, k=rng.randint(1, 8))) + '"}\n')
            block = "".join(lines).encode("utf-8")
            f.write(block)
            written += len(block)


def build_sft(path: Path, size: int) -> None:
    from sft_prep import build_input

    one = path.with_suffix(".one.jsonl")
    build_input(one, 1)
    block = one.read_bytes()
    one.unlink()
    with open(path, "wb") as f:
        for _ in range(max(1, round(size / len(block)))):
            f.write(block)


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def raw_rate(data: Path, tok: Path) -> float:
    """tokens/s of the bare tokenizer's encode_batch on the first 20,000 documents, in memory."""
    from itertools import islice

    from engine.data.text import read_documents
    from model.tokenizer import load_tokenizer

    docs = list(islice(read_documents(data), 20000))
    backend = load_tokenizer(str(tok)).backend_tokenizer
    start = time.perf_counter()
    tokens = sum(len(e.ids) + 1 for e in backend.encode_batch(docs, add_special_tokens=False))
    return tokens / (time.perf_counter() - start)


def run_prepare(kind: str, data: Path, tok: Path, out: Path, work: Path) -> dict:
    """Prepare `data` in a fresh process; its peak RSS, wall time and what it wrote."""
    rss_file = work / "rss.json"
    cache = work / "hf_datasets_cache"
    env = dict(os.environ, HF_DATASETS_CACHE=str(cache))
    command = [sys.executable, "-c", CHILD.format(root=str(ROOT), bench=str(BENCH)), str(rss_file),
               "prepare", "--kind", kind, "--input", str(data), "--tokenizer", str(tok), "--output", str(out)]
    start = time.perf_counter()
    with open(work / f"{data.stem}.log", "w") as log:
        subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    seconds = time.perf_counter() - start
    meta = json.loads((out / "meta.json").read_text())
    last_bar = (work / f"{data.stem}.log").read_text().replace("\r", "\n").strip().splitlines()
    return {"peak_rss": json.loads(rss_file.read_text())["peak_rss"], "seconds": seconds,
            "tokens": sum(s["tokens"] for s in meta["splits"].values()), "output": directory_bytes(out),
            "cache": directory_bytes(cache), "bar": next((l for l in reversed(last_bar) if "prepare" in l), "")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=("pretrain", "sft"), default="pretrain")
    parser.add_argument("--sizes", nargs="+", default=["200M", "2G"], help="input sizes, e.g. 200M 2G")
    parser.add_argument("--workdir", default="/tmp/prep_mem")
    parser.add_argument("--keep", action="store_true", help="keep the inputs and outputs")
    args = parser.parse_args()

    from model.tokenizer import train_tokenizer
    from tests.helpers import sample_texts

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    try:
        tok = work / "tok"
        train_tokenizer(sample_texts(), vocab_size=6400, output_dir=str(tok), show_progress=False)
        rows = []
        for size in args.sizes:
            data = work / f"{args.kind}-{size}.jsonl"
            (build_pretrain if args.kind == "pretrain" else build_sft)(data, parse_size(size))
            out = work / f"out-{size}"
            raw = raw_rate(data, tok) if args.kind == "pretrain" else None
            result = run_prepare(args.kind, data, tok, out, work)
            result["raw"] = raw
            result["input"] = data.stat().st_size
            rows.append((size, result))
            data.unlink()
            shutil.rmtree(out)
            print(f"{size}: {json.dumps(result)}", flush=True)

        print(f"\n{args.kind}, {os.cpu_count()} cores, default flags (num_proc 1)\n")
        print("| input | tokens | peak RSS | seconds | input MB/s | tokens/s | raw encode_batch tokens/s | "
              "prepared dir | datasets cache after |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for size, r in rows:
            raw = f"{r['raw']:,.0f} ({r['tokens'] / r['seconds'] / r['raw']:.2f}x)" if r["raw"] else "-"
            print(f"| {r['input'] / 1e6:,.0f} MB | {r['tokens'] / 1e6:,.1f}M | {r['peak_rss'] / 2**20:,.0f} MiB | "
                  f"{r['seconds']:,.1f} | {r['input'] / 1e6 / r['seconds']:,.2f} | {r['tokens'] / r['seconds']:,.0f} | "
                  f"{raw} | {r['output'] / 1e6:,.0f} MB | {r['cache'] / 1e6:,.1f} MB |")
        (first, a), (last, b) = rows[0], rows[-1]
        print(f"\npeak RSS {last} / {first}: {b['peak_rss'] / a['peak_rss']:.3f}x "
              f"({100 * (b['peak_rss'] / a['peak_rss'] - 1):+.1f}%) for {b['input'] / a['input']:.1f}x the input")
        print("last progress line of each run:\n" + "\n".join(f"  {size}: {r['bar']}" for size, r in rows))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
