"""Distillation in-process (gloo, real DeepSpeed, the debug preset): a teacher partitioned by
ZeRO-3 over 2 ranks gives the steps of a 1-rank run with the teacher whole; a teacher with
another tokenizer is refused before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import SAMPLES
from tests.distributed.test_loop import run_ranks

pytestmark = pytest.mark.distributed
KEYS = ("loss", "ce", "kd")


@pytest.fixture(scope="module")
def teacher_dir(base_model_dir, tmp_path_factory) -> Path:
    """Another model over the same tokenizer: the base, perturbed."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_model_dir)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = tmp_path_factory.mktemp("teacher") / "model"
    model.save_pretrained(out)
    return out


def _steps(rank, world_size, out, base_model_dir, teacher_dir, name, flags):
    from engine.config import parse_config
    from engine.distributed import World
    from engine.objectives.distill import DISTILL
    from engine.train import setup

    values = {"init-from": base_model_dir, "teacher": teacher_dir, "data": SAMPLES / "sharegpt_identity_500.json",
              "output-dir": out / name, "seq-len": 64, "micro-batch-size": 2, "max-steps": 3, "warmup-steps": 0,
              "lr": 2e-3, "precision": "fp32", "seed": 3, "kd-loss": "reverse_kl", "kd-temperature": 1.5,
              "data-cache-dir": out / "cache"}
    values.update({k.replace("_", "-"): v for k, v in flags.items()})
    cfg = parse_config([x for k, v in values.items() for x in (f"--{k}", str(v))])
    trainer = setup(cfg, DISTILL, World(rank, rank, world_size))
    records = [trainer.train_step() for _ in range(3)]
    if rank == 0:
        (out / f"{name}.json").write_text(json.dumps(records))


def test_a_zero3_teacher_on_two_ranks_gives_the_one_rank_steps(base_model_dir, teacher_dir, tmp_path):
    run_ranks(_steps, 1, tmp_path, base_model_dir, teacher_dir, "one", dict(zero_stage=0, micro_batch_size=4))
    run_ranks(_steps, 2, tmp_path, base_model_dir, teacher_dir, "two", dict(zero_stage=2, teacher_zero_stage=3))
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    for a, b in zip(one, two, strict=True):
        for key in KEYS:
            assert a[key] == pytest.approx(b[key], rel=1e-4), key
    assert one[0]["kd"] > 0.01  # the teacher differs from the student
    assert one[0]["loss"] == pytest.approx(0.5 * one[0]["ce"] + 0.5 * 1.5 ** 2 * one[0]["kd"], rel=1e-6)


def test_a_teacher_with_another_tokenizer_is_refused(base_model_dir, tmp_path, tokenizer_dir):
    import shutil

    from tests.helpers import run_launcher

    teacher = tmp_path / "teacher"
    shutil.copytree(base_model_dir, teacher)
    (teacher / "tokenizer.json").write_text((teacher / "tokenizer.json").read_text().replace('"<|im_end|>"', '"<|end|>"'))
    proc = run_launcher("distill.py", ["--init-from", base_model_dir, "--teacher", teacher, "--data",
                                       SAMPLES / "sharegpt_identity_500.json", "--output-dir", tmp_path / "run"],
                        nproc=1, launcher="python", check=False)
    assert proc.returncode == 2 and "uses another tokenizer" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "run").exists()  # refused before any work
