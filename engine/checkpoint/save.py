"""Saving a checkpoint: DeepSpeed shards plus zerotrain's own state, written so that `latest`
only ever names a complete checkpoint, and the retention of older ones (--keep-last).

A checkpoint tag folder (`checkpoints/global_stepN/`) holds DeepSpeed's files (model, optimizer
and scheduler state; the client state carries step, tokens seen, data position and config),
one `rng_state_{rank}.pt` per rank (and one `objective_state_{rank}.pt` where the objective carries
something from step to step: an RL run's rollouts that later steps train on again), and `zerotrain.json`, written last by rank 0 once every
rank has finished. Only then is `latest` replaced (temporary name, then rename). With
`--verify-checkpoints full` each rank then hashes its share of the files whole in the background
and publishes the digests in `checksums/` (engine.checkpoint.checksums), whose `wait_for_checksums()` a
launcher calls before the process exits.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch

from common.errors import ZerotrainError
from common.publish import publishing, remove, write_text
from engine.checkpoint.checksums import start_digests
from engine.checkpoint.rng import rng_state
from engine.checkpoint.run_dir import (
    LATEST,
    OBJECTIVE_STATE,
    SIDECAR,
    tag_name,
    universal_dir,
    zerotrain_tags,
)
from engine.checkpoint.sidecar import Sidecar
from engine.distributed import comm_device, on_rank0


def manifest(tag_dir: Path) -> dict[str, str]:
    """Fingerprints of every file of a tag (the sidecar aside), relative to it; `describe` checks them."""
    from engine.offline.ds_layout import file_fingerprint

    return {str(p.relative_to(tag_dir)): file_fingerprint(p) for p in sorted(tag_dir.rglob("*"))
            if p.is_file() and p.name != SIDECAR}


def tag_bytes(tag_dir: Path) -> int:
    """The bytes a tag's files take on disk."""
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
         estimated_bytes: int, after_shards: Callable[[Path], None] | None = None, *, verify: str,
         objective_state: dict[str, Any] | None = None) -> Path:
    """Save a checkpoint of step `sidecar.step` on every rank (collective); returns the tag folder.

    `estimated_bytes` sizes the first checkpoint; later ones are assumed as big as the last.
    `after_shards(tag_dir)` runs on every rank once DeepSpeed's files are written (a test hook).
    `verify` is --verify-checkpoints: with "full" this rank's share of the files is hashed in a
    background thread once the save is complete, and the call returns without waiting for it.
    `objective_state`: this rank's share of what the objective carries to later steps (saved when
    not empty; tensors and plain values, loadable with weights_only).
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
        with publishing(tag_dir / f"rng_state_{rank}.pt") as tmp:
            torch.save(rng_state(), tmp)
        if objective_state:
            with publishing(tag_dir / OBJECTIVE_STATE.format(rank=rank)) as tmp:
                torch.save(objective_state, tmp)
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


