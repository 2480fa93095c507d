"""Faults with nothing lost: SIGKILL at random steps (and mid-save), broken checkpoints, a full
disk, NaN streaks. 2 CPU ranks, ZeRO-2, fp32, debug preset; one unbroken run is the reference: the
session's ZeRO-2 pretraining run (conftest's `pretrained_runs`), whose flags every run here uses."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import (
    PRETRAIN_RUN,
    ROOT,
    launcher_command,
    launcher_env,
    metrics,
    pretrain_args,
    run_cases,
    run_launcher,
    selected_params,
)

pytestmark = pytest.mark.faults
STEPS = PRETRAIN_RUN["max-steps"]  # 12: a checkpoint every 2 steps, ZeRO-2, fp32, seed 11
args = pretrain_args


@pytest.fixture(scope="module")
def unbroken(pretrained_runs):
    return pretrained_runs[2]


def assert_same_weights(a, b):
    wa, wb = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def kill_at_step(cmd, out, step, timeout=120):
    """Start the run in its own process group and SIGKILL all of it once `step` is logged."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=launcher_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and proc.poll() is None:
            if (out / "metrics.jsonl").is_file() and any(r.get("step", 0) >= step for r in metrics(out)):
                break
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.parametrize("seed", [0, 1])
def test_sigkill_at_random_steps_then_resume_is_bit_identical(tokenizer_dir, pretrain_data, tmp_path, unbroken, seed):
    out = tmp_path / "run"
    cmd = launcher_command("pretrain.py", args(tokenizer_dir, pretrain_data, out))
    kills = sorted(np.random.default_rng(seed).choice(np.arange(2, STEPS), size=2, replace=False).tolist())
    for step in kills:
        kill_at_step(cmd, out, step)
    latest = (out / "checkpoints" / "latest").read_text()
    assert not (out / "final").exists() and (out / "checkpoints" / latest / "zerotrain.json").is_file()
    run_launcher("pretrain.py", args(tokenizer_dir, pretrain_data, out))
    assert_same_weights(unbroken, out)


def test_crash_in_the_middle_of_a_save_is_skipped(tokenizer_dir, pretrain_data, tmp_path, unbroken):
    from engine.checkpoint.resume import tag_problems

    out = tmp_path / "run"
    proc = run_launcher("tests/fault_launcher.py", args(tokenizer_dir, pretrain_data, out, keep_last=1,
                                                        fault_kill_at="6:save"), check=False)
    assert proc.returncode != 0
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text() == "global_step4"  # never the half-written one
    assert tag_problems(ckpts / "global_step4") == []
    assert (ckpts / "global_step6").is_dir() and not (ckpts / "global_step6" / "zerotrain.json").exists()
    # --keep-last 1 had pruned global_step2 at step 4's save; the failed save pruned nothing
    assert sorted(p.name for p in ckpts.glob("global_step*")) == ["global_step4", "global_step6"]
    proc = run_launcher("pretrain.py", args(tokenizer_dir, pretrain_data, out))
    assert "skipped incomplete checkpoint(s) global_step6" in proc.stderr
    assert "resumed from" in proc.stdout and "at step 4" in proc.stdout
    assert_same_weights(unbroken, out)


def truncate(path, _other_run=None):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def foreign(path, other_run):
    shutil.copy2(other_run / "checkpoints" / "global_step10" / path.name, path)


DAMAGES = [pytest.param(truncate, "is truncated", id="truncated"),
           pytest.param(lambda p, _: p.unlink(), "is missing", id="missing-rank-file"),
           pytest.param(foreign, "not the file this checkpoint wrote", id="other-run")]


