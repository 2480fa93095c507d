"""--pack on preference pairs through a whole DPO run (in-process, one rank, real DeepSpeed): the
builders pick the packed pair collate, --precompute-ref runs the reference over packed batches,
and the steps are a padded run's. The batch-level equalities are tests/unit/test_pref_pack.py's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import (
    dpo_trainer,
    peek,
    run_ranks_in_turn,
    same_records,
    step_records,
)

pytestmark = pytest.mark.distributed


def _steps(rank: int, world_size: int, out: Path, base_model_dir: Path, name: str, flags: dict) -> None:
    trainer = dpo_trainer(rank, world_size, out / name, base_model_dir, **flags)
    batch = peek(trainer.data.loader, 1)[0]
    records = step_records(trainer, 2)
    (out / f"{name}.json").write_text(json.dumps({"rows": batch["input_ids"].shape[0],
                                                  "packed": "sequence_ids" in batch, "records": records}))


def test_a_packed_dpo_run_with_a_precomputed_reference_takes_the_padded_runs_steps(base_model_dir, tmp_path):
    """engine.training.build picks the packed pair collate for --pack, and --precompute-ref runs the
    reference over packed batches: the steps are the padded run's (live reference)."""
    runs = {}
    # seq-len 256: most sample pairs fit whole, and are short enough that rows hold several
    layouts = (("padded", {"pack": "false"}), ("packed", {"pack": "true", "precompute_ref": "true"}))
    run_ranks_in_turn(1, [(_steps, tmp_path, base_model_dir, name, {"micro_batch_size": 4, "seq_len": 256, **flags})
                          for name, flags in layouts])
    for name, _ in layouts:
        runs[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert runs["packed"]["packed"] and not runs["padded"]["packed"]
    assert runs["packed"]["rows"] < runs["padded"]["rows"] == 8
    same_records(runs["padded"]["records"], runs["packed"]["records"], rel=1e-5)
