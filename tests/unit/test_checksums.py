"""--verify-checkpoints: a byte flipped in the middle of a shard (same size, same last MiB, so the
manifest's tail check passes) is caught by resume and by consolidation; tail mode writes no
digests; the hash thread survives its tag being pruned; a tag with partial digests keeps the tail
check. Tags are synthetic ZeRO-3 layouts (tests/unit/test_ds_checkpoint.py) with a sidecar."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
import torch

from common.errors import ZerotrainError
from engine.checkpoint import checksums
from engine.checkpoint.checksums import (
    CHECKSUMS,
    recorded_digests,
    share,
    start_digests,
    wait_for_checksums,
    write_digests,
)
from engine.checkpoint.resume import find_resume_tag, tag_problems
from engine.checkpoint.run_dir import SIDECAR
from engine.checkpoint.save import manifest, save
from engine.checkpoint.sidecar import Sidecar
from engine.offline.consolidate import consolidate
from engine.offline.ds_layout import file_fingerprint
from engine.offline.inspect import inspect
from tests.helpers import CHECKPOINT_WORLD as WORLD
from tests.helpers import FakeEngine, save_zero3, sidecar, weights

MODEL = "zero_pp_rank_1_mp_rank_00_model_states.pt"
OPTIM = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


def make_tag(ckpt: Path, step: int, digests: bool = True) -> Path:
    """A complete tag whose every shard is over 2 MiB, so its middle lies outside the last MiB."""
    tag = ckpt / f"global_step{step}"
    big = torch.arange(3 << 19, dtype=torch.float32)  # 6 MiB: 3 MiB a rank, trainable and frozen
    save_zero3(tag, weights() | {"big.weight": big, "frozen.weight": big.clone()}, WORLD, frozen=("frozen.weight",))
    files = manifest(tag)
    sidecar(step, files).write(tag)
    if digests:
        for rank in range(WORLD):
            write_digests(tag, share(list(files), rank, WORLD), rank)
    (ckpt / "latest").write_text(tag.name)
    return tag


def flip_middle_byte(path: Path) -> None:
    """Flip one byte of tensor data 1 MiB + 4 KiB before the end: the size and the tail stay the same."""
    before = file_fingerprint(path)
    data = bytearray(path.read_bytes())
    data[len(data) - (1 << 20) - 4096] ^= 0x01
    path.write_bytes(bytes(data))
    assert file_fingerprint(path) == before  # the damage the tail check cannot see


@pytest.fixture
def ckpt(tmp_path) -> Path:
    root = tmp_path / "ckpt"
    make_tag(root, 4)
    make_tag(root, 5)
    return root


def test_digests_cover_every_manifest_file(ckpt):
    tag = ckpt / "global_step5"
    algorithm, digests = recorded_digests(tag)
    assert algorithm == checksums.ALGORITHM
    assert set(digests) == set(Sidecar.read(tag).files)
    assert sorted(p.name for p in (tag / CHECKSUMS).iterdir()) == ["rank0.json", "rank1.json"]
    assert tag_problems(tag) == []


@pytest.mark.parametrize("name", [MODEL, OPTIM])
def test_flipped_byte_mid_shard_is_caught_by_resume(ckpt, name):
    flip_middle_byte(ckpt / "global_step5" / name)
    with pytest.warns(UserWarning, match=f"skipped incomplete checkpoint.*global_step5.*{name} differs from the "
                                         f"digest recorded at save: corrupt; resume from an older checkpoint"):
        assert find_resume_tag(ckpt, "auto") == ckpt / "global_step4"
    with pytest.raises(ZerotrainError, match=f"cannot resume from .*global_step5: .*{name} differs from the digest"):
        find_resume_tag(ckpt, str(ckpt / "global_step5"))


@pytest.mark.parametrize("name", [MODEL, OPTIM])
def test_flipped_byte_mid_shard_is_caught_by_consolidation_and_inspect(ckpt, tmp_path, name):
    flip_middle_byte(ckpt / "global_step5" / name)
    with pytest.raises(ZerotrainError, match=f"(?s)incomplete or inconsistent.*{name} differs from the digest"):
        consolidate(str(ckpt), str(tmp_path / "out.pth"))
    _, infos = inspect(str(ckpt))
    assert [i.complete for i in infos] == [True, False]
    consolidate(str(ckpt), str(tmp_path / "older.pth"), tag="global_step4")


def test_partial_digests_keep_the_tail_check(ckpt):
    """The thread of rank 1 had not finished when the process died: its files get the tail check."""
    tag = ckpt / "global_step5"
    (tag / CHECKSUMS / "rank1.json").unlink()
    uncovered = share(list(Sidecar.read(tag).files), 1, WORLD)
    assert OPTIM in uncovered and MODEL not in uncovered
    flip_middle_byte(tag / OPTIM)  # unseen: no digest, same tail
    assert find_resume_tag(ckpt, str(tag)) == tag
    flip_middle_byte(tag / MODEL)  # rank 0's digest of it is still there
    assert f"{MODEL} differs from the digest" in tag_problems(tag)[0]
    path = tag / OPTIM
    path.write_bytes(path.read_bytes()[:-10])  # and a truncated uncovered file still fails the tail check
    assert any(f"{OPTIM} is truncated" in p for p in tag_problems(tag))


def test_tag_without_digests_resumes_with_the_tail_check(tmp_path):
    tag = make_tag(tmp_path / "ckpt", 3, digests=False)
    assert not (tag / CHECKSUMS).exists()
    flip_middle_byte(tag / OPTIM)
    assert tag_problems(tag) == []


def test_pruned_tag_leaves_no_stray_digests(ckpt):
    tag = ckpt / "global_step5"
    files = list(Sidecar.read(tag).files)
    shutil.rmtree(tag / CHECKSUMS)
    # pruned before the thread got to it, and half-deleted (sidecar gone, shards not yet)
    half = ckpt / "global_step4"
    shutil.rmtree(half / CHECKSUMS)
    (half / SIDECAR).unlink()
    write_digests(half, files, 0)
    assert not (half / CHECKSUMS).exists()
    shutil.rmtree(tag)
    write_digests(tag, files, 0)
    assert not tag.exists()


@pytest.mark.parametrize("after_reads", [1, 4])  # mid-way, or once every file is hashed (before publishing)
def test_pruned_while_hashing_in_the_background(ckpt, monkeypatch, after_reads):
    tag = ckpt / "global_step5"
    files = share(list(Sidecar.read(tag).files), 0, 1)
    assert len(files) == 4
    shutil.rmtree(tag / CHECKSUMS)
    real = checksums.file_digest
    reads = []

    def pruned_meanwhile(path: Path, algorithm: str = checksums.ALGORITHM) -> str:
        digest = real(path, algorithm)
        reads.append(path)
        if len(reads) == after_reads:
            shutil.rmtree(tag, ignore_errors=True)  # --keep-last of a later save, on rank 0
        return digest

    monkeypatch.setattr(checksums, "file_digest", pruned_meanwhile)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start_digests(tag, files, 0, 1)
        wait_for_checksums()
    assert [str(w.message) for w in caught] == []  # the thread warns when hashing fails
    assert not tag.exists()


# --------------------------------------------------------------------------------------------
# checkpoint.save on one in-process gloo rank, with an engine that writes shards as DeepSpeed does


@pytest.mark.parametrize("verify", ["full", "tail"])
def test_save_publishes_digests_in_full_mode_only(tmp_path, one_rank, verify):
    ckpt = tmp_path / "ckpt"
    for step in (1, 2, 3):
        save(FakeEngine(), ckpt, {"step": step}, sidecar(step, {}), keep_last=2, estimated_bytes=1000, verify=verify)
    wait_for_checksums()
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["global_step2", "global_step3"]
    for tag in (ckpt / "global_step2", ckpt / "global_step3"):
        _, digests = recorded_digests(tag)
        if verify == "full":
            assert set(digests) == set(Sidecar.read(tag).files) == {"mp_rank_00_model_states.pt",
                                                                   "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                                                   "rng_state_0.pt"}
        else:
            assert not (tag / CHECKSUMS).exists() and digests == {}
