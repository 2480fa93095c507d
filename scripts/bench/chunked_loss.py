"""The LM loss without the full logits (--loss-chunk-size) against transformers' default path, in one run.

    .venv/bin/python scripts/bench/chunked_loss.py [--seq-len 2048] [--rounds 3] [--step-seq-len 512] [--chunks 110 512]

Part 1, the loss alone: the `qwen2-0.5b` preset's LM head (vocabulary 151,936 x hidden 896, fp32)
on one row of `--seq-len` decoder states, forward and backward, every token trained:
  full     the head on every position, then cross-entropy on the fp32 logits (what transformers'
           own loss and zerotrain's token_nll_sum do)
  chunked  engine.objectives.tokens.chunked_nll_sum, N tokens a chunk for each N of `--chunks`
           (110 tokens: 64 MiB of fp32 logits, 512: 297 MiB)
Each variant runs `--rounds` times, each in a fresh process, interleaved with the others, timed on
its second repetition (the first pays for first-touch page faults): its peak memory is the
process's high-water mark (VmHWM) less its resident size once the head, the states and their
gradients' room are in place, so it counts only what the loss itself holds. Time and peak are medians over the processes.
Part 2, a whole training step (forward and backward of the full model, micro batch 1, fp32) of the
same preset at `--step-seq-len`, through CausalLM with --loss-chunk-size 0 and the last of `--chunks`:
step time and peak memory of the process, the two paths alternating.
Both parts check that the loss and every gradient agree (relative difference of the norms).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def loss_only(variant: str, seq_len: int, rounds: int, chunk: int = 0, device: str = "cpu") -> dict:
    """One process's measurement of `variant`: full, chunked (zerotrain's fused path) or liger
    (liger-kernel's, CUDA only). On CUDA the peak is torch's allocator high-water mark instead."""
    import torch

    import engine.objectives.tokens as tokens
    from model.presets import preset_config

    if variant == "chunked":  # ours even where liger-kernel would be taken
        tokens.liger_fused_nll = lambda device: None
    elif variant == "liger" and tokens.liger_fused_nll(torch.device(device)) is None:
        raise SystemExit("liger: needs CUDA and `pip install liger-kernel`")
    torch.manual_seed(0)
    config = preset_config("qwen2-0.5b")
    head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False, device=device)
    hidden = torch.randn(1, seq_len, config.hidden_size, requires_grad=True, device=device)
    labels = torch.randint(0, config.vocab_size, (1, seq_len), device=device)
    # Room for the gradients both paths end with, so the baseline holds them already.
    head.weight.grad = torch.zeros_like(head.weight)
    hidden.grad = torch.zeros_like(hidden)
    cuda = device == "cuda"
    base = torch.cuda.memory_allocated() if cuda else rss_kib("VmRSS") * 1024
    times = []
    for _ in range(rounds):
        head.weight.grad.zero_()
        hidden.grad.zero_()
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        if variant == "full":
            loss = tokens.token_nll_sum(head(hidden), labels)
        else:
            loss = tokens.chunked_nll_sum(hidden, head, labels, chunk)
        loss.backward()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if cuda else rss_kib("VmHWM") * 1024
    # the first repetition pays for first-touch page faults (and kernel compilation on CUDA)
    return {"peak_mib": (peak - base) / 2 ** 20, "seconds": statistics.median(times[1:] or times), "chunk": chunk,
            "loss": float(loss), "grad_weight_norm": float(head.weight.grad.norm()),
            "grad_hidden_norm": float(hidden.grad.norm())}


def train_step(variant: str, seq_len: int, rounds: int, chunk: int = 0) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from engine.objectives.causal_lm import CausalLM
    from model.presets import preset_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(preset_config("qwen2-0.5b")).float()
    ids = torch.randint(0, model.config.vocab_size, (1, seq_len))
    batch = {"input_ids": ids, "labels": ids.clone()}
    objective = CausalLM(0 if variant == "full" else chunk)
    times = []
    for _ in range(rounds):
        model.zero_grad(set_to_none=False)
        start = time.perf_counter()
        loss = objective.loss(model, batch).loss
        loss.backward()
        times.append(time.perf_counter() - start)
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    return {"peak_mib": rss_kib("VmHWM") / 1024, "seconds": statistics.median(times[1:] or times),
            "loss": float(loss), "grad_norm": float(grads.norm())}


def run(part: str, variant: str, seq_len: int, rounds: int, chunk: int = 0, device: str = "cpu") -> dict:
    extra = {"device": device} if part == "loss_only" else {}
    code = (f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(Path(__file__).parent)!r});"
            f"import chunked_loss as b; torch_threads = __import__('torch').set_num_threads(2);"
            f"print(json.dumps(b.{part}({variant!r}, {seq_len}, {rounds}, {chunk}, **{extra!r})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--step-seq-len", type=int, default=512, help="0 skips the whole-step part")
    parser.add_argument("--chunks", type=int, nargs="+", default=[110, 512], help="chunk sizes to measure")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cuda: part 1 on the GPU, liger-kernel's fused loss measured too (part 2 stays on CPU)")
    args = parser.parse_args()

    # Rounds in separate processes, the variants interleaved: the machine is shared.
    names = ["full"] + [f"chunked {c}" for c in args.chunks] + (["liger"] if args.device == "cuda" else [])
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for i in range(args.rounds):
        for name in (names if i % 2 == 0 else names[::-1]):
            chunk = int(name.split()[1]) if name.startswith("chunked") else 0
            runs[name].append(run("loss_only", name.split()[0], args.seq_len, 2, chunk, args.device))
    loss = {n: {**rs[0], "seconds": statistics.median(r["seconds"] for r in rs),
                "peak_mib": statistics.median(r["peak_mib"] for r in rs)} for n, rs in runs.items()}
    full = loss["full"]
    print(f"loss forward + backward, qwen2-0.5b head (151,936 x 896), 1 x {args.seq_len} tokens, fp32, "
          f"{args.device}, median of {args.rounds} processes a path")
    print("| path | peak MiB | ratio | seconds | ratio |\n| --- | ---: | ---: | ---: | ---: |")
    for name, r in loss.items():
        label = {"full": "transformers' path (full logits)", "liger": "liger-kernel fused linear CE"}.get(
            name, f"{name} tokens")
        print(f"| {label} | {r['peak_mib']:,.0f} | {r['peak_mib'] / full['peak_mib']:.2f}x | {r['seconds']:.2f} | "
              f"{full['seconds'] / r['seconds']:.2f}x speed |")
    for name in names[1:]:
        chunked = loss[name]
        print(f"{name}: relative differences: loss {rel(chunked['loss'], full['loss']):.1e}, "
              f"grad(W) norm {rel(chunked['grad_weight_norm'], full['grad_weight_norm']):.1e}, "
              f"grad(h) norm {rel(chunked['grad_hidden_norm'], full['grad_hidden_norm']):.1e}")
    if not args.step_seq_len:
        return
    steps = {"full": [], "chunked": []}
    for i in range(2):  # alternate the order: the machine is shared
        for v in (("full", "chunked") if i == 0 else ("chunked", "full")):
            steps[v].append(run("train_step", v, args.step_seq_len, 3, args.chunks[-1]))
    print(f"\nwhole step (forward + backward), qwen2-0.5b, 1 x {args.step_seq_len} tokens, fp32, chunk "
          f"{args.chunks[-1]}; 2 processes a path")
    print("| path | step s | speed ratio | process peak MiB | ratio |\n| --- | ---: | ---: | ---: | ---: |")
    med = {v: (statistics.median(r["seconds"] for r in rs), statistics.median(r["peak_mib"] for r in rs))
           for v, rs in steps.items()}
    for v in ("full", "chunked"):
        print(f"| {v} | {med[v][0]:.2f} | {med['full'][0] / med[v][0]:.2f}x | {med[v][1]:,.0f} | "
              f"{med[v][1] / med['full'][1]:.2f}x |")
    a, b = steps["chunked"][0], steps["full"][0]
    print(f"relative differences: loss {rel(a['loss'], b['loss']):.1e}, grad norm {rel(a['grad_norm'], b['grad_norm']):.1e}")


if __name__ == "__main__":
    main()
