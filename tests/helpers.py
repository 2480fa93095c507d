"""What the tests share, in one module (fixtures are in the conftest.py files):

- paths and the shipped samples;
- running the real launchers: torchrun, the deepspeed launcher or plain python, tiny and on CPU;
  several runs of a stage in one launch (tests/launch_cases.py);
- reading a run: its metrics, its losses, a copy of it rewound to an earlier checkpoint;
- ranks in-process: fresh processes joined by gloo, each building a trainer as the launchers do;
- synthetic DeepSpeed checkpoints and a stand-in engine that saves like one;
- small data helpers and a child process's peak memory.

Nothing here is a test; a test module imports from here, never from another test module.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from itertools import islice
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "data" / "samples"
SHAREGPT = SAMPLES / "sharegpt_identity_500.json"
PAIRS = SAMPLES / "pref_pairs.jsonl"
VENV_BIN = Path(sys.executable).parent


def sample_texts(english_lines: int = 4000, poems: int = 1500) -> list[str]:
    """A slice of the English and Chinese samples, as documents."""
    with open(SAMPLES / "tinyshakespeare.txt", encoding="utf-8") as f:
        english = "".join(islice(f, english_lines)).split("\n\n")
    with open(SAMPLES / "tang_poems_5k.jsonl", encoding="utf-8") as f:
        chinese = [json.loads(line)["text"] for line in islice(f, poems)]
    return english + chinese


# --------------------------------------------------------------------------- launching


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_flags(values: dict, **overrides) -> list[str]:
    """{"seq-len": 64, ...} with Python-style overrides (seq_len=128) -> ["--seq-len", "128", ...]."""
    values = {**values, **{k.replace("_", "-"): v for k, v in overrides.items()}}
    return [x for k, v in values.items() for x in (f"--{k}", str(v))]


def load_module(relative_path: str):
    """A script of the repository (not a package module) imported by path, e.g. a benchmark."""
    import importlib.util

    path = ROOT / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def launcher_env(cache_dir: Path | None = None, **extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env["PATH"] = f"{VENV_BIN}:{env.get('PATH', '')}"
    if cache_dir is not None:
        env["ZEROTRAIN_CACHE"] = str(cache_dir)
    env.update(extra)
    return env


def launcher_command(script: str, args: list[str], *, nproc: int = 2, launcher: str = "torchrun") -> list[str]:
    """The command line that runs launcher/<script> (or <script>, a path from the repository root)
    on `nproc` CPU ranks."""
    path = str(ROOT / script) if "/" in script else str(ROOT / "launcher" / script)
    port = str(free_port())
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", port, path]
    elif launcher == "deepspeed":
        cmd = [str(VENV_BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", port, path]
    else:
        cmd = [sys.executable, path]
    return cmd + [str(a) for a in args]


def run_launcher(script: str, args: list[str], *, nproc: int = 2, launcher: str = "torchrun",
                 env: dict[str, str] | None = None, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run launcher/<script>; fail the test with its output if it fails and `check`."""
    cmd = launcher_command(script, args, nproc=nproc, launcher=launcher)
    proc = subprocess.run(cmd, cwd=ROOT, env=env or launcher_env(), capture_output=True,
                          text=True, errors="replace", timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed with {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def run_cases(cases: dict[str, tuple[str, list]], folder: Path, *, nproc: int = 2, timeout: int = 900,
              may_fail: tuple[str, ...] = ()) -> dict[str, subprocess.CompletedProcess]:
    """Run `cases` ({name: (stage, flags)}) one after another in one launch (tests/launch_cases.py:
    torchrun, or plain python for one rank), so the start-up is paid once; fail, with the output,
    if the launch fails or a case not in `may_fail` does. Each case's exit status and part of the
    output come back as its own CompletedProcess. A single case without injected faults runs
    through its own launcher (launcher/<stage>.py) instead."""
    launcher = "torchrun" if nproc > 1 else "python"
    if len(cases) == 1:
        [(name, (stage, flags))] = cases.items()
        if not any(str(flag).startswith("--fault-") for flag in flags):
            return {name: run_launcher(f"{stage}.py", flags, nproc=nproc, launcher=launcher, timeout=timeout,
                                       check=name not in may_fail)}
    folder.mkdir(parents=True, exist_ok=True)
    spec = {name: {"stage": stage, "flags": [str(a) for a in flags]} for name, (stage, flags) in cases.items()}
    (folder / "cases.json").write_text(json.dumps(spec, indent=1))
    proc = run_launcher("tests/launch_cases.py", [folder / "cases.json"], nproc=nproc, timeout=timeout, check=False,
                        launcher=launcher)
    status = {n: (folder / f"status-{n}").read_text() if (folder / f"status-{n}").is_file() else None for n in cases}
    if proc.returncode != 0 or any(s != "0" and not (s is not None and n in may_fail) for n, s in status.items()):
        raise AssertionError(f"tests/launch_cases.py: exit {proc.returncode}, the cases' {status}:\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")

    def part(text: str, name: str) -> str:
        return text.split(f"=== case {name}\n", 1)[-1].split("=== case ", 1)[0]

    return {n: subprocess.CompletedProcess(proc.args, int(status[n]), part(proc.stdout, n), part(proc.stderr, n))
            for n in cases}


def selected_params(request, test_name: str, *argnames: str) -> list:
    """The parameters (`argnames`, a tuple when several) of test function `test_name` of the
    requesting fixture's module, for each of its cases this session runs: a fixture that makes
    every case's run in one launch makes only those (`make test-fast` selects one case). With no
    `argnames`: [()] if the session runs the test, else []."""
    found = []
    for item in request.session.items:
        if getattr(item, "originalname", None) == test_name and item.module is request.module:
            values = tuple(item.callspec.params[a] for a in argnames)
            value = values[0] if len(argnames) == 1 else values
            if value not in found:
                found.append(value)
    return found


PRETRAIN_RUN = {"preset": "debug", "seq-len": 32, "micro-batch-size": 4, "grad-accum": 1, "max-steps": 12,
                "warmup-steps": 2, "lr": 3e-3, "log-interval": 1, "eval-interval": 4, "eval-samples": 16,
                "save-interval": 2, "keep-last": 0, "zero-stage": 2, "precision": "fp32", "seed": 11}
"""The flags of the session's pretraining runs (conftest's `pretrained_runs`: 2 ranks, ZeRO-2 and
ZeRO-3): a test that resumes or repeats one of them passes the same flags (pretrain_args)."""


def pretrain_args(tokenizer_dir: Path, data: Path, out: Path, **overrides) -> list[str]:
    """PRETRAIN_RUN's flags for a run in `out`, with Python-style overrides (zero_stage=3)."""
    return cli_flags({"tokenizer": tokenizer_dir, "data": data, "output-dir": out, **PRETRAIN_RUN}, **overrides)


# --------------------------------------------------------------------------- reading a run


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run_dir) if "loss" in r}


