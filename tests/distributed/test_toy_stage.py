"""The toy stage (tests/toy_stage.py), registered and nothing else, trains through the one loop:
its objective is what the loop optimises (its loss is --toy-weight times SFT's on the same model
and batch), its metric and config section reach metrics.jsonl and config.yaml, and its checkpoints
say which stage wrote them."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.helpers import SAMPLES, run_ranks

pytestmark = pytest.mark.distributed


def _train(rank, world_size, out, base_model_dir, name, extra):
    from engine.objectives.causal_lm import SFT
    from engine.stages import register
    from engine.training.main import main
    from tests.toy_stage import TOY

    register(TOY)  # this process's registry: the parent's is left as it was
    argv = ["--init-from", str(base_model_dir), "--data", str(SAMPLES / "sharegpt_identity_500.json"),
            "--output-dir", str(out / name), "--seq-len", "64", "--micro-batch-size", "2", "--max-steps", "2",
            "--warmup-steps", "0", "--lr", "1e-3", "--precision", "fp32", "--zero-stage", "0", "--log-interval", "1",
            "--eval-interval", "0", "--eval-samples", "4", "--val-fraction", "0.05", "--seed", "5",
            "--data-cache-dir", str(out / "cache"), *extra]
    assert main(argv, TOY if name == "toy" else SFT) == 0


def test_a_stage_declared_outside_the_engine_trains_through_the_one_loop(base_model_dir, tmp_path):
    # One process each: main() ends its process group, which a second main() in the process cannot reuse.
    run_ranks(_train, 1, tmp_path, base_model_dir, "toy", ["--toy-weight", "3"])
    run_ranks(_train, 1, tmp_path, base_model_dir, "sft", [])
    toy, sft = ([json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
                for name in ("toy", "sft"))
    # The first step: the same init, data and batch, so the same NLL; the toy's loss is 3x it.
    assert toy[0]["toy/nll"] == pytest.approx(sft[0]["loss"], rel=1e-6)
    assert toy[0]["loss"] == pytest.approx(3 * sft[0]["loss"], rel=1e-6)
    assert any("val_toy/nll" in r for r in toy)
    assert yaml.safe_load((tmp_path / "toy" / "config.yaml").read_text())["toy"] == {"toy_weight": 3.0}
    sidecar = json.loads((tmp_path / "toy" / "checkpoints" / "global_step2" / "zerotrain.json").read_text())
    assert sidecar["kind"] == "toy" and sidecar["config"]["toy"]["toy_weight"] == 3.0
    assert (tmp_path / "toy" / "final" / "config.json").is_file()
