"""SFT preparation at scale: `prepare("sft")` against the raw tokenizer on the same texts, in one run.

    python scripts/bench/sft_prep.py [--copies 8] [--rounds 3]

The input is the shipped ShareGPT and Alpaca-seed samples (plus their multi-turn chats again with
a system prompt), written `--copies` times into one .jsonl file. The baseline is
`backend_tokenizer.encode_batch` with offsets on the conversations already rendered with the chat
template (in memory, all of the tokenizer's threads); the other rows run `prepare` end to end
(reading, rendering, locating the replies, tokenizing, labelling, writing). `reference` is the
per-conversation encoder this replaced (kept in tests/unit/test_sft_prep_scale.py). Peak memory
as the input grows is scripts/bench/prep_memory.py's (`--kind sft`, the same input).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "data" / "samples"
sys.path.insert(0, str(ROOT))


def build_input(path: Path, copies: int) -> None:
    chats = json.loads((SAMPLES / "sharegpt_identity_500.json").read_text())
    seed = (SAMPLES / "alpaca_seed_tasks.jsonl").read_text().splitlines()
    lines = [json.dumps(r, ensure_ascii=False) for r in chats]
    lines += [json.dumps(dict(r, system="You are a helpful assistant."), ensure_ascii=False)
              for r in chats if len(r["conversations"]) >= 4]
    # One file, one shape: the Alpaca seed tasks as ShareGPT turns (one conversation an instance).
    for line in seed:
        record = json.loads(line)
        for inst in record["instances"]:
            prompt = record["instruction"] + (f"\n\n{inst['input']}" if inst.get("input") else "")
            lines.append(json.dumps({"conversations": [{"from": "human", "value": prompt},
                                                       {"from": "gpt", "value": inst["output"]}]},
                                    ensure_ascii=False))
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(copies):
            f.write("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=8, help="copies of the samples in the timed input")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import dataclasses

    from engine.data.conversations import read_conversations
    from engine.data.kinds import KINDS
    from engine.data.prepare import prepare
    from model.tokenizer import load_tokenizer, train_tokenizer
    from tests.helpers import sample_texts
    from tests.unit import test_sft_prep_scale as reference

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train_tokenizer(sample_texts(), vocab_size=6400, output_dir=str(tmp / "tok"), show_progress=False)
        tokenizer = load_tokenizer(str(tmp / "tok"))
        big = tmp / "sft.jsonl"
        build_input(big, args.copies)
        conversations = [m for _, m in read_conversations(big)]
        texts = tokenizer.apply_chat_template(conversations, tokenize=False)
        turns = Counter(len(m) for m in conversations)
        lengths = [len(e.ids) for e in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]
        tokens = sum(lengths)
        print(f"input: {len(conversations):,} conversations, {big.stat().st_size / 1e6:.1f} MB, {tokens:,} tokens "
              f"(vocab 6400), {os.cpu_count()} cores")
        print("messages per conversation: " + ", ".join(f"{k}: {v}" for k, v in sorted(turns.items())))
        edges = [0, 32, 64, 128, 256, 512, 1024, 1 << 30]
        hist = Counter(next(f"{a}-{b - 1}" if b < 1 << 30 else f">={a}" for a, b in zip(edges, edges[1:]) if n < b)
                       for n in lengths)
        print("tokens per conversation: " + ", ".join(f"{k}: {hist[k]}" for k in
                                                       [f"{a}-{b - 1}" for a, b in zip(edges, edges[1:-1])] +
                                                       [f">={edges[-2]}"] if hist[k]))
        del conversations

        def raw() -> float:
            start = time.perf_counter()
            tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)  # offsets come with it
            return time.perf_counter() - start

        def ours(num_proc: int, write_sft=None) -> float:
            out = tmp / "out"
            if out.exists():
                import shutil
                shutil.rmtree(out)
            saved = KINDS["sft"]
            KINDS["sft"] = dataclasses.replace(saved, write=write_sft or saved.write)
            try:
                start = time.perf_counter()
                prepare("sft", [str(big)], tokenizer, out, seq_len=512, val_fraction=0.01, show_progress=False,
                        num_proc=num_proc)
                return time.perf_counter() - start
            finally:
                KINDS["sft"] = saved

        rows = {"raw encode_batch (rendered texts)": raw, "reference (per conversation)":
                lambda: ours(1, reference.reference_write_sft),
                "prepare num_proc=1": lambda: ours(1), "prepare num_proc=2": lambda: ours(2)}
        times = {name: [] for name in rows}
        for _ in range(args.rounds):  # rounds interleave the rows, so noise falls on all of them
            for name, fn in rows.items():
                times[name].append(fn())
        median = {name: statistics.median(t) for name, t in times.items()}
        base = tokens / median["raw encode_batch (rendered texts)"]
        print(f"\n| path | seconds (median of {args.rounds}) | tokens/s | x raw |")
        print("| --- | --- | --- | --- |")
        for name, seconds in median.items():
            print(f"| {name} | {seconds:.2f} | {tokens / seconds:,.0f} | {tokens / seconds / base:.2f} |")
        print(f"\nscaling num_proc 1 -> 2: {median['prepare num_proc=1'] / median['prepare num_proc=2']:.2f}x; "
              f"num_proc=1 vs reference: {median['reference (per conversation)'] / median['prepare num_proc=1']:.2f}x")


if __name__ == "__main__":
    main()
