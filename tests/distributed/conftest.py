"""Shared fixture: one 2-rank torchrun job that saves a DeepSpeed checkpoint for every case in
make_checkpoints.CASES (ZeRO 0-3, fp32/bf16, tied GPT-2, LoRA) and dumps the live weights."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ds_checkpoints(tmp_path_factory, tokenizer_dir) -> dict[str, dict]:
    """{case: manifest} with manifest["ckpt_dir"] and manifest["live"][tag] -> live weights file."""
    out = tmp_path_factory.mktemp("ds_checkpoints")
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(HERE / "make_checkpoints.py"), str(out), str(tokenizer_dir)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, errors="replace", timeout=600)
    if result.returncode != 0:
        pytest.fail(f"make_checkpoints.py failed ({result.returncode}):\n"
                    f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    manifests = {}
    for case in sorted(p for p in out.iterdir() if (p / "manifest.json").is_file()):
        manifests[case.name] = json.loads((case / "manifest.json").read_text())
    return manifests