def file_times(run) -> dict:
    return {p: p.stat().st_mtime_ns for p in (run / "checkpoints").rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def broken_resumes(request, tokenizer_dir, pretrain_data, unbroken, tmp_path_factory) -> dict[str, dict]:
    """{damage id: ...} for the damages this session's tests select: a copy of the unbroken run
    (without final/) whose newest tag has rank 1's optimizer file damaged; an explicit --resume of
    that tag, and the files' times before and after it; then --resume auto. Each damage's explicit
    resume in one launch, each one's --resume auto in another (were two launches a damage)."""
    out = tmp_path_factory.mktemp("broken")
    chosen = selected_params(request, "test_a_broken_checkpoint_is_refused_or_skipped", "damage", "message")
    runs = {}
    for case in (p for p in DAMAGES if p.values in chosen):
        broken = out / case.id
        shutil.copytree(unbroken, broken, ignore=shutil.ignore_patterns("final"))
        newest = broken / "checkpoints" / f"global_step{STEPS}"
        case.values[0](newest / "zero_pp_rank_1_mp_rank_00_optim_states.pt", unbroken)
        runs[case.id] = {"newest": newest, "before": file_times(broken)}
    explicit = run_cases({name: ("pretrain", args(tokenizer_dir, pretrain_data, run["newest"].parents[1],
                                                  resume=run["newest"])) for name, run in runs.items()},
                         out / "explicit", may_fail=tuple(runs))
    for name, run in runs.items():
        run.update(explicit=explicit[name], after=file_times(run["newest"].parents[1]))
    auto = run_cases({name: ("pretrain", args(tokenizer_dir, pretrain_data, run["newest"].parents[1],
                                              max_steps=STEPS + 1)) for name, run in runs.items()}, out / "auto")
    for name, run in runs.items():
        run["auto"] = auto[name]
    return runs


@pytest.mark.parametrize("damage, message", DAMAGES)
def test_a_broken_checkpoint_is_refused_or_skipped(broken_resumes, request, damage, message):
    run = broken_resumes[request.node.callspec.id]
    newest = run["newest"]
    # an explicit --resume of the broken tag: a clear error, nothing written
    proc = run["explicit"]
    assert proc.returncode != 0 and message in proc.stderr and f"cannot resume from {newest}" in proc.stderr
    assert run["after"] == run["before"]
    # --resume auto falls back to the newest complete checkpoint, with a warning
    proc = run["auto"]
    assert f"skipped incomplete checkpoint(s) global_step{STEPS}" in proc.stderr and message in proc.stderr
    assert f"at step {STEPS - 2}" in proc.stdout


@pytest.fixture
def broken(unbroken, tmp_path):
    """A copy of the unbroken run without its final/, to break."""
    out = tmp_path / "run"
    shutil.copytree(unbroken, out, ignore=shutil.ignore_patterns("final"))
    return out


def test_checkpoint_tools_refuse_a_broken_shard(broken, unbroken, tmp_path):
    newest = broken / "checkpoints" / f"global_step{STEPS}"
    foreign(newest / "zero_pp_rank_1_mp_rank_00_optim_states.pt", unbroken)
    out = tmp_path / "out.safetensors"
    proc = subprocess.run(["zerotrain", "consolidate", str(broken / "checkpoints"), str(out)], env=launcher_env(),
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "not the file this checkpoint wrote" in proc.stderr
    assert not out.exists()


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3500k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_during_save_is_a_clear_error(tokenizer_dir, pretrain_data, small_disk):
    out = small_disk / "run"
    proc = run_launcher("pretrain.py", args(tokenizer_dir, pretrain_data, out), check=False)
    assert proc.returncode != 0
    assert "not enough disk space for a checkpoint" in proc.stderr
    tags = sorted((out / "checkpoints").glob("global_step*"))
    assert tags, "the first checkpoint fits"
    from engine.checkpoint.resume import tag_problems

    latest = out / "checkpoints" / (out / "checkpoints" / "latest").read_text()
    assert tag_problems(latest) == []


def test_nan_streak_stops_with_a_usable_checkpoint(tokenizer_dir, pretrain_data, tmp_path):
    out = tmp_path / "run"
    proc = run_launcher("tests/fault_launcher.py", args(tokenizer_dir, pretrain_data, out, max_consecutive_nonfinite=3,
                                                        fault_nan_steps="5,6,7"), check=False)
    assert proc.returncode != 0 and "3 steps in a row had a NaN/inf loss (up to step 7)" in proc.stderr
    assert "The last checkpoint" in proc.stderr
    # the run goes on from its last checkpoint once the cause is gone
    proc = run_launcher("pretrain.py", args(tokenizer_dir, pretrain_data, out, max_steps=8))
    assert "at step 6" in proc.stdout and json.loads((out / "checkpoints" / "global_step8" / "zerotrain.json")
                                                    .read_text())["step"] == 8
