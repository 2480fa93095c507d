"""GPU: tokens/s and MFU of zerotrain and HF Trainer with the same DeepSpeed config, bf16, same run.

    python scripts/bench/gpu.py                                  # every case, one round each
    python scripts/bench/gpu.py --cases llama-1b-z2 llama-1b-z3 --rounds 2 --json llama.json

The cases (below) are minimind-26m and gpt2-124m on ZeRO-2, llama-1b on ZeRO-2 and ZeRO-3, and
llama-1b on ZeRO-2 with activation checkpointing and a larger micro batch. Each case runs
scripts/bench/hf_trainer.py's comparison (same model, data, DeepSpeed config, micro batch, grad
accumulation, steps; alternating rounds; the first logged window left out) on
`--world-sizes` GPUs, and adds MFU: tokens/s x `model.flops.flops_per_token` (6N plus the
attention term, at the run's sequence length) / (GPUs x the device's dense bf16 peak from
`model.flops.PEAK_FLOPS`, 989 TFLOP/s for an H100).

The fast settings both sides share: bf16 with fp32 master weights; torch's fused AdamW (zerotrain's
`fill_ds_config` sets `torch_adam` and `fused` on CUDA, and HF Trainer gets that same filled
config); `flash_attention_2` where the flash-attn package is installed, else SDPA (which picks
its flash kernel for bf16 on an H100); activation checkpointing only in the case that names it.
zerotrain has no torch.compile or Liger-kernel switch, so neither side uses them here.

The vocabulary is the 6400-token BPE trained on the shipped samples (as in every zerotrain
benchmark), so llama-1b has 0.99B parameters here rather than 1.24B with Llama 3's 128k vocabulary,
and gpt2-124m has 90M: MFU counts the model as built. Each case takes a few minutes (zerotrain
always writes a checkpoint and final/ at the end, outside the measured windows; outputs are
deleted after each run), so split the cases over several commands where a command has a time limit.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

CASES: dict[str, dict] = {
    "minimind-26m-z2": dict(preset="minimind-26m", zero_stage=2, seq_len=1024, micro_batch_size=32, grad_accum=1),
    "gpt2-124m-z2": dict(preset="gpt2-124m", zero_stage=2, seq_len=1024, micro_batch_size=16, grad_accum=2),
    "llama-1b-z2": dict(preset="llama-1b", zero_stage=2, seq_len=2048, micro_batch_size=4, grad_accum=4),
    "llama-1b-z3": dict(preset="llama-1b", zero_stage=3, seq_len=2048, micro_batch_size=4, grad_accum=4),
    "llama-1b-z2-ckpt": dict(preset="llama-1b", zero_stage=2, seq_len=2048, micro_batch_size=16, grad_accum=1,
                             gradient_checkpointing=True),
}


def attention() -> str:
    return "flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--log-interval", type=int, default=5)
    parser.add_argument("--attn-implementation", default=attention())
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    import torch

    from model.flops import device_peak_flops, flops_per_token
    from model.presets import preset_config

    if not torch.cuda.is_available():
        raise SystemExit("gpu.py needs a CUDA device; scripts/bench/hf_trainer.py is the CPU comparison")
    import hf_trainer as bench  # scripts/bench/ is sys.path[0] when run as a script

    peak = device_peak_flops()
    print(f"device: {torch.cuda.get_device_name()} x {torch.cuda.device_count()}, peak bf16 "
          f"{peak / 1e12 if peak else float('nan'):.0f} TFLOP/s, attention {args.attn_implementation}", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        settings = argparse.Namespace(precision="bf16", threads=1, rounds=args.rounds, steps=args.steps,
                                      log_interval=args.log_interval, attn_implementation=args.attn_implementation)
        bench.prepare_data(settings, Path(tmp))
        for name in args.cases:
            case = argparse.Namespace(**{**vars(settings), "gradient_checkpointing": False, **CASES[name]})
            per_token = flops_per_token(preset_config(case.preset, settings.vocab_size, case.seq_len), case.seq_len)
            for n in args.world_sizes:
                print(f"{name}, {n} GPU(s)", flush=True)
                result = bench.compare(case, n, Path(tmp))
                result.update(case=name, settings={k: v for k, v in vars(case).items() if k not in ("tokenizer", "data")},
                              flops_per_token=per_token, peak_flops=peak)
                result["mfu"] = {side: (tps * per_token / (n * peak) if peak else None)
                                 for side, tps in result["wall_median"].items()}
                results.append(result)

    print(f"\nbf16, {args.steps} steps (windows of {args.log_interval}, first left out), median of {args.rounds} "
          f"round(s); zerotrain | HF Trainer")
    print(f"{'case':18s} {'GPUs':>4s} {'tokens/s':>21s} {'ratio':>6s} {'MFU':>15s}")
    for r in results:
        tps, mfu = r["wall_median"], r["mfu"]
        mfu_text = " ".join(f"{m:6.1%}" if m is not None else "     -" for m in (mfu["zerotrain"], mfu["hf"]))
        print(f"{r['case']:18s} {r['world_size']:4d} {tps['zerotrain']:10,.0f} {tps['hf']:10,.0f} "
              f"{r['wall_ratio']:5.2f}x {mfu_text}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
