#!/usr/bin/env bash
# The RL chain on CPU: SFT a `debug` model on the shipped synthetic additions (the answer format),
# train a reward model on its trunk, GRPO it with accuracy and the reward model, then serve it.
#   bash recipes/chain_grpo_tiny.sh [NUM_RANKS]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-2}
run() { deepspeed --num_gpus "$N" "$@"; }
run launcher/sft.py --config recipes/sft_arith_tiny.yaml
run launcher/reward.py --config recipes/reward_tiny.yaml
run launcher/grpo.py --config recipes/grpo_tiny.yaml
zerotrain serve runs/grpo-tiny/final --port 8000
