"""Running the real launchers from tests: torchrun or the deepspeed launcher, tiny and on CPU."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_flags(values: dict, **overrides) -> list[str]:
    """{"seq-len": 64, ...} with Python-style overrides (seq_len=128) -> ["--seq-len", "128", ...]."""
    values = {**values, **{k.replace("_", "-"): v for k, v in overrides.items()}}
    return [x for k, v in values.items() for x in (f"--{k}", str(v))]


def rewound_copy(run: Path, into: Path, step: int, later: tuple[str, ...]) -> Path:
    """A copy of run directory `run` as it stood after saving `step`: the `later` tags and final/
    left out, `latest` naming global_step{step} (what a crash after that save leaves)."""
    import shutil

    shutil.copytree(run, into, ignore=shutil.ignore_patterns(*later, "final"))
    (into / "checkpoints" / "latest").write_text(f"global_step{step}")
    return into


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


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run_dir) if "loss" in r}
