#!/usr/bin/env bash
# Pretrain -> LoRA SFT -> more (mixed) pretraining -> full SFT -> DPO -> distillation into a smaller
# student -> serve, each phase starting from the previous one's output (docs/recipes.md).
#   bash recipes/chain_tiny.sh [NUM_RANKS]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-2}
run() { deepspeed --num_gpus "$N" "$@"; }
run launcher/pretrain.py --config recipes/pretrain_tiny.yaml
run launcher/sft.py --config recipes/sft_lora_tiny.yaml
run launcher/pretrain.py --config recipes/pretrain_more_tiny.yaml
run launcher/sft.py --config recipes/sft_full_tiny.yaml
run launcher/dpo.py --config recipes/dpo_tiny.yaml
run launcher/distill.py --config recipes/distill_tiny.yaml
zerotrain eval --model runs/sft-full-tiny --data data/samples/sharegpt_identity_500.json --seq-len 256
zerotrain eval --model runs/dpo-tiny --data data/samples/sharegpt_identity_500.json --seq-len 256
zerotrain eval --model runs/distill-tiny --data data/samples/sharegpt_identity_500.json --seq-len 256
zerotrain serve runs/dpo-tiny --port 8000