def rewound_copy(run: Path, into: Path, step: int, later: tuple[str, ...]) -> Path:
    """A copy of run directory `run` as it stood after saving `step`: the `later` tags and final/
    left out, `latest` naming global_step{step} (what a crash after that save leaves)."""
    import shutil

    shutil.copytree(run, into, ignore=shutil.ignore_patterns(*later, "final"))
    (into / "checkpoints" / "latest").write_text(f"global_step{step}")
    return into


# --------------------------------------------------------------------------- ranks in-process


def run_ranks(fn, world_size: int, *args) -> None:
    """Run fn(rank, world_size, *args) on `world_size` fresh processes joined by gloo."""
    import torch.multiprocessing as mp

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1",
                      TOKENIZERS_PARALLELISM="false")
    mp.start_processes(_rank_main, args=(fn, world_size, args), nprocs=world_size, start_method="spawn")


def run_ranks_in_turn(world_size: int, calls: list[tuple]) -> None:
    """Run each (fn, *args) of `calls` in turn, fn(rank, world_size, *args), on one set of
    `world_size` fresh processes: their start, imports and process group are paid once, not once
    a call. The calls must leave the processes as they found them (no patched module)."""
    run_ranks(_in_turn, world_size, calls)


def _in_turn(rank: int, world_size: int, calls: list[tuple]) -> None:
    for fn, *args in calls:
        fn(rank, world_size, *args)


