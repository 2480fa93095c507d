"""Checkpoint consolidation: `zerotrain consolidate` against DeepSpeed's own zero_to_fp32.py on the
same ZeRO-3 checkpoint, wall time and peak RSS, each run in its own subprocess.

    python scripts/bench/consolidate.py [--preset minimind-104m] [--rounds 3] [--workdir DIR]

First a ZeRO-3 bf16 checkpoint of the preset (104M parameters) is made by one training step on 2
CPU ranks (`torchrun`, this same script with --make-checkpoint). Then both tools turn it into fp32
weights, each run in its own process, the order rotating every round:

    zero_to_fp32.py CKPT OUT            (its default: OUT/pytorch_model.bin; the baseline)
    zerotrain consolidate CKPT OUT.pth  (the same torch.save format; checked equal to the baseline)
    zerotrain consolidate CKPT OUT.safetensors
    zerotrain consolidate CKPT OUT --preset PRESET   (HF directory)

zero_to_fp32's own --safe_serialization cannot write tied weights (it is tried once and its
answer printed). Peak RSS is each child's own ru_maxrss (os.wait4), wall time from spawn to exit;
medians over the rounds and their ratios to zero_to_fp32 are printed. The checkpoint files are
read once before timing, so every run finds them in the page cache.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def make_checkpoint(out: Path, preset: str) -> None:
    """Runs under torchrun: one bf16 ZeRO-3 training step, then save_checkpoint."""
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(ROOT))
    from model.presets import preset_config

    deepspeed.init_distributed("gloo")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(preset_config(preset))
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "steps_per_print": 10 ** 9,
              "zero_optimization": {"stage": 3}, "bf16": {"enabled": True}}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    x = torch.randint(0, model.config.vocab_size, (1, 32))
    engine.backward(engine(input_ids=x, labels=x).loss)
    engine.step()
    engine.save_checkpoint(str(out))


def measure(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one subprocess."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")))
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    err = proc.stderr.read().decode(errors="replace")
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    rss = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return wall, rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="minimind-104m")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", help="keep the checkpoint here (reused when present)")
    parser.add_argument("--make-checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--check-equal", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make_checkpoint:
        make_checkpoint(Path(args.make_checkpoint), args.preset)
        return
    if args.check_equal:
        print(*check_equal(Path(args.check_equal)))
        return

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-consolidate-"))
    ckpt = work / "checkpoint"
    if not (ckpt / "latest").is_file():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        torchrun = Path(sys.executable).with_name("torchrun")
        subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", str(port), __file__,
                        "--preset", args.preset, "--make-checkpoint", str(ckpt)], check=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tag = ckpt / (ckpt / "latest").read_text().strip()
    files = sorted(tag.glob("*.pt"))
    for f in files:  # warm the page cache for both sides
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass

    # The copy DeepSpeed writes into every checkpoint dir, run as its docstring says.
    z2f = str(ckpt / "zero_to_fp32.py")
    zerotrain = [sys.executable, "-m", "engine.apps.cli", "consolidate", str(ckpt)]
    out = work / "out"
    baseline = "zero_to_fp32 -> pytorch_model.bin"
    runs = {
        baseline: [sys.executable, z2f, str(ckpt), str(out / "z2f")],
        "zerotrain -> .pth": zerotrain + [str(out / "zt.pth")],
        "zerotrain -> .safetensors": zerotrain + [str(out / "zt.safetensors")],
        "zerotrain -> HF dir": zerotrain + [str(out / "hf"), "--preset", args.preset],
    }
    os.chdir(ROOT)
    results: dict[str, list[tuple[float, int]]] = {label: [] for label in runs}
    for round_ in range(args.rounds):
        labels = list(runs)
        labels = labels[round_ % len(labels):] + labels[:round_ % len(labels)]  # rotate who goes first
        for label in labels:
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            results[label].append(measure(runs[label]))
            if round_ == 0 and label == "zerotrain -> .pth":
                (out / "z2f").mkdir()
                measure(runs[baseline])
                # In a child: this process stays small, since a child's peak RSS counts its parent's
                # at the moment it was spawned (Linux keeps the larger across exec).
                check = subprocess.run([sys.executable, __file__, "--check-equal", str(out)], check=True,
                                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
                params, output_bytes = map(int, check.stdout.split()[-2:])
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    # DeepSpeed's safetensors path, for the record: it refuses tied weights (lm_head = embed_tokens).
    safe = subprocess.run([sys.executable, z2f, str(ckpt), str(out / "z2f"), "--safe_serialization"],
                          capture_output=True, text=True)
    safe_note = "ok" if safe.returncode == 0 else "fails: " + next(
        (line.strip() for line in safe.stderr.splitlines() if "share memory" in line), safe.stderr.strip()[-200:])
    ckpt_bytes = sum(f.stat().st_size for f in files)

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {_mem_gb():.0f} GB RAM; "
          f"python {platform.python_version()}")
    print(f"checkpoint: {args.preset}, {params / 1e6:.1f}M parameters, ZeRO-3 bf16, 2 ranks, "
          f"{ckpt_bytes / 1e9:.2f} GB on disk; fp32 output {output_bytes / 1e6:.0f} MB; {args.rounds} rounds")
    print(f"{'run':<34} {'wall s':>8} {'peak RSS MB':>12} {'time ratio':>11} {'RSS ratio':>10} {'RSS/output':>11}")
    base_wall = statistics.median(w for w, _ in results[baseline])
    base_rss = statistics.median(r for _, r in results[baseline])
    for label, measured in results.items():
        wall = statistics.median(w for w, _ in measured)
        rss = statistics.median(r for _, r in measured)
        print(f"{label:<34} {wall:>8.2f} {rss / 1e6:>12.0f} {wall / base_wall:>11.2f} {rss / base_rss:>10.2f} "
              f"{rss / output_bytes:>11.2f}")
    print("(medians; ratios are run / zero_to_fp32)")
    print(f"zero_to_fp32 --safe_serialization: {safe_note}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


def _mem_gb() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError):
        return float("nan")


def check_equal(out: Path) -> tuple[int, int]:
    """zerotrain's .pth holds the same tensors as zero_to_fp32's; return its parameter count and size."""
    import torch

    ours = torch.load(out / "zt.pth", weights_only=True)
    theirs = torch.load(out / "z2f" / "pytorch_model.bin", weights_only=True)
    if set(ours) != set(theirs):
        raise SystemExit(f"outputs differ in keys: {sorted(set(ours) ^ set(theirs))[:3]}")
    bad = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    if bad:
        raise SystemExit(f"outputs differ: {bad[:3]}")
    seen = set()
    params = 0
    for t in ours.values():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            params += t.numel()
    return params, (out / "zt.pth").stat().st_size


if __name__ == "__main__":
    main()
