"""Whole-file digests of a checkpoint tag (`--verify-checkpoints full`), so that a flipped byte
anywhere in a shard is caught before the tag is resumed from or consolidated.

The sidecar's manifest (engine.checkpoint.save.manifest) holds each file's size and a hash of its last
MiB: cheap, and enough for truncation and for a foreign file, but blind to damage in the middle
of a shard (torch.load does not check the zip records' CRCs). Hashing whole files on the save's
critical path would stall every rank, so once a save is complete (`latest` names it) each rank
hashes its share of the manifest's files in a background thread while training goes on, and
publishes them atomically as `TAG/checksums/rank{R}.json`. Readers re-hash every file that has
a digest; a file without one (the process died before its thread finished) keeps the tail check.
"""

from __future__ import annotations

import hashlib
import json
import threading
import warnings
import zlib
from pathlib import Path

from common.errors import ZerotrainError
from common.jsonio import read_json_object
from common.publish import publishing, remove
from engine.checkpoint.run_dir import SIDECAR

CHECKSUMS = "checksums"
"""The folder of a tag that holds the digests, one JSON file per rank that hashed."""
ALGORITHM = "crc32"
"""zlib.crc32, read in 8 MiB chunks: the fastest of the standard library's candidates here (see
BENCHMARKS.md, "Checkpoint verification cost"). It catches every error burst of up to 32 bits and
all but 1 in 4 billion others, which is what accidental damage needs; the manifest's SHA-256 of
the tail still tells a foreign file apart."""
_CHUNK = 8 << 20


def file_digest(path: Path, algorithm: str = ALGORITHM) -> str:
    """Hash the whole of `path` with `algorithm` (crc32, or any hashlib name) as hex."""
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    crc, hasher = 0, None if algorithm == "crc32" else hashlib.new(algorithm)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            if hasher is None:
                crc = zlib.crc32(view[:n], crc)
            else:
                hasher.update(view[:n])
    return f"{crc:08x}" if hasher is None else hasher.hexdigest()


def share(files: list[str], rank: int, world_size: int) -> list[str]:
    """The files rank `rank` hashes: every world_size-th of the sorted names, so ranks split the work."""
    return [name for i, name in enumerate(sorted(files)) if i % world_size == rank]


def write_digests(tag_dir: Path, files: list[str], rank: int) -> None:
    """Hash `files` of the tag and publish them as checksums/rank{rank}.json.

    The tag may be deleted meanwhile (--keep-last pruned it): then nothing is written and nothing
    is left behind. Never calls a collective: it runs beside the training loop.
    """
    try:
        digests = {name: file_digest(tag_dir / name) for name in files}
        folder = tag_dir / CHECKSUMS
        folder.mkdir(exist_ok=True)  # no parents: a pruned tag must not come back
        target = folder / f"rank{rank}.json"
        with publishing(target) as tmp:
            tmp.write_text(json.dumps({"algorithm": ALGORITHM, "files": digests}, indent=1))
    except FileNotFoundError:
        if (tag_dir / SIDECAR).is_file():
            raise
        return
    if not (tag_dir / SIDECAR).is_file():  # pruned while we wrote: take back what we made
        _take_back(tag_dir, target)


def _take_back(tag_dir: Path, target: Path) -> None:
    remove(target)
    for folder in (target.parent, tag_dir):
        try:
            folder.rmdir()  # only when empty: whatever else is there is not ours to delete
        except OSError:
            return


def recorded_digests(tag_dir: Path) -> tuple[str, dict[str, str]]:
    """The algorithm and the digests every rank recorded for this tag (none when it has no checksums/)."""
    found: dict[str, str] = {}
    algorithm = ALGORITHM
    folder = tag_dir / CHECKSUMS
    for path in sorted(folder.glob("rank*.json")) if folder.is_dir() else []:
        data = read_json_object(path)
        if not isinstance(data.get("files"), dict) or not isinstance(data.get("algorithm"), str):
            raise ZerotrainError(f"{path} is not a zerotrain digest file (no 'algorithm' and 'files')")
        algorithm = data["algorithm"]
        found.update(data["files"])
    return algorithm, found


def digest_problems(tag_dir: Path, names: list[str]) -> list[str]:
    """Files among `names` whose whole-file digest differs from the one recorded at save; files
    without a digest are not checked here (the manifest's tail check covers them)."""
    try:
        algorithm, digests = recorded_digests(tag_dir)
    except ZerotrainError as e:
        return [str(e)]
    problems = []
    for name in names:
        path = tag_dir / name
        if name not in digests or not path.is_file():
            continue
        try:
            actual = file_digest(path, algorithm)
        except (OSError, ValueError) as e:
            problems.append(f"{path} cannot be checked against its digest: {e}")
            continue
        if actual != digests[name]:
            problems.append(f"{path} differs from the digest recorded at save: corrupt; resume from an older "
                            f"checkpoint")
    return problems


_pending: list[threading.Thread] = []


def start_digests(tag_dir: Path, files: list[str], rank: int, world_size: int) -> None:
    """Hash this rank's share of `files` in a background thread (wait_for_checksums joins it)."""
    mine = share(files, rank, world_size)
    if not mine:
        return
    _pending[:] = [t for t in _pending if t.is_alive()]
    # One tag at a time: a save that comes while the last one is still being hashed queues behind it
    # rather than taking a second core from training.
    before = _pending[-1] if _pending else None
    thread = threading.Thread(target=_run, args=(before, tag_dir, mine, rank), name=f"checksums-{tag_dir.name}",
                              daemon=True)
    _pending.append(thread)
    thread.start()


def _run(before: threading.Thread | None, tag_dir: Path, files: list[str], rank: int) -> None:
    if before is not None:
        before.join()
    try:
        write_digests(tag_dir, files, rank)
    except Exception as e:  # a thread's error would be lost: say it, training goes on with the tail check
        warnings.warn(f"rank {rank}: hashing checkpoint {tag_dir} failed ({e}); it keeps the tail check only")


def wait_for_checksums() -> None:
    """Join the pending hash threads, so a run that ends publishes its digests before the process exits."""
    while _pending:
        _pending.pop(0).join()

