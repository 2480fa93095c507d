#!/usr/bin/env bash
# The MiniLLM workflow on CPU: pretrain a `tiny` teacher and a `debug` student, SFT both on the
# same instruction data, then distill the student from the teacher with reverse KL, half the
# steps on the student's own sampled replies (recipes/distill_minillm_tiny.yaml).
#   bash recipes/chain_minillm_tiny.sh [NUM_RANKS]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-2}
run() { deepspeed --num_gpus "$N" "$@"; }
run launcher/pretrain.py --config recipes/pretrain_tiny.yaml
run launcher/pretrain.py --config recipes/pretrain_tiny.yaml --preset debug --output-dir runs/pretrain-debug
run launcher/sft.py --config recipes/sft_full_tiny.yaml --init-from runs/pretrain-tiny --output-dir runs/minillm-teacher-sft-tiny
run launcher/sft.py --config recipes/sft_full_tiny.yaml --init-from runs/pretrain-debug --output-dir runs/minillm-student-sft-debug
run launcher/distill.py --config recipes/distill_minillm_tiny.yaml
for model in runs/minillm-teacher-sft-tiny runs/minillm-student-sft-debug runs/minillm-distill-debug; do
    zerotrain eval --model "$model" --data data/samples/sharegpt_identity_500.json --seq-len 256
done
