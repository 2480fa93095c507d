"""The guard of the engine's per-step overhead: a step of the loop (Trainer.train_step with the
watchdog and metrics, ZeRO-0 and ZeRO-2, a world of one) against a bare PyTorch loop over the same
model, data, micro batch, optimizer, schedule and clipping, in one process with their steps
interleaved (scripts/bench/engine_overhead.py --in-process). Both ZeRO stages must take at least
0.9x the bare loop's steps per second: a ratio measured under the same load, never a time.

The debug preset at 8 x 128 tokens: its 6400-token head makes the loss over the logits much of a
step, where the engine lost its 10% (issue 22): with the logits sliced (copied) before the
cross-entropy this falls to about 0.8x; the engine as it is does about 1.05-1.3x."""

from __future__ import annotations

import json

import pytest

from tests.helpers import run_launcher

pytestmark = pytest.mark.distributed
FLOOR = 0.9


def test_a_step_keeps_up_with_a_bare_pytorch_loop(tmp_path):
    out = tmp_path / "overhead.json"
    run_launcher("scripts/bench/engine_overhead.py", ["--in-process", "--preset", "debug", "--seq-len", 128,
                                                      "--micro-batch-size", 8, "--steps", 30, "--json", out],
                 launcher="python", timeout=600)
    result = json.loads(out.read_text())
    ratios, medians = result["ratio_to_bare"], result["median_step_ms"]
    assert min(ratios.values()) >= FLOOR, (
        "the engine fell below 0.9x a bare loop's steps per second: "
        + ", ".join(f"{stage} {ratio:.3f}x (median step {medians[stage]:.1f} ms)" for stage, ratio in ratios.items())
        + f", bare loop {medians['bare']:.1f} ms; step times (ms): {result['step_ms']}")
