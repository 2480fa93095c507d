"""A save that fails leaves the previous checkpoint as `latest`, complete and resumable, and
--keep-last 1 removes nothing: no space while DeepSpeed writes its shards (the free-space
pre-check passed), permission denied on them, no space for rank 0's sidecar or for `latest`.
In-process, 2 ranks (gloo, real DeepSpeed, ZeRO-2), the failure injected into the save's writes
on every rank. A rank killed during a save: tests/faults/test_faults.py
(test_crash_in_the_middle_of_a_save_is_skipped) and scripts/soak/kill_resume.py."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch

from tests.helpers import SAMPLES, build_trainer, run_ranks

pytestmark = pytest.mark.faults


def _oserror(code: int, path) -> OSError:
    return OSError(code, os.strerror(code), str(path))


def shards_no_space(trainer):
    """DeepSpeed's writer runs out of space half-way through its first file on each rank."""
    writer = trainer.engine.checkpoint_engine

    def save(state_dict, path):
        Path(path).write_bytes(b"PK\x03\x04 half a shard")
        raise _oserror(errno.ENOSPC, path)

    writer.save = save
    return lambda: delattr(writer, "save")


def shards_permission_denied(trainer):
    writer = trainer.engine.checkpoint_engine

    def save(state_dict, path):
        raise _oserror(errno.EACCES, path)

    writer.save = save
    return lambda: delattr(writer, "save")


def publish_no_space(module_name: str):
    """zerotrain's atomic small-file writer, as `module_name` calls it, fails once half its
    temporary file is written, as a full disk would."""
    import importlib

    from common.publish import publishing

    module = importlib.import_module(module_name)
    real = module.write_text

    def write_text(path, text):
        with publishing(path) as tmp:
            tmp.write_text(text[: len(text) // 2])
            raise _oserror(errno.ENOSPC, tmp)

    module.write_text = write_text
    return lambda: setattr(module, "write_text", real)


FAULTS = {
    "shards-no-space": (shards_no_space, "No space left on device"),
    "shards-permission-denied": (shards_permission_denied, "Permission denied"),
    "sidecar-no-space": (lambda _: publish_no_space("engine.checkpoint.sidecar"), "No space left on device"),
    "latest-no-space": (lambda _: publish_no_space("engine.checkpoint.save"), "No space left on device"),
}


def _failing_saves(rank, world_size, out, base_model_dir):
    from common.errors import ZerotrainError
    from engine.checkpoint.resume import find_resume_tag, tag_problems
    from engine.checkpoint.run_dir import SIDECAR

    trainer = build_trainer(rank, world_size, out, base_model_dir, "pretrain", seq_len=32, max_steps=4,
                            save_interval=100, eval_interval=100, keep_last=1, data=SAMPLES / "tinyshakespeare.txt")
    ckpts = trainer.plan.run.checkpoints
    for _ in range(2):
        trainer.train_step()
    previous = trainer.save()
    weights = {n: p.detach().clone() for n, p in trainer.engine.module.named_parameters()}
    trainer.train_step()
    report = {}
    for name, (inject, _) in FAULTS.items():
        undo = inject(trainer)
        try:
            trainer.save()
            report[name] = {"error": None}
        except ZerotrainError as e:
            report[name] = {"error": str(e)}
        finally:
            undo()
        if rank == 0:  # the others cannot touch the files before rank 0's next collective
            failed = ckpts / "global_step3"
            report[name].update(
                latest=(ckpts / "latest").read_text(), tags=sorted(p.name for p in ckpts.glob("global_step*")),
                previous_problems=tag_problems(previous), failed_complete=(failed / SIDECAR).exists(),
                resume=find_resume_tag(ckpts, "auto").name,
                temporaries=sorted(p.name for p in [*ckpts.glob(".*"), *failed.glob(".*")]))
    # the previous checkpoint resumes: its weights and counters come back
    trainer.restore(previous)
    report["restored"] = {"step": trainer.state.step, "same_weights": all(
        torch.equal(p, weights[n]) for n, p in trainer.engine.module.named_parameters())}
    # and the next save that succeeds replaces the leftover and prunes as usual
    trainer.train_step()
    report["next_save"] = {"tag": trainer.save().name, "tags": sorted(p.name for p in ckpts.glob("global_step*"))}
    (out / f"rank{rank}.json").write_text(json.dumps(report))


def test_a_failed_save_leaves_the_previous_checkpoint_latest_and_resumable(base_model_dir, tmp_path):
    run_ranks(_failing_saves, 2, tmp_path, base_model_dir)
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    ckpts = tmp_path / "run2" / "checkpoints"
    for name, (_, cause) in FAULTS.items():
        first, other = rank0[name], rank1[name]
        # a clear error on every rank, naming the tag and the cause (the launcher exits 2 on it)
        assert f"writing checkpoint {ckpts / 'global_step3'} failed on rank 0: {cause}" in first["error"], name
        if name.startswith("shards"):
            assert f"failed on rank 1: {cause}" in other["error"], name
        else:  # rank 0's own files: the other rank hears of it instead of waiting in a barrier
            assert other["error"] == f"writing checkpoint {ckpts / 'global_step3'} failed on another rank; " \
                                     "its log has the error", name
        assert first["latest"] == "global_step2" and first["previous_problems"] == [], name
        assert not first["failed_complete"] and first["resume"] == "global_step2", name
        assert first["tags"] == ["global_step2", "global_step3"], name  # --keep-last 1 pruned nothing
        assert first["temporaries"] == [], name
    assert rank0["restored"] == rank1["restored"] == {"step": 2, "same_weights": True}
    assert rank0["next_save"] == {"tag": "global_step3", "tags": ["global_step3"]}
