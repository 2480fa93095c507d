"""Saving and resuming training: DeepSpeed shards plus zerotrain's own state, written so that
`latest` only ever names a complete checkpoint.

A checkpoint tag folder (`checkpoints/global_stepN/`) holds DeepSpeed's files (model, optimizer
and scheduler state; the client state carries step, tokens seen, data position and config),
one `rng_state_{rank}.pt` per rank, and `zerotrain.json`, written last by rank 0 once every
rank has finished. Only then is `latest` replaced (temporary name, then rename). With
`--verify-checkpoints full` each rank then hashes its share of the files whole in the background
and publishes the digests in `checksums/` (engine.checksums), whose `wait_for_checksums()` a
launcher calls before the process exits.
"""

from __future__ import annotations

import os
import random
import shutil
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from common.errors import ZerotrainError
from common.publish import put_in_place, remove, temporary_name, write_text
from engine.checksums import start_digests
from engine.distributed import comm_device, on_rank0
from engine.run_dir import LATEST, SIDECAR, TAG_RE, tag_name, universal_dir, zerotrain_tags
from engine.sidecar import Sidecar


def rng_state() -> dict[str, Any]:
    """Every RNG a step can touch, in types torch.load(weights_only=True) accepts."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def manifest(tag_dir: Path) -> dict[str, str]:
    """Fingerprints of every file of a tag (the sidecar aside), relative to it; `describe` checks them."""
    from engine.offline.ds_layout import file_fingerprint

    return {str(p.relative_to(tag_dir)): file_fingerprint(p) for p in sorted(tag_dir.rglob("*"))
            if p.is_file() and p.name != SIDECAR}


def tag_bytes(tag_dir: Path) -> int:
    return sum(p.stat().st_size for p in tag_dir.rglob("*") if p.is_file())


def check_free_space(ckpt_dir: Path, needed: int) -> None:
    """Fail before writing (on every rank alike) when the disk cannot hold another checkpoint."""
    import torch.distributed as dist

    free = shutil.disk_usage(ckpt_dir).free
    short = torch.tensor([float(free < needed)], device=comm_device())
    dist.all_reduce(short)
    if short.item():
        raise ZerotrainError(f"not enough disk space for a checkpoint in {ckpt_dir}: about {needed / 1e6:,.1f} MB "
                             f"needed, {free / 1e6:,.1f} MB free on {'this' if free < needed else 'another'} rank; "
                             "free some space or lower --keep-last (earlier checkpoints are intact)")


def save(engine, ckpt_dir: Path, client_state: dict[str, Any], sidecar: Sidecar, keep_last: int,
         estimated_bytes: int, after_shards: Callable[[Path], None] | None = None, *, verify: str) -> Path:
    """Save a checkpoint of step `sidecar.step` on every rank (collective); returns the tag folder.

    `estimated_bytes` sizes the first checkpoint; later ones are assumed as big as the last.
    `after_shards(tag_dir)` runs on every rank once DeepSpeed's files are written (a test hook).
    `verify` is --verify-checkpoints: with "full" this rank's share of the files is hashed in a
    background thread once the save is complete, and the call returns without waiting for it.
    """
    import torch.distributed as dist

    tag = tag_name(sidecar.step)
    tag_dir = ckpt_dir / tag
    rank = dist.get_rank()
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    previous = zerotrain_tags(ckpt_dir)
    last = ckpt_dir / previous[-1] if previous and previous[-1] != tag else None
    check_free_space(ckpt_dir, tag_bytes(last) if last else estimated_bytes)
    if rank == 0 and tag_dir.exists():
        # A leftover of a crashed save at this step, or a complete tag of the lineage a resume
        # from an older checkpoint left behind: `latest` must not name it while it is rewritten.
        if (ckpt_dir / LATEST).is_file() and (ckpt_dir / LATEST).read_text().strip() == tag:
            older = [t for t in previous[:previous.index(tag)] if (ckpt_dir / t / SIDECAR).is_file()]
            if older:
                write_text(ckpt_dir / LATEST, older[-1])
            else:
                remove(ckpt_dir / LATEST)
        shutil.rmtree(tag_dir)
    dist.barrier()
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
        if after_shards is not None:
            after_shards(tag_dir)
        target = tag_dir / f"rng_state_{rank}.pt"
        tmp = temporary_name(target)
        torch.save(rng_state(), tmp)
        os.replace(tmp, target)
    except OSError as e:
        raise write_failed(tag_dir, rank, e) from e
    dist.barrier()

    def complete() -> None:
        try:
            replace(sidecar, files=manifest(tag_dir)).write(tag_dir)
            write_text(ckpt_dir / LATEST, tag)
        except OSError as e:
            # A tag with a sidecar counts as complete: none may stay behind a `latest` that failed.
            (tag_dir / SIDECAR).unlink(missing_ok=True)
            raise write_failed(tag_dir, rank, e) from e
        prune(ckpt_dir, keep_last, tag)  # only once the new tag is complete and named

    # A failure on rank 0 reaches every rank at once; they would otherwise wait in a barrier for it.
    on_rank0(complete, rank, f"writing checkpoint {tag_dir}")
    if verify == "full":
        # on_rank0's collective is passed only once the sidecar (and its manifest) is written.
        start_digests(tag_dir, list(Sidecar.read(tag_dir).files), rank, dist.get_world_size())
    return tag_dir


def write_failed(tag_dir: Path, rank: int, e: OSError) -> ZerotrainError:
    return ZerotrainError(f"writing checkpoint {tag_dir} failed on rank {rank}: {e.strerror or e} "
                          f"({e.filename or tag_dir}); the earlier checkpoints are intact")


def prune(ckpt_dir: Path, keep_last: int, current: str) -> None:
    """Keep the newest `keep_last` complete tags (those with a sidecar) and `current`, the tag
    just saved and named by `latest`; remove the rest, unfinished saves included. Counting only
    complete tags means a leftover unfinished save (say a crash at another save interval) can
    never push the only complete checkpoint out. keep_last <= 0 keeps everything."""
    if keep_last <= 0:
        return
    tags = zerotrain_tags(ckpt_dir)
    complete = [t for t in tags if (ckpt_dir / t / SIDECAR).is_file()]
    keep = set(complete[-keep_last:]) | {current}
    for tag in tags:
        if tag not in keep:
            shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
            shutil.rmtree(universal_dir(ckpt_dir / tag), ignore_errors=True)


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


def load(engine, tag_dir: Path) -> dict[str, Any]:
    """Load model, optimizer, scheduler and this rank's RNG state; return zerotrain's client state.

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
    return client_state["zerotrain"]
