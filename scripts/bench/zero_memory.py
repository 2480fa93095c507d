"""ZeRO memory, measured: per-rank bytes of parameters, gradients and optimizer state for ZeRO
stages 0-3 at several world sizes, beside the ZeRO paper's formulas (Rajbhandari et al. 2020,
mixed precision with Adam: K = 12 bytes of optimizer state per parameter).

    python scripts/bench/zero_memory.py [--preset minimind-26m] [--world-sizes 1 2 4] [--stages 0 1 2 3]

Each (stage, N) is one `torchrun --nproc_per_node N` job (plain python for N = 1) with the shipped
`ds_configs/zero{stage}.json`, filled by zerotrain's `fill_ds_config` for bf16, and the model of
`--preset` (random weights; `--set key=value` overrides config fields, e.g. a wider `debug`).
It takes one optimizer step (so that Adam's moments exist), then runs the next step's two
micro-batches (grad accumulation 2), and after each backward takes a snapshot of the bytes this
rank holds: every distinct tensor storage reachable from the model's parameters
(`p.data`, `p.grad`, ZeRO-3's `p.ds_tensor`), the torch optimizer (`state`, fp32 master
partitions in `param_groups`) and DeepSpeed's ZeRO optimizer object, each storage counted once,
with the padding DeepSpeed adds. Storages are sorted into

- params: bf16 weights (ZeRO-3: this rank's partitions, plus parameters DeepSpeed keeps whole
  below `stage3_param_persistence_threshold`);
- grads: bf16 gradients (full `.grad`s, or the partition buffers of ZeRO-2/3);
- optim: fp32 master weights and Adam's two moments;
- buffers: everything else (communication buckets, bookkeeping), not part of the formulas.

The snapshot with the larger model state (params + grads + optim) is reported: mid-accumulation
for ZeRO-1, which keeps full gradients until the accumulation boundary. Each figure is the
largest over the ranks. The paper's per-rank model state for P parameters:
stage 0: 16P, stage 1: 4P + 12P/N, stage 2: 2P + 14P/N, stage 3: 16P/N.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

CATEGORIES = ("params", "grads", "optim", "buffers")
VOCAB_SIZE = 6400


def formula_bytes(stage: int, n_params: int, world_size: int) -> float:
    """The ZeRO paper's model-state bytes per rank (2-byte params and grads, K = 12)."""
    p, n = n_params, world_size
    return {0: 16 * p, 1: 4 * p + 12 * p / n, 2: 2 * p + 14 * p / n, 3: 16 * p / n}[stage]


def parse_overrides(items: list[str]) -> dict:
    """`key=value` strings -> config overrides (values read as JSON where they parse, else text)."""
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


# --------------------------------------------------------------------------- one rank's bytes

class StorageCensus:
    """Distinct tensor storages and the category of the first place each was found."""

    def __init__(self):
        self.seen: dict[int, tuple[str, int, str]] = {}

    def add(self, tensor, category: str, where: str) -> None:
        import torch

        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        if storage.nbytes() and storage.data_ptr() not in self.seen:
            self.seen[storage.data_ptr()] = (category, storage.nbytes(), where)

    def walk(self, obj, where: str, depth: int = 0) -> None:
        """Every tensor reachable from a DeepSpeed optimizer object, sorted by attribute name."""
        import torch

        if isinstance(obj, torch.Tensor):
            self.add(obj, classify(where), where)
            if obj.grad is not None:
                self.add(obj.grad, "grads", where + ".grad")
            return
        if depth > 6:
            return
        if isinstance(obj, dict):
            for key, value in list(obj.items()):
                self.walk(value, f"{where}[{key if isinstance(key, (str, int)) else type(key).__name__}]", depth + 1)
        elif isinstance(obj, (list, tuple)):
            for i, value in enumerate(obj):
                self.walk(value, f"{where}[{i}]", depth + 1)
        elif type(obj).__module__.startswith(("deepspeed", "torch.optim")) and hasattr(obj, "__dict__"):
            for key, value in list(vars(obj).items()):
                if key not in ("module", "_modules", "optimizer", "param_names"):
                    self.walk(value, f"{where}.{key}", depth + 1)

    def totals(self) -> dict[str, int]:
        out = dict.fromkeys(CATEGORIES, 0)
        for category, nbytes, _ in self.seen.values():
            out[category] += nbytes
        return out

    def breakdown(self) -> dict[str, list]:
        """{place with indices folded: [category, bytes, storages]}, for --verbose."""
        out: dict[str, list] = {}
        for category, nbytes, where in self.seen.values():
            entry = out.setdefault(re.sub(r"\[\d+\]", "[i]", where), [category, 0, 0])
            entry[1] += nbytes
            entry[2] += 1
        return out


