#!/usr/bin/env bash
# The whole zerotrain pipeline on CPU with the shipped sample data (`make demo`):
#   tokenizer -> token files -> pretrain `tiny` on 2 ranks, ZeRO-2, through the deepspeed launcher
#   -> consolidate its shards (.safetensors, .pth) -> LoRA SFT with modules_to_save
#   -> extract the adapter from the SFT shards -> DPO of the SFT model on preference pairs
#   -> generate from the base, the SFT and the DPO model -> curves (PNG) and runs/demo/REPORT.md
#
# Usage: scripts/demo.sh [--quick]
#   --quick (or DEMO_QUICK=1): a few steps and a small vocabulary, for the tests (~2 minutes).
#   DEMO_DIR: where everything goes (default runs/demo). Each run starts afresh: a directory
#   that an earlier demo made is deleted first; any other existing, non-empty one is refused.
set -euo pipefail
cd "$(dirname "$0")/.."

QUICK=${DEMO_QUICK:-0}
for arg in "$@"; do
  case $arg in
    --quick) QUICK=1 ;;
    -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "demo.sh: unknown argument '$arg' (usage: scripts/demo.sh [--quick])" >&2; exit 2 ;;
  esac
done
[ "$QUICK" = 0 ] || QUICK=1

# The project's venv, when the caller has not put one on PATH (make demo does).
if ! command -v zerotrain >/dev/null && [ -x .venv/bin/zerotrain ]; then
  PATH="$PWD/.venv/bin:$PATH"
fi
for tool in zerotrain deepspeed python; do
  command -v $tool >/dev/null || { echo "demo.sh: '$tool' not found; run 'make demo' (it creates .venv)" >&2; exit 2; }
done

RUN=${DEMO_DIR:-runs/demo}
SAMPLES=data/samples
MARKER=.zerotrain-demo
if [ -e "$RUN" ] && [ -n "$(ls -A "$RUN")" ]; then
  if [ ! -f "$RUN/$MARKER" ]; then
    echo "demo.sh: $RUN exists and was not made by the demo; move it away or set DEMO_DIR" >&2
    exit 2
  fi
  rm -rf "$RUN"
fi
mkdir -p "$RUN"
touch "$RUN/$MARKER"

# Two ranks on two cores: one thread each, or they fight over the cores.
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
# DeepSpeed compiles its CPU communication op on first use (~30 s, once). torch's default cache
# (~/.cache/torch_extensions/py311_cpu) is shared by every venv of that Python version, where
# one with other torch/deepspeed paths rebuilds it over the other's; this venv keeps its own.
VENV_DIR=$(cd "$(dirname "$(command -v zerotrain)")/.." && pwd)
if [ -z "${TORCH_EXTENSIONS_DIR:-}" ] && [ -f "$VENV_DIR/pyvenv.cfg" ]; then
  export TORCH_EXTENSIONS_DIR=$VENV_DIR/torch_extensions
fi

if [ "$QUICK" = 1 ]; then
  VOCAB=1000 SEQ=128 MAX_NEW=16
  PRETRAIN_FLAGS=(--seq-len $SEQ --max-steps 20 --warmup-steps 4 --log-interval 2 --eval-interval 10 --eval-samples 32
                  --save-interval 10)
  SFT_FLAGS=(--seq-len $SEQ --max-steps 10 --warmup-steps 2 --log-interval 2 --eval-interval 5 --eval-samples 16
             --save-interval 5 --micro-batch-size 4)
  DPO_FLAGS=(--max-steps 6 --warmup-steps 1 --eval-interval 3 --eval-samples 32 --save-interval 6)
else
  VOCAB=6400 SEQ=256 MAX_NEW=48
  PRETRAIN_FLAGS=()
  SFT_FLAGS=()
  DPO_FLAGS=()
fi
PREF_SEQ=128  # the seq_len of recipes/dpo_demo.yaml: preference pairs are prepared for it
PROMPTS=("Who are you?" "Are you ChatGPT?" "What is up?" "ROMEO:" "床前明月光，")