def _rank_main(rank: int, fn, world_size: int, args) -> None:
    import torch

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    from engine.distributed import shutdown_distributed

    fn(rank, world_size, *args)
    shutdown_distributed()


def build_trainer(rank: int, world_size: int, out: Path, base_model_dir: Path, stage: str, **flags):
    """A trainer for a tiny SFT (padded batches) or pretraining run, set up as the launchers do."""
    from engine.config.parse import parse_config
    from engine.distributed import World
    from engine.objectives.causal_lm import PRETRAIN, SFT
    from engine.training.main import setup

    values = {"init-from": base_model_dir, "data": SHAREGPT, "output-dir": out / f"run{world_size}", "seq-len": 64,
              "micro-batch-size": 2, "grad-accum": 1, "max-steps": 4, "warmup-steps": 1, "lr": 5e-3,
              "zero-stage": 2, "precision": "fp32", "seed": 3, "eval-samples": 8, "val-fraction": 0.2}
    cfg = parse_config(cli_flags(values, **flags))
    return setup(cfg, SFT if stage == "sft" else PRETRAIN, World(rank, rank, world_size))


def peek(loader, count: int) -> list[dict]:
    """The next `count` micro-batches of a loader, leaving it where it was."""
    state = loader.state_dict()
    batches = [loader.next_batch() for _ in range(count)]
    loader.load_state_dict(state)
    return batches


def step_records(trainer, steps: int) -> list[dict]:
    """The records of the trainer's next `steps` steps, each with its gradient norm (None where
    DeepSpeed keeps none: ZeRO-0's plain fp32 optimizer)."""
    records = []
    for _ in range(steps):
        record = trainer.train_step()
        norm = trainer.engine.get_global_grad_norm()
        record["grad_norm"] = None if norm is None else float(norm)
        records.append(record)
    return records


# --------------------------------------------------------------------------- preference runs

REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")


def dpo_args(out: Path, **flags) -> list[str]:
    values = {"data": PAIRS, "output-dir": out, "seq-len": 96, "micro-batch-size": 2, "grad-accum": 1,
              "max-steps": 4, "warmup-steps": 0, "lr": 2e-3, "zero-stage": 2, "precision": "fp32", "seed": 3,
              "eval-samples": 8, "val-fraction": 0.05, "log-interval": 1, "eval-interval": 100, "save-interval": 100,
              "pack": "false",  # padded pairs, one a row, unless a test packs them (launcher/dpo.py's default)
              # a cache per test: the precomputed reference is really computed where a test asks for it
              "data-cache-dir": Path(out).parent / "cache"}
    return cli_flags(values, **flags)


def dpo_trainer(rank: int, world_size: int, out: Path, base_model_dir: Path, **flags):
    """A DPO trainer (launcher/dpo.py's setup) from `base_model_dir` on the shipped pairs."""
    from engine.distributed import World
    from engine.objectives.preference import DPO
    from engine.stages import config_for
    from engine.training.main import setup

    cfg = config_for(DPO, dpo_args(out / f"run{world_size}", init_from=base_model_dir, **flags))
    return setup(cfg, DPO, World(rank, rank, world_size))


def same_records(a: list[dict], b: list[dict], rel: float) -> None:
    """Two runs' step records agree in loss, gradient norm and every reward metric."""
    import pytest

    for x, y in zip(a, b, strict=True):
        for key in ("loss", "grad_norm", *REWARDS):
            if x[key] is None or y[key] is None:
                continue
            assert x[key] == pytest.approx(y[key], rel=rel, abs=1e-5), key


# --------------------------------------------------------------------------- synthetic checkpoints

CHECKPOINT_WORLD = 2
"""The world size of sidecar()'s tags."""