def classify(where: str) -> str:
    """The category of a storage found inside DeepSpeed's optimizer, from the attribute's name."""
    name = where.lower()
    if "grad" in name and "norm" not in name:
        return "grads"
    if "fp32" in name or "master" in name:
        return "optim"
    if ("bit16" in name or "fp16" in name) and "meta" not in name:
        return "params"
    return "buffers"


def snapshot(engine) -> tuple[dict[str, int], dict[str, list]]:
    """Bytes this rank holds now, per category."""
    census = StorageCensus()
    for name, p in engine.module.named_parameters():
        if p.numel():  # ZeRO-3 leaves released parameters empty
            census.add(p.data, "params", "parameters (.data)")
        if hasattr(p, "ds_tensor"):
            census.add(p.ds_tensor, "params", "parameter partitions (ZeRO-3 .ds_tensor)")
        if p.grad is not None:
            census.add(p.grad, "grads", "gradients (.grad)")
    basic = getattr(engine.optimizer, "optimizer", engine.optimizer)  # the torch AdamW under the ZeRO wrapper
    for group in basic.param_groups:
        for p in group["params"]:
            census.add(p, "optim", "torch optimizer master weights")
            if p.grad is not None:
                census.add(p.grad, "grads", "torch optimizer master weights .grad")
    for state in basic.state.values():
        for key, value in state.items():
            census.add(value, "optim", f"torch optimizer state {key}")
    if engine.optimizer is not basic:
        census.walk(engine.optimizer, type(engine.optimizer).__name__)
    return census.totals(), census.breakdown()


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def worker(args) -> None:
    """One rank: build, take one step, snapshot the next step's micro-batches; rank 0 writes JSON."""
    import logging

    import deepspeed
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from engine.config.deepspeed import fill_ds_config, load_ds_config
    from engine.config.parse import parse_config
    from engine.distributed import init_distributed
    from engine.training.build import lr_lambda, param_groups
    from model.presets import preset_config

    deepspeed.utils.logger.setLevel(logging.WARNING)
    init_distributed(int(os.environ.get("LOCAL_RANK", 0)), 1800)
    world_size, rank = dist.get_world_size(), dist.get_rank()
    cfg = parse_config(["--preset", args.preset, "--zero-stage", str(args.stage), "--precision", "bf16",
                        "--micro-batch-size", "1", "--grad-accum", "2", "--seq-len", str(args.seq_len),
                        "--max-steps", "10", "--warmup-steps", "1"])
    raw, source = load_ds_config(cfg)
    ds = fill_ds_config(raw, cfg, world_size=world_size, precision="bf16", device_type="cpu", source=source)
    torch.manual_seed(0)
    config = preset_config(args.preset, VOCAB_SIZE, args.seq_len, **parse_overrides(args.set))
    model = AutoModelForCausalLM.from_config(config)
    n_params = sum(p.numel() for p in model.parameters())
    rss_before = rss_bytes()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, cfg.optim.weight_decay),
                                      config=ds, lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
                                          opt, lr_lambda(cfg)))
    generator = torch.Generator().manual_seed(rank)
    snapshots = []
    for micro_step in range(4):  # step 1: micro-batches 0, 1; step 2: 2 (mid-accumulation), 3 (boundary)
        ids = torch.randint(0, VOCAB_SIZE, (1, args.seq_len), generator=generator)
        engine.backward(engine(input_ids=ids, labels=ids, use_cache=False).loss)
        if micro_step >= 2:
            totals, breakdown = snapshot(engine)
            snapshots.append({"at": "mid-accumulation" if micro_step == 2 else "boundary", **totals,
                              "rss": rss_bytes(), "breakdown": breakdown})
        engine.step()
    chosen = max(snapshots, key=lambda s: s["params"] + s["grads"] + s["optim"])
    gathered = [None] * world_size
    dist.all_gather_object(gathered, {"rank": rank, "rss_before_init": rss_before, **chosen})
    if rank == 0:
        Path(args.out).write_text(json.dumps({"stage": args.stage, "world_size": world_size, "n_params": n_params,
                                              "ranks": gathered}))
    dist.barrier()
    dist.destroy_process_group()


