"""`zerotrain env`: the versions it prints are the ones this interpreter imports; --json parses."""

from __future__ import annotations

import json

import deepspeed
import torch

from engine.apps.cli import main


def test_env_json_reports_the_imported_versions(capsys, tmp_path):
    assert main(["env", "--json", "--output-dir", str(tmp_path / "not" / "yet")]) == 0
    report = json.loads(capsys.readouterr().out)  # stdout holds the JSON alone, library chatter aside
    assert report["torch"] == torch.__version__ and report["deepspeed"] == deepspeed.__version__
    for key in ("python", "transformers", "peft", "trl", "datasets", "tokenizers", "safetensors", "torch_cuda",
                "torch_nccl", "accelerator", "device_count", "ninja", "cxx", "cuda_home", "data_cache_free_gib"):
        assert key in report, key
    assert report["output_dir"] == str(tmp_path / "not" / "yet") and report["output_free_gib"] > 0
    assert report["device_count"] == (torch.cuda.device_count() if torch.cuda.is_available() else 0)


def test_env_table_is_aligned_name_value_lines(capsys):
    assert main(["env"]) == 0
    lines = capsys.readouterr().out.splitlines()
    table = dict(line.split(None, 1) for line in lines)
    assert table["torch"] == torch.__version__ and table["deepspeed"] == deepspeed.__version__
    value_column = {len(line) - len(line.split(None, 1)[1]) for line in lines}
    assert len(value_column) == 1, value_column


def test_env_lists_each_gpu_torch_sees(monkeypatch):
    from types import SimpleNamespace

    from engine.apps import env_report

    h200 = SimpleNamespace(name="NVIDIA H200", total_memory=140 * env_report.GIB, major=9, minor=0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: h200)
    report = env_report._accelerator()
    assert report["cuda_available"] is True and report["device_count"] == 2
    assert report["devices"] == ["0: NVIDIA H200 (140.0 GiB, sm_90)", "1: NVIDIA H200 (140.0 GiB, sm_90)"]