def weights(seed: int = 0) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    # Odd sizes, so every partition needs padding.
    return {"embed.weight": torch.randn(7, 5, generator=g), "norm.weight": torch.randn(5, generator=g),
            "proj.weight": torch.randn(3, 5, generator=g), "proj.bias": torch.randn(3, generator=g)}


def save_zero3(tag: Path, params: dict, world: int, frozen: tuple[str, ...] = ()) -> None:
    """What DeepSpeed ZeRO-3 writes: each parameter cut in `world` slices of ceil(n / world), padded."""
    import math

    import torch

    tag.mkdir(parents=True)
    trainable = {n: t for n, t in params.items() if n not in frozen}

    def slice_of(t: torch.Tensor, r: int) -> torch.Tensor:
        part = math.ceil(t.numel() / world)
        padded = torch.cat([t.flatten(), torch.zeros(part * world - t.numel())])
        return padded[r * part:(r + 1) * part].clone()

    for r in range(world):
        flat = torch.cat([slice_of(t, r) for t in trainable.values()])
        torch.save({"optimizer_state_dict": {"zero_stage": 3, "partition_count": world, "fp32_flat_groups": [flat],
                                             "optimizer_state_dict": {"state": {0: {"exp_avg": torch.ones(10)}}}}},
                   tag / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
        torch.save({"module": {n: torch.empty(0) for n in params} | {"lm_head.weight": torch.empty(0)},
                    "buffer_names": [], "param_shapes": [{n: t.shape for n, t in trainable.items()}],
                    "frozen_param_shapes": {n: params[n].shape for n in frozen},
                    "frozen_param_fragments": {n: slice_of(params[n], r) for n in frozen},
                    "shared_params": {"lm_head.weight": "embed.weight"} if r == 0 else {},
                    "global_steps": 5, "dp_world_size": world},
                   tag / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt")


def sidecar(step: int, files: dict[str, str]):
    """A pretraining run's zerotrain.json for a ZeRO-3 tag of CHECKPOINT_WORLD ranks."""
    from engine.checkpoint.sidecar import Sidecar

    return Sidecar(step=step, tokens_seen=0, kind="pretrain", zero_stage=3, world_size=CHECKPOINT_WORLD,
                   precision="fp32", config={}, model_config={}, files=files)


class FakeEngine:
    """Saves a tag's files as a DeepSpeed engine does, for engine.checkpoint.save on one gloo rank
    (the `one_rank` fixture)."""

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict, save_latest: bool) -> None:
        import torch

        path = Path(save_dir) / tag
        path.mkdir(parents=True, exist_ok=True)
        torch.save({"module": {"w": torch.ones(3)}, **client_state}, path / "mp_rank_00_model_states.pt")
        torch.save({"optimizer_state_dict": {"m": torch.zeros(5)}}, path / "zero_pp_rank_0_mp_rank_00_optim_states.pt")


# --------------------------------------------------------------------------- data and child processes


def labelled_runs(ids, labels):
    """Contiguous runs of trained-on tokens, as token lists."""
    from engine.data.format import IGNORE_INDEX

    runs, current = [], []
    for token, label in zip(ids, labels):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    return runs + ([current] if current else [])


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


# For a child process: the growth of its peak RSS over a phase, in MB. Not ru_maxrss, which a child
# inherits from its parent at spawn (pytest's own RSS would hide a child smaller than it): VmHWM is
# the child's own peak, and writing 5 to clear_refs resets it to the current RSS (Linux >= 4.0).
PEAK_RSS = textwrap.dedent(r"""
    import re

    def _status_mb(key):
        with open("/proc/self/status") as f:
            return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1)) / 1024

    def phase_start():
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_mb("VmRSS")

    def peak_growth(start):
        return _status_mb("VmHWM") - start
""")


def peak_rss_child(script: str, *args: str) -> list[float]:
    """Run `script` (which prints MB figures from PEAK_RSS's functions) in a fresh process."""
    import pytest

    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("peak RSS per phase needs Linux's /proc/self/clear_refs")
    run = subprocess.run([sys.executable, "-c", PEAK_RSS + textwrap.dedent(script), *args], capture_output=True,
                         text=True, check=True)
    return [float(x) for x in run.stdout.split()]
