"""Shared fixture: one 2-rank torchrun job that saves a DeepSpeed checkpoint for every case in
make_checkpoints.CASES (ZeRO 0-3, fp32/bf16, tied GPT-2, LoRA) and dumps the live weights."""

from __future__ import annotations

import json

import pytest

from tests.helpers import run_launcher


def checkpoint_cases(session) -> list[str]:
    """The make_checkpoints cases this session's tests read: those of the selected tests that
    take a `case` parameter, or every case ([]) once a selected test names its own."""
    cases = []
    for item in session.items:
        if "ds_checkpoints" in getattr(item, "fixturenames", ()):
            case = getattr(item, "callspec", None) and item.callspec.params.get("case")
            if case is None:
                return []
            cases.append(case)
    return sorted(set(cases))


@pytest.fixture(scope="session")
def ds_checkpoints(request, tmp_path_factory, tokenizer_dir) -> dict[str, dict]:
    """{case: manifest} with manifest["ckpt_dir"] and manifest["live"][tag] -> live weights file."""
    out = tmp_path_factory.mktemp("ds_checkpoints")
    run_launcher("tests/distributed/make_checkpoints.py", [out, tokenizer_dir, *checkpoint_cases(request.session)])
    manifests = {}
    for case in sorted(p for p in out.iterdir() if (p / "manifest.json").is_file()):
        manifests[case.name] = json.loads((case / "manifest.json").read_text())
    return manifests
