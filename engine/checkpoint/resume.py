"""Resuming training: which checkpoint (--resume auto | never | PATH, the newest complete one),
whether it can be loaded safely, converting it when the number of ranks changed, and loading
model, optimizer, scheduler and this rank's RNG back; the trainer restores its own counters, the
data position and what the objective carried from the state returned."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

from common.errors import ZerotrainError
from common.publish import put_in_place, remove, temporary_name
from engine.checkpoint.rng import set_rng_state
from engine.checkpoint.run_dir import OBJECTIVE_STATE, SIDECAR, TAG_RE, universal_dir, zerotrain_tags
from engine.checkpoint.sidecar import Sidecar


def tag_problems(tag_dir: Path) -> list[str]:
    """Why a tag cannot be resumed from (empty when it is complete)."""
    from engine.offline.ds_layout import describe

    if not (tag_dir / SIDECAR).is_file():
        return [f"{tag_dir / SIDECAR} is missing (the save did not finish)"]
    try:
        info = describe(tag_dir)
    except ZerotrainError as e:
        return [str(e)]
    return info.problems


def find_resume_tag(ckpt_dir: Path, resume: str) -> Path | None:
    """The tag folder to resume from, per --resume (auto | never | PATH), or None to start fresh.

    `auto` takes the newest complete checkpoint and falls back to older ones with a warning.
    An explicit PATH must be complete.
    """
    if resume == "never":
        return None
    if resume != "auto":
        path = Path(resume)
        if path.is_dir() and TAG_RE.match(path.name):
            problems = tag_problems(path)
            if problems:
                raise ZerotrainError(f"cannot resume from {path}: " + "; ".join(problems))
            return path
        if path.is_dir():
            tag = find_resume_tag(path, "auto")
            if tag is None:
                raise ZerotrainError(f"--resume {path}: no global_stepN checkpoint there")
            return tag
        raise ZerotrainError(f"--resume {path}: no such checkpoint folder")
    skipped = []
    for tag in reversed(zerotrain_tags(ckpt_dir)):
        problems = tag_problems(ckpt_dir / tag)
        if not problems:
            if skipped:
                warnings.warn(f"skipped incomplete checkpoint(s) {', '.join(skipped)}; resuming from {tag}")
            return ckpt_dir / tag
        skipped.append(f"{tag} ({problems[0]})")
    unfinished = [t for t in zerotrain_tags(ckpt_dir) if not (ckpt_dir / t / SIDECAR).is_file()]
    if skipped and len(unfinished) == len(skipped):
        # Only saves that never finished (the job died in its first save): nothing here was ever
        # resumable, so the run starts over as it would have without them (an automatic requeue
        # would otherwise fail on every start). A complete tag that is damaged stays an error.
        warnings.warn(f"no complete checkpoint in {ckpt_dir}, only unfinished save(s) {', '.join(unfinished)}; "
                      "starting from the beginning")
        return None
    if skipped:
        raise ZerotrainError(f"no complete checkpoint in {ckpt_dir}: " + "; ".join(skipped)
                             + ". Remove the broken folders to start fresh, or pass --resume never with a new --output-dir")
    return None


def check_loadable(tag_dir: Path) -> None:
    """Open every file of the tag with torch.load(weights_only=True) and the DeepSpeed allowlist
    before DeepSpeed (which unpickles with weights_only=False) reads them."""
    from engine.offline.ds_layout import safe_load

    for path in sorted(tag_dir.glob("*.pt")):
        safe_load(path)


def saved_world_size(tag_dir: Path) -> int:
    sidecar = Sidecar.read(tag_dir)
    if sidecar is None:
        raise ZerotrainError(f"{tag_dir / SIDECAR} is missing: {tag_dir} was not written (completely) by zerotrain")
    return sidecar.world_size


def check_reshapable(tag_dir: Path, world_size: int) -> None:
    """Refuse to resume `tag_dir` on `world_size` ranks when it was saved on another number and
    its objective carried per-rank state to later steps (an RL run saved in the middle of its
    --num-iterations updates of one rollout: each rank's rollouts belong to its own ranks)."""
    saved = saved_world_size(tag_dir)
    if saved != world_size and any(tag_dir.glob(OBJECTIVE_STATE.format(rank="*"))):
        raise ZerotrainError(f"{tag_dir} was saved on {saved} ranks in the middle of reusing each rank's rollouts "
                             f"(--num-iterations), which cannot be shared out to {world_size}: resume on {saved} "
                             "ranks, or from a checkpoint at a step that is a multiple of --num-iterations "
                             "(--resume PATH)")


def make_universal(tag_dir: Path) -> Path:
    """Convert a tag to DeepSpeed's universal format (any world size can load it), once: rank 0
    runs ds_to_universal into a temporary folder and renames it; the folder is reused after."""
    import subprocess
    import sys

    target = universal_dir(tag_dir)
    if (target / SIDECAR).is_file():
        return target
    tmp = temporary_name(target)
    proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
                           "--output_folder", str(tmp), "--inject_missing_state", "--num_extract_workers", "1",
                           "--num_merge_workers", "1"], capture_output=True, text=True, errors="replace")
    if proc.returncode != 0:
        remove(tmp)
        raise ZerotrainError(f"converting {tag_dir} to a universal checkpoint failed:\n{proc.stderr[-2000:]}")
    for path in tag_dir.glob("rng_state_*.pt"):
        shutil.copy2(path, tmp / path.name)
    shutil.copy2(tag_dir / SIDECAR, tmp / SIDECAR)  # last: marks the conversion complete
    put_in_place(tmp, target)
    return target


def load(engine, tag_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load model, optimizer, scheduler and this rank's RNG state; return zerotrain's client state
    and what the objective carried on this rank ({} when nothing).

    `tag_dir` may be a universal conversion (saved on another number of ranks): the data
    position is a global sample cursor, so it carries over to any world size as it is.
    """
    import torch.distributed as dist

    check_loadable(tag_dir)
    _, client_state = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name, load_optimizer_states=True,
                                             load_lr_scheduler_states=True)
    if client_state is None or "zerotrain" not in client_state:
        raise ZerotrainError(f"{tag_dir} was not written by zerotrain (no client state); start a new run from "
                             "its weights instead (consolidate it, then initialise from the file)")
    from engine.offline.ds_layout import safe_load

    rank_file = tag_dir / f"rng_state_{dist.get_rank()}.pt"
    if rank_file.is_file() and saved_world_size(tag_dir) == dist.get_world_size():
        set_rng_state(safe_load(rank_file, mmap=False))
    # A universal conversion holds no objective state: check_reshapable refused those that had any.
    state_file = tag_dir / OBJECTIVE_STATE.format(rank=dist.get_rank())
    objective_state = safe_load(state_file, mmap=False) if state_file.is_file() else {}
    return client_state["zerotrain"], objective_state
