"""The `zerotrain` command: one subcommand per tool.

    zerotrain train-tokenizer --input FILE... --vocab-size 6400 --output DIR
    zerotrain prepare --kind pretrain|sft --input FILE... --tokenizer DIR --output DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

from engine.errors import ZerotrainError


def cmd_train_tokenizer(args: argparse.Namespace) -> None:
    from engine.data import ReadStats, read_documents
    from model.tokenizer import train_tokenizer

    stats = ReadStats()
    texts = (doc for path in args.input for doc in read_documents(path, args.skip_bad_lines, stats))
    tokenizer = train_tokenizer(texts, args.vocab_size, args.output, min_frequency=args.min_frequency)
    print(f"tokenizer with {len(tokenizer)} tokens written to {args.output}"
          + (f" ({stats.bad_lines} bad lines skipped)" if stats.bad_lines else ""))


def cmd_prepare(args: argparse.Namespace) -> None:
    from engine.data import prepare
    from model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    meta = prepare(args.kind, args.input, tokenizer, args.output, seq_len=args.seq_len,
                   val_fraction=args.val_fraction, skip_bad_lines=args.skip_bad_lines)
    splits = ", ".join(f"{name}: {json.dumps(counts)}" for name, counts in meta["splits"].items())
    skipped = {k: v for k, v in meta["stats"].items() if v}
    print(f"{args.kind} data in {args.output} ({meta['dtype']}) {splits}" + (f"; skipped {skipped}" if skipped else ""))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zerotrain", description="DeepSpeed ZeRO training for GPT-style models",
                                     allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train-tokenizer", help="train a byte-level BPE tokenizer (HF format) on text files",
                       allow_abbrev=False)
    p.add_argument("--input", nargs="+", required=True, metavar="FILE", help=".txt, .jsonl ({'text'}) or .parquet")
    p.add_argument("--vocab-size", type=int, default=6400)
    p.add_argument("--min-frequency", type=int, default=2)
    p.add_argument("--output", required=True, metavar="DIR")
    p.add_argument("--skip-bad-lines", action="store_true")
    p.set_defaults(func=cmd_train_tokenizer)

    p = sub.add_parser("prepare", help="tokenize pretraining text or SFT conversations into token files",
                       allow_abbrev=False)
    p.add_argument("--kind", choices=("pretrain", "sft"), required=True)
    p.add_argument("--input", nargs="+", required=True, metavar="FILE")
    p.add_argument("--tokenizer", required=True, metavar="DIR", help="HF tokenizer dir or sentencepiece .model")
    p.add_argument("--output", required=True, metavar="DIR")
    p.add_argument("--seq-len", type=int, default=512, help="SFT: truncate conversations to this many tokens")
    p.add_argument("--val-fraction", type=float, default=0.01)
    p.add_argument("--skip-bad-lines", action="store_true", help="skip malformed lines and report the count")
    p.set_defaults(func=cmd_prepare)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except ZerotrainError as e:
        print(f"zerotrain {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
