"""--keep-last counts complete checkpoints only: an unfinished save never pushes the only complete
one out, and the tag just saved (named by `latest`) is always kept."""

from __future__ import annotations

import pytest

from engine.checkpoint import prune
from engine.run_dir import SIDECAR, universal_dir


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