now() { local t; t=$(date +%s.%N); [[ $t == *N ]] && t=$(date +%s); echo "$t"; }  # BSD date: no %N
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
free_port() { python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
STEPS=10 STEP_TITLE="" DEMO_START=$(now)
if [ -t 1 ]; then BOLD=$'\033[1m' PLAIN=$'\033[0m'; else BOLD="" PLAIN=""; fi
step() {  # step N TITLE: close the previous step (its time goes to timings.tsv), print a header
  end_step
  STEP_TITLE=$2 STEP_START=$(now)
  printf '\n%s== [%s/%s] %s%s\n' "$BOLD" "$1" "$STEPS" "$2" "$PLAIN"
}
end_step() {
  [ -n "$STEP_TITLE" ] || return 0
  local seconds
  seconds=$(elapsed "$STEP_START")
  printf '   (%ss)\n' "$seconds"
  printf '%s\t%s\n' "$STEP_TITLE" "$seconds" >> "$RUN/timings.tsv"
  STEP_TITLE=""
}
quote() {  # the arguments as one shell-quoted line, readable (non-ASCII left as is)
  local out=() a
  for a in "$@"; do
    if [[ $a =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then out+=("$a"); else out+=("'${a//\'/\'\\\'\'}'"); fi
  done
  printf '%s' "${out[*]}"
}
run() {  # show the command, keep it in commands.sh, run it
  local line
  line=$(quote "$@")
  printf '$ %s\n' "$line" >&2
  printf '%s\n' "$line" >> "$RUN/commands.sh"
  "$@"
}
printf 'step\tseconds\n' > "$RUN/timings.tsv"
printf '# The commands of `scripts/demo.sh%s`, in order, from the repository root, with OMP_NUM_THREADS=1.\n' \
  "$([ "$QUICK" = 1 ] && echo ' --quick')" > "$RUN/commands.sh"
echo "zerotrain demo$([ "$QUICK" = 1 ] && echo ' (quick)') -> $RUN"

step 1 "tokenizer: byte-level BPE, $VOCAB tokens, on English and Chinese text"
run zerotrain train-tokenizer --input $SAMPLES/tinyshakespeare.txt $SAMPLES/tang_poems_5k.jsonl \
  --vocab-size $VOCAB --output "$RUN/tokenizer"

step 2 "prepare: pretraining tokens (memmap), SFT conversations (assistant-only labels), preference pairs"
run zerotrain prepare --kind pretrain --input $SAMPLES/tinyshakespeare.txt $SAMPLES/tang_poems_5k.jsonl \
  --tokenizer "$RUN/tokenizer" --output "$RUN/data/pretrain"
run zerotrain prepare --kind sft --input $SAMPLES/sharegpt_identity_500.json --val-fraction 0.05 \
  --tokenizer "$RUN/tokenizer" --output "$RUN/data/sft" --seq-len $SEQ
run zerotrain prepare --kind pref --input $SAMPLES/pref_pairs.jsonl --val-fraction 0.05 \
  --tokenizer "$RUN/tokenizer" --output "$RUN/data/pref" --seq-len $PREF_SEQ

step 3 "pretrain: tiny preset, 2 ranks, ZeRO-2, deepspeed launcher (recipes/pretrain_demo.yaml)"
run deepspeed --num_gpus 2 --master_port "$(free_port)" --log_level warning launcher/pretrain.py \
  --config recipes/pretrain_demo.yaml --tokenizer "$RUN/tokenizer" --data "$RUN/data/pretrain" \
  --output-dir "$RUN/pretrain" ${PRETRAIN_FLAGS[@]+"${PRETRAIN_FLAGS[@]}"}

step 4 "consolidate: ZeRO-2 shards of the last checkpoint -> .safetensors and .pth"
run zerotrain inspect "$RUN/pretrain/checkpoints"
run zerotrain consolidate "$RUN/pretrain/checkpoints" "$RUN/consolidated/pretrain.safetensors"
run zerotrain consolidate "$RUN/pretrain/checkpoints" "$RUN/consolidated/pretrain.pth"

step 5 "SFT: LoRA r=8 + embed_tokens/lm_head in full, from the pretrained model (recipes/sft_demo_lora.yaml)"
run deepspeed --num_gpus 2 --master_port "$(free_port)" --log_level warning launcher/sft.py \
  --config recipes/sft_demo_lora.yaml --init-from "$RUN/pretrain" --data "$RUN/data/sft" \
  --output-dir "$RUN/sft" ${SFT_FLAGS[@]+"${SFT_FLAGS[@]}"}

step 6 "extract-adapter: the PEFT adapter straight from the SFT run's ZeRO-2 shards"
run zerotrain extract-adapter "$RUN/sft/checkpoints" "$RUN/adapter"

# --init-from a LoRA run without a merged final/ model: its checkpoints, the adapter folded into the base.
step 7 "DPO: every weight of the SFT model, reference a frozen copy, 2 ranks, ZeRO-2 (recipes/dpo_demo.yaml)"
run deepspeed --num_gpus 2 --master_port "$(free_port)" --log_level warning launcher/dpo.py \
  --config recipes/dpo_demo.yaml --init-from "$RUN/sft" --data "$RUN/data/pref" \
  --output-dir "$RUN/dpo" ${DPO_FLAGS[@]+"${DPO_FLAGS[@]}"}

step 8 "generate: greedy, the same prompts to the base model (raw text), the SFT and the DPO model (chat)"
mkdir -p "$RUN/samples"
echo "-- base model ($RUN/pretrain/final), --no-chat"
run zerotrain generate --model "$RUN/pretrain" --no-chat --max-new-tokens $MAX_NEW --prompt "${PROMPTS[@]}" \
  | tee "$RUN/samples/base.txt"
echo "-- SFT model ($RUN/pretrain/final + adapter $RUN/adapter), chat template"
run zerotrain generate --model "$RUN/pretrain" --adapter "$RUN/adapter" --max-new-tokens $MAX_NEW \
  --prompt "${PROMPTS[@]}" | tee "$RUN/samples/sft.txt"
echo "-- DPO model ($RUN/dpo/final), chat template"
run zerotrain generate --model "$RUN/dpo" --max-new-tokens $MAX_NEW --prompt "${PROMPTS[@]}" \
  | tee "$RUN/samples/dpo.txt"

step 9 "plot: loss, val loss, lr and tokens/s; DPO's reward accuracy and margin"
run zerotrain plot "$RUN/pretrain" --out "$RUN/plots/pretrain.png"
run zerotrain plot "$RUN/sft" --out "$RUN/plots/sft.png"
run zerotrain plot "$RUN/dpo" --out "$RUN/plots/dpo.png"
run zerotrain plot "$RUN/pretrain" "$RUN/sft" --out "$RUN/plots/compare.png"

step 10 "report"
python scripts/demo_report.py "$RUN" --total-seconds "$(elapsed "$DEMO_START")" $([ "$QUICK" = 1 ] && echo --quick)
end_step
printf '\n%sdemo finished in %ss%s: report %s/REPORT.md\n' "$BOLD" "$(elapsed "$DEMO_START")" "$PLAIN" "$RUN"
