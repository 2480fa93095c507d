"""The tiers, and the fixtures every tier shares.

Tiers (pytest.ini's markers): a test under tests/distributed, tests/faults or tests/system carries
its folder's marker (added here if its module forgot it); a test elsewhere that starts processes or
takes long is marked `slow` or `distributed` by hand. An unmarked test is a unit test: in-process,
and the guard below fails it if it starts a process.

Session fixtures: one small tokenizer trained on the shipped samples, prepared pretraining tokens,
a random debug-preset model, the session's pretraining runs (one launch, every test that needs a
trained model or a run to resume or break), and a gloo process group of one rank in-process.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, free_port, pretrain_args, run_cases, sample_texts

# DeepSpeed builds its CPU ops (the gloo shared-memory op, CPU Adam) on first use into torch's
# extension cache. The default one (~/.cache/torch_extensions) is shared by every venv, and one of
# other paths rebuilds the ops over the other's; the tests, and the demo they run, use the venv's own
# (as scripts/demo.sh does), so the ops are built once per venv.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))

TIERS = ("distributed", "faults", "system")
"""Folders of tests/ whose name is their tests' marker."""
SLOW_TIERS = ("slow", *TIERS)


def pytest_collection_modifyitems(config, items) -> None:
    tests = ROOT / "tests"
    for item in items:
        folder = Path(item.path).relative_to(tests).parts[0] if Path(item.path).is_relative_to(tests) else ""
        if folder in TIERS and item.get_closest_marker(folder) is None:
            item.add_marker(folder)


@pytest.fixture(autouse=True)
def unit_tests_start_no_process(request, monkeypatch):
    """A test with no tier marker is a unit test: it must not start a Python process (a launcher, a
    CLI, an interpreter, a pool of workers), each of which costs seconds of imports. One that does
    fails here, naming the marker it needs. A tool's quick probe (`ninja --version`) is allowed."""
    if any(request.node.get_closest_marker(m) for m in SLOW_TIERS):
        yield
        return
    import multiprocessing.process
    import subprocess

    def refuse(what: str) -> None:
        raise AssertionError(f"{request.node.nodeid} started {what}: unit tests run in-process; mark it `slow` "
                             "(`distributed` where it starts DeepSpeed ranks)")

    popen_init = subprocess.Popen.__init__

    def checked_popen(self, args, *rest, **kwargs):
        program = args if isinstance(args, (str, bytes, os.PathLike)) else args[0]
        if kwargs.get("shell") or _is_python(str(program)):
            refuse(f"a process ({args if isinstance(args, str) else ' '.join(map(str, args))[:200]})")
        popen_init(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", checked_popen)
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", lambda self: refuse(f"a worker process {self}"))
    yield


def _is_python(program: str) -> bool:
    """The program is a Python interpreter or a Python script (a console script such as zerotrain)."""
    path = shutil.which(program) or program
    if Path(path).name.startswith("python"):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(128)
    except OSError:
        return False
    return head.startswith(b"#!") and b"python" in head.split(b"\n", 1)[0]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    from model.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer(sample_texts(), vocab_size=1000, output_dir=str(out), show_progress=False)
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from model.tokenizer import load_tokenizer

    return load_tokenizer(str(tokenizer_dir))


@pytest.fixture(scope="session")
def pretrain_data(tokenizer, tmp_path_factory) -> Path:
    """Prepared pretraining tokens (a slice of the English and Chinese samples), shared by every run."""
    from engine.data.prepare import prepare

    tmp = tmp_path_factory.mktemp("pretrain")
    src = tmp / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in sample_texts(2000, 600)))
    prepare("pretrain", [str(src)], tokenizer, tmp / "prepared", val_fraction=0.05, show_progress=False)
    return tmp / "prepared"


@pytest.fixture(scope="session")
def base_model_dir(tokenizer, tmp_path_factory) -> Path:
    """A debug-preset model with a little structure in it, saved in HF format with the tokenizer."""
    import torch

    from model.build import build_model

    torch.manual_seed(0)
    model = build_model("debug", vocab_size=len(tokenizer))
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.config, name, getattr(tokenizer, name))
    out = tmp_path_factory.mktemp("base") / "model"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def pretrained_runs(tokenizer_dir, pretrain_data, tmp_path_factory) -> dict[int, Path]:
    """{2: run, 3: run}: helpers.PRETRAIN_RUN under ZeRO-2 and ZeRO-3 (2 ranks, fp32, 12 steps, a
    checkpoint every 2, an evaluation every 4), both in one launch. The trained model of the tests
    that need one, the straight run of the resume tests, the unbroken run of the fault tests.
    Shared: a test that changes a run works on a copy (helpers.rewound_copy, shutil.copytree)."""
    out = tmp_path_factory.mktemp("pretrained")
    run_cases({f"zero{stage}": ("pretrain", pretrain_args(tokenizer_dir, pretrain_data, out / f"zero{stage}",
                                                          zero_stage=stage)) for stage in (2, 3)}, out)
    return {stage: out / f"zero{stage}" for stage in (2, 3)}


@pytest.fixture
def one_rank():
    """A gloo process group of one rank in this process (engine.checkpoint.save's collectives)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
