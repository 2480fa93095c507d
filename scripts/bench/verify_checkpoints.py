"""Cost of `--verify-checkpoints full`: hashing a whole checkpoint file, per GB, against writing
the same bytes with torch.save and reading them back, on this machine.

    .venv/bin/python scripts/bench/verify_checkpoints.py [--mb 512] [--rounds 3] [--workdir DIR]

A state dict of fp32 tensors (`--mb` MB, shaped like an optimizer shard) is written with
torch.save, as DeepSpeed writes its shards (no fsync), then, every round, the order rotating:

    save       torch.save of the state dict to a new file      (the baseline the hash is paid beside)
    read       the file read back in 8 MiB chunks, nothing else (the floor of any hash)
    <hash>     engine.checkpoint.checksums.file_digest with each candidate of the standard library

Every read finds the file in the page cache, as the background hash does right after a save;
a resume on another node reads from disk first, which costs what `read` costs there. Medians over
the rounds are printed as s/GB and as ratios to `save` and to `read`.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

CANDIDATES = ("crc32", "sha256", "blake2b", "sha1", "md5")


def state_dict(mb: int):
    import torch

    per = 16 << 20  # 16 MiB tensors, like the flat groups of a ZeRO shard
    n = max(1, (mb << 20) // per)
    g = torch.Generator().manual_seed(0)
    return {f"group{i}": torch.randn(per // 4, generator=g) for i in range(n)}


def read_back(path: Path) -> None:
    buffer = bytearray(8 << 20)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buffer):
            pass


def main() -> None:
    import torch

    from engine.checkpoint.checksums import file_digest

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", default=None, help="where the file is written (default: a temporary dir)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sd = state_dict(args.mb)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        path = Path(tmp) / "shard.pt"
        torch.save(sd, path)
        gb = path.stat().st_size / 1e9

        def save() -> None:
            target = Path(tmp) / "again.pt"
            torch.save(sd, target)
            target.unlink()

        jobs = {"save": save, "read": lambda: read_back(path)}
        jobs.update({name: (lambda name=name: file_digest(path, name)) for name in CANDIDATES})
        times: dict[str, list[float]] = {name: [] for name in jobs}
        names = list(jobs)
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                start = time.perf_counter()
                jobs[name]()
                times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}, "
          f"torch {torch.__version__}; file {gb:.3f} GB, {args.rounds} rounds (medians)")
    print(f"{'job':10} {'s/GB':>7} {'GB/s':>6} {'x save':>7} {'x read':>7}")
    for name, t in median.items():
        print(f"{name:10} {t / gb:7.3f} {gb / t:6.2f} {t / median['save']:7.2f} {t / median['read']:7.2f}")


if __name__ == "__main__":
    main()
