"""ZeRO-3 shards the model state: measured per-rank bytes at 2 CPU ranks are about half those at 1.

The measurement is scripts/bench/zero_memory.py's (distinct tensor storages each rank holds after
a real optimizer step); the model is the debug preset made wide enough (hidden 512) that every
matrix is above the shipped zero3.json's stage3_param_persistence_threshold, as in real presets.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.helpers import load_module

pytestmark = pytest.mark.distributed

WIDE_DEBUG = ["hidden_size=512", "intermediate_size=1024"]


def test_stage3_model_state_per_rank_halves_on_two_ranks(tmp_path):
    bench = load_module("scripts/bench/zero_memory.py")
    with ThreadPoolExecutor(2) as pool:  # the two jobs side by side: each is mostly start-up
        jobs = {n: pool.submit(bench.measure, 3, n, "debug", WIDE_DEBUG, 32, tmp_path / f"n{n}.json", 300)
                for n in (1, 2)}
        results = {n: job.result() for n, job in jobs.items()}
    one, two = (bench.per_rank_max(results[n]) for n in (1, 2))
    n_params = results[1]["n_params"]
    # the census finds the whole model state on one rank: 2P params + 2P grads + 12P optimizer
    assert one["model_state"] == pytest.approx(bench.formula_bytes(3, n_params, 1), rel=0.02), one
    assert one["params"] > 0 and one["grads"] > 0 and one["optim"] > 0, one
    assert two["model_state"] <= 0.55 * one["model_state"], (one, two)