# --------------------------------------------------------------------------- the driver

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(stage: int, world_size: int, preset: str, overrides: list[str], seq_len: int, out: Path,
            timeout: int = 600) -> dict:
    """Run the worker on `world_size` CPU ranks; its JSON result."""
    worker_args = [str(Path(__file__).resolve()), "--worker", "--stage", str(stage), "--preset", preset,
                   "--seq-len", str(seq_len), "--out", str(out)] + [x for kv in overrides for x in ("--set", kv)]
    port = str(free_port())
    if world_size == 1:
        cmd = [sys.executable] + worker_args
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world_size), "--master_addr",
               "127.0.0.1", "--master_port", port] + worker_args
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, errors="replace", timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return json.loads(out.read_text())


def per_rank_max(result: dict) -> dict[str, int]:
    """The largest figure over the ranks for each category (and for the model-state total)."""
    ranks = result["ranks"]
    out = {c: max(r[c] for r in ranks) for c in CATEGORIES}
    out["model_state"] = max(r["params"] + r["grads"] + r["optim"] for r in ranks)
    out["rss"] = max(r["rss"] for r in ranks)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="minimind-26m")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="model config override, e.g. --set hidden_size=512 (repeatable)")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--json", help="also write every result (per rank, with the breakdown by place) here")
    parser.add_argument("--verbose", action="store_true", help="print where rank 0's bytes are, per run")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stage", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    mb = 1 << 20
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for stage in args.stages:
            for n in args.world_sizes:
                result = measure(stage, n, args.preset, args.set, args.seq_len, Path(tmp) / f"s{stage}n{n}.json")
                results.append(result)
                if args.verbose:
                    print(f"stage {stage}, N={n}, rank 0 at {result['ranks'][0]['at']}:")
                    for where, (category, nbytes, count) in sorted(result["ranks"][0]["breakdown"].items(),
                                                                   key=lambda kv: -kv[1][1]):
                        print(f"    {category:8s} {nbytes / mb:10.2f} MiB  {count:4d} storages  {where}")
    n_params = results[0]["n_params"]
    print(f"\n{args.preset}{' ' + ' '.join(args.set) if args.set else ''}: P = {n_params:,} parameters; bf16 with "
          "fp32 master weights and AdamW; MiB per rank (largest over the ranks)")
    print(f"{'stage':>5s} {'N':>3s} {'params':>9s} {'grads':>9s} {'optim':>9s} {'model state':>12s} "
          f"{'formula':>9s} {'(bytes/P)':>13s} {'measured/formula':>16s} {'buffers':>9s} {'RSS':>8s}")
    formulas = {0: "16P", 1: "4P + 12P/N", 2: "2P + 14P/N", 3: "16P/N"}
    for result in results:
        m, stage, n = per_rank_max(result), result["stage"], result["world_size"]
        expected = formula_bytes(stage, n_params, n)
        print(f"{stage:5d} {n:3d} {m['params'] / mb:9.1f} {m['grads'] / mb:9.1f} {m['optim'] / mb:9.1f} "
              f"{m['model_state'] / mb:12.1f} {expected / mb:9.1f} {formulas[stage]:>13s} "
              f"{m['model_state'] / expected:15.3f}x {m['buffers'] / mb:9.1f} {m['rss'] / mb:8.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
