"""--keep-last counts complete checkpoints only: an unfinished save never pushes the only complete
one out, and the tag just saved (named by `latest`) is always kept; `latest` never names a tag
being rewritten."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from common.errors import ZerotrainError
from engine.checkpoint.run_dir import SIDECAR, universal_dir
from engine.checkpoint.save import prune
from tests.helpers import FakeEngine, sidecar


def make_tags(ckpt_dir, complete, unfinished):
    for step in complete + unfinished:
        tag = ckpt_dir / f"global_step{step}"
        tag.mkdir(parents=True)
        (tag / "mp_rank_00_model_states.pt").write_bytes(b"x")
        if step in complete:
            (tag / SIDECAR).write_text("{}")
    if 10 in complete:
        universal_dir(ckpt_dir / "global_step10").mkdir()  # a resume on another world size made it


@pytest.mark.parametrize("complete, unfinished, keep_last, current, left", [
    # a crash mid-save at step 13 (another save interval), then a resume from 10 and a save at 12
    ([10, 12], [13], 1, 12, [12]),
    ([10, 12], [13], 2, 12, [10, 12]),
    # a complete tag of an older lineage past the one just saved (--resume PATH to an earlier one)
    ([10, 12, 14], [], 1, 12, [12, 14]),
    ([4, 6, 8], [7], 0, 8, [4, 6, 7, 8]),  # 0 keeps everything
])
def test_only_complete_checkpoints_count_and_the_latest_is_kept(tmp_path, complete, unfinished, keep_last, current,
                                                               left):
    make_tags(tmp_path, complete, unfinished)
    prune(tmp_path, keep_last, f"global_step{current}")
    assert sorted(int(p.name[len("global_step"):]) for p in tmp_path.iterdir() if p.name[-1].isdigit()) == left
    assert universal_dir(tmp_path / "global_step10").is_dir() == (10 in left)


def test_a_failed_save_over_a_later_lineage_leaves_latest_on_a_complete_tag(tmp_path, one_rank):
    """Resumed from global_step4 while global_step6 (named by `latest`) is still there: the save
    of step 6 deletes the old tag first, so `latest` moves back to global_step4 before that; the
    save then fails and `latest` still names a complete checkpoint."""
    from engine.checkpoint.resume import tag_problems
    from engine.checkpoint.save import save

    ckpt = tmp_path / "ckpt"
    for step in (2, 4, 6):
        save(FakeEngine(), ckpt, {"step": step}, sidecar(step, {}), keep_last=0, estimated_bytes=1000, verify="tail")
    assert (ckpt / "latest").read_text() == "global_step6"

    class FullDisk(FakeEngine):
        def save_checkpoint(self, save_dir, tag, client_state, save_latest):
            raise OSError(errno.ENOSPC, "No space left on device", str(Path(save_dir) / tag / "mp_rank_00_model_states.pt"))

    with pytest.raises(ZerotrainError, match="writing checkpoint .*global_step6 failed on rank 0: No space left"):
        save(FullDisk(), ckpt, {"step": 6}, sidecar(6, {}), keep_last=0, estimated_bytes=1000, verify="tail")
    latest = (ckpt / "latest").read_text()
    assert latest == "global_step4" and tag_problems(ckpt / latest) == []
