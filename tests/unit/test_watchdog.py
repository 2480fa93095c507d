"""engine.training.watchdog in one process: ranks are Watchdog objects sharing an in-memory store
(torch's HashStore, the same interface as the job's TCPStore), their exits recorded instead of
taken. The launcher-level tests (a hung or killed rank under torchrun, deepspeed and srun) are in
tests/faults/test_hangs.py."""

from __future__ import annotations

import time

import pytest
import torch.distributed as dist

from engine.training.watchdog import (
    FAILED_EXIT,
    FLOOR_S,
    HANG_EXIT,
    REQUEUE_FILE_ENV,
    Watchdog,
)

FAST = {"interval": 0.05, "dead_after": 0.5, "gather": 3.0}


def ranks(tmp_path, world_size: int, timeout: float | None = 60.0) -> tuple[list[Watchdog], list[int]]:
    store, exits = dist.HashStore(), []
    dogs = [Watchdog(tmp_path / "hang", r, world_size, timeout, store=store, exit=exits.append, **FAST)
            for r in range(world_size)]
    return dogs, exits


def wait_until(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def stuck_in_a_collective(dogs: list[Watchdog]) -> None:
    """The hang site the stack files must name."""
    wait_until(lambda: all(d.ended for d in dogs))


def test_allowances_default_explicit_and_per_activity(tmp_path):
    dog = Watchdog(tmp_path, 0, 1, None)
    assert dog.allowance("step") == FLOOR_S  # not timed yet
    dog.durations["step"].extend([40.0, 50.0])
    assert dog.allowance("step") == FLOOR_S  # two steps are not a median yet
    dog.durations["step"].append(45.0)
    assert dog.allowance("step") == 20 * 45.0
    assert dog.allowance("save") == FLOOR_S
    dog.durations["save"].append(100.0)
    assert dog.allowance("save") == 2000.0
    explicit = Watchdog(tmp_path, 0, 1, 5.0)
    explicit.durations["step"].extend([40.0] * 5)
    assert explicit.allowance("step") == 5.0  # --hang-timeout is what a step gets
    assert explicit.allowance("eval") == FLOOR_S  # first evaluation: not timed yet
    explicit.durations["eval"].append(1.0)
    assert explicit.allowance("eval") == 20.0
    assert not Watchdog(tmp_path, 0, 1, 0).enabled


def test_a_stall_writes_every_stack_and_names_the_rank_behind(tmp_path, capsys, monkeypatch):
    marker = tmp_path / "requeue"
    monkeypatch.setenv(REQUEUE_FILE_ENV, str(marker))
    dogs, exits = ranks(tmp_path, 2, timeout=0.5)
    for dog in dogs:
        dog.start(step=7)
    dogs[0].mark("step 8, micro-batch 1 of 1: forward")
    dogs[0].mark("step 8: all-reduce of the step's sums")
    dogs[1].mark("step 8, micro-batch 1 of 1: forward")
    stuck_in_a_collective(dogs)
    wait_until(lambda: len(exits) == 2)  # a watchdog sets `ended` first, then calls exit
    assert exits == [HANG_EXIT, HANG_EXIT] and [d.ended for d in dogs] == ["stall", "stall"]
    for rank in (0, 1):
        stacks = (tmp_path / "hang" / f"rank{rank}.txt").read_text()
        assert stacks.startswith(f"rank {rank} (") and "no progress for" in stacks
        assert "in stuck_in_a_collective" in stacks  # the main thread's hang site
    err = capsys.readouterr().err
    assert "the job is stalled" in err
    assert "rank 1 (" in err and "last finished step 7, now step 8, micro-batch 1 of 1: forward   <- behind" in err
    assert "now step 8: all-reduce of the step's sums\n" in err
    assert marker.read_text() == "stall\n"  # SLURM's batch script requeues on it


def test_progress_keeps_a_rank_from_stalling(tmp_path):
    dog = Watchdog(tmp_path / "hang", 0, 1, 0.4, exit=lambda status: None, interval=0.05)
    dog.start(step=0)
    for step in range(1, 16):  # 0.75 s of steps, each well inside the allowance
        time.sleep(0.05)
        dog.beat(step)
    with dog.activity("save"):  # longer than a step may take: a save has its own allowance
        time.sleep(0.6)
    dog.stop()
    assert dog.ended is None and not (tmp_path / "hang").exists()


def test_a_dead_rank_ends_the_job_and_rank0_tells_the_others(tmp_path, capsys):
    dogs, exits = ranks(tmp_path, 3)
    for dog in dogs:
        dog.start(step=0)
    time.sleep(0.3)  # every counter seen moving
    dogs[2]._stop.set()  # rank 2's process is gone: its counter stops, nothing marks it done
    wait_until(lambda: dogs[0].ended and dogs[1].ended and len(exits) == 2)
    assert [d.ended for d in dogs[:2]] == ["dead", "dead"] and exits == [HANG_EXIT, HANG_EXIT]
    err = capsys.readouterr().err
    assert err.count("rank 2 has not answered for") == 1  # rank 0 says it; rank 1 follows its verdict
    assert "instead of waiting out the collective timeout (--dist-timeout)" in err


def test_rank0_dead_is_noticed_by_the_others(tmp_path, capsys):
    dogs, exits = ranks(tmp_path, 2)
    for dog in dogs:
        dog.start(step=0)
    time.sleep(0.3)
    dogs[0]._stop.set()
    wait_until(lambda: dogs[1].ended)
    assert dogs[1].ended == "dead" and "rank 0 has not answered" in capsys.readouterr().err


def test_a_finished_rank_is_not_taken_for_dead_and_a_failed_one_ends_the_job(tmp_path):
    dogs, exits = ranks(tmp_path, 3)
    for dog in dogs:
        dog.start(step=0)
    time.sleep(0.3)
    dogs[1].stop()  # done: rank 0 may write the final model alone for a long time
    time.sleep(1.5)  # three times dead_after
    assert dogs[0].ended is None and exits == []
    dogs[2].stop(failed=True)
    wait_until(lambda: dogs[0].ended and exits)
    assert dogs[0].ended == "failed" and exits == [FAILED_EXIT]
    dogs[0].stop()


def test_the_store_gone_ends_the_job(tmp_path):
    class Gone:
        def __getattr__(self, name):
            def fail(*args):
                raise RuntimeError("Connection reset by peer")
            return fail

    exits = []
    dog = Watchdog(tmp_path / "hang", 1, 2, 60.0, store=Gone(), exit=exits.append, **FAST)
    dog.start(step=0)
    wait_until(lambda: dog.ended and exits)
    assert dog.ended == "store" and exits == [HANG_EXIT]


@pytest.mark.parametrize("timeout", [0, None])
def test_off_and_default_watchdogs_do_not_fire_in_a_short_run(tmp_path, timeout):
    dog = Watchdog(tmp_path / "hang", 0, 1, timeout, exit=lambda status: None, interval=0.05)
    with dog.start(step=0):
        time.sleep(0.2)
        dog.beat(1)
    assert dog.ended is None and (dog._thread is None) == (timeout == 0)


def test_a_rank_that_never_counts_is_dead_after_twice_the_wait(tmp_path):
    """Frozen or killed before its watchdog's first count (say within a second of the first step)."""
    dogs, exits = ranks(tmp_path, 2)
    dogs[0].start(step=0)  # rank 1 never starts
    began = time.monotonic()
    wait_until(lambda: dogs[0].ended)
    assert dogs[0].ended == "dead" and time.monotonic() - began >= 2 * FAST["dead_after"]
