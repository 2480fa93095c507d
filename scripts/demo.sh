#!/usr/bin/env bash
# The whole zerotrain pipeline on CPU with the shipped sample data (`make demo`).
# Every step writes under runs/demo/; re-running reuses what is already up to date.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${DEMO_DIR:-runs/demo}
SAMPLES=data/samples
mkdir -p "$RUN"

echo "== 1. tokenizer: byte-level BPE, 6400 tokens, on English and Chinese text"
if [ ! -f "$RUN/tokenizer/tokenizer.json" ]; then
  zerotrain train-tokenizer --input $SAMPLES/tinyshakespeare.txt $SAMPLES/tang_poems_5k.jsonl \
    --vocab-size 6400 --output "$RUN/tokenizer"
fi

echo "== 2. prepare pretraining tokens (memmap) and SFT conversations (with loss masks)"
zerotrain prepare --kind pretrain --input $SAMPLES/tinyshakespeare.txt $SAMPLES/tang_poems_5k.jsonl \
  --tokenizer "$RUN/tokenizer" --output "$RUN/data/pretrain"
zerotrain prepare --kind sft --input $SAMPLES/sharegpt_identity_500.json $SAMPLES/alpaca_seed_tasks.jsonl \
  --tokenizer "$RUN/tokenizer" --output "$RUN/data/sft" --seq-len 512
echo "demo artifacts in $RUN"
