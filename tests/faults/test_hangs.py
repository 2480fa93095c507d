"""A stalled, killed or frozen rank ends the whole job quickly, under torchrun and the deepspeed
launcher (srun: tests/system/test_slurm.py): 2 CPU ranks, ZeRO-2, the debug preset. Every launch
runs in its own session, so "every process has exited" is checked on all of them, launcher
included. engine.training.watchdog's logic on its own: tests/unit/test_watchdog.py."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest

from tests.helpers import (
    ROOT,
    cli_flags,
    launcher_command,
    launcher_env,
    metrics,
    run_launcher,
)

pytestmark = pytest.mark.faults
HANG_TIMEOUT = 8


def args(tokenizer_dir, data, out, **overrides) -> list[str]:
    values = {"tokenizer": tokenizer_dir, "data": data, "output-dir": out, "seq-len": 32, "micro-batch-size": 4,
              "max-steps": 8, "warmup-steps": 2, "lr": 3e-3, "log-interval": 1, "eval-interval": 100,
              "save-interval": 2, "zero-stage": 2, "precision": "fp32", "seed": 11, "hang-timeout": HANG_TIMEOUT}
    return cli_flags(values, **overrides)


class Job:
    """A launch, and every process it started: the launchers put workers in sessions of their own,
    so they are tracked as the launcher's descendants, remembered once seen."""

    def __init__(self, cmd: list[str], env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env or launcher_env(), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, errors="replace")
        self.root = psutil.Process(self.proc.pid)
        self.seen: dict[int, psutil.Process] = {self.proc.pid: self.root}
        # Drained as they come: a launcher blocked on a full pipe would look like a hang.
        self.out: list[str] = []
        self.err: list[str] = []
        self.readers = [threading.Thread(target=lambda s=s, b=b: b.extend(s), daemon=True)
                        for s, b in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for reader in self.readers:
            reader.start()

    def processes(self) -> list[psutil.Process]:
        try:
            for child in self.root.children(recursive=True):
                self.seen.setdefault(child.pid, child)
        except psutil.Error:
            pass
        alive = []
        for p in self.seen.values():
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.Error:
                pass
        return alive

    def rank(self, rank: int, timeout: float = 120) -> psutil.Process:
        """The training process of `rank` (its RANK variable), once it has started."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p in self.processes():
                try:
                    if "fault_launcher.py" in " ".join(p.cmdline()) and p.environ().get("RANK") == str(rank):
                        return p
                except psutil.Error:
                    pass
            time.sleep(0.1)
        raise AssertionError(f"rank {rank} never started")

    def wait_gone(self, timeout: float) -> float:
        """Wait until every process of the launch has exited; when that was (time.time())."""
        deadline = time.monotonic() + timeout
        while self.processes():
            if time.monotonic() > deadline:
                left = self.processes()
                for p in left:
                    p.kill()
                raise AssertionError(f"still running after {timeout:.0f} s: {[p.pid for p in left]}")
            time.sleep(0.1)
        return time.time()

    def output(self) -> tuple[str, str]:
        self.proc.wait(timeout=30)
        for reader in self.readers:
            reader.join(timeout=30)
        return "".join(self.out), "".join(self.err)


def wait_for_step(out: Path, step: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not ((out / "metrics.jsonl").is_file() and any(r.get("step", 0) >= step for r in metrics(out))):
        assert time.monotonic() < deadline, f"step {step} not reached"
        time.sleep(0.1)


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_a_hung_rank_ends_the_job_with_every_stack_and_the_next_start_resumes(tokenizer_dir, pretrain_data,
                                                                               tmp_path, launcher):
    out = tmp_path / "run"
    job = Job(launcher_command("tests/fault_launcher.py", args(tokenizer_dir, pretrain_data, out, fault_hang_at=5),
                               launcher=launcher))
    gone = job.wait_gone(timeout=300)
    stdout, stderr = job.output()
    began = float((out / "hang-began").read_text())
    assert gone - began < HANG_TIMEOUT + 60, stderr[-3000:]
    assert job.proc.returncode != 0
    stacks = {r: (out / "hang" / f"rank{r}.txt").read_text() for r in (0, 1)}
    assert "in hang_forever" in stacks[1] and "in hang_forever" not in stacks[0]
    assert "no progress for" in stacks[0] and "Thread zerotrain-watchdog" in stacks[0]
    assert "the job is stalled" in stderr and "last finished step 4" in stderr
    assert "now step 5, micro-batch 1 of 1: forward   <- behind" in stderr, stderr[-3000:]
    assert "now step 5, micro-batch 1 of 1: backward\n" in stderr
    if launcher == "torchrun":  # the next start resumes from the last checkpoint (the fault fires once)
        proc = run_launcher("tests/fault_launcher.py", args(tokenizer_dir, pretrain_data, out, fault_hang_at=5))
        assert "resumed from" in proc.stdout and "global_step4" in proc.stdout
        assert (out / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_a_killed_rank_ends_the_job_within_a_minute(tokenizer_dir, pretrain_data, tmp_path, launcher):
    out = tmp_path / "run"
    job = Job(launcher_command("tests/fault_launcher.py",
                               args(tokenizer_dir, pretrain_data, out, max_steps=400, save_interval=1000,
                                    fault_kill_at="60:step", fault_kill_rank=1), launcher=launcher))
    victim = job.rank(1)
    victim.wait(timeout=180)
    killed = time.time()
    gone = job.wait_gone(timeout=120)
    job.output()
    assert gone - killed < 60 and job.proc.returncode != 0


def test_a_frozen_rank_is_taken_for_dead_and_the_job_ends(tokenizer_dir, pretrain_data, tmp_path):
    """SIGSTOP keeps the frozen rank's sockets open, so the other rank's collective would wait for
    --dist-timeout; its watchdog sees the frozen rank's counter stop and ends the job."""
    out = tmp_path / "run"
    job = Job(launcher_command("tests/fault_launcher.py",
                               args(tokenizer_dir, pretrain_data, out, max_steps=400, save_interval=1000,
                                    hang_timeout=300)))  # the dead-rank check, not the stall one
    frozen, survivor = job.rank(1), job.rank(0)
    wait_for_step(out, 3)
    frozen.send_signal(signal.SIGSTOP)
    stopped = time.time()
    survivor.wait(timeout=90)
    assert time.time() - stopped < 60
    job.wait_gone(timeout=90)  # torchrun then kills the frozen one
    stderr = job.output()[1]
    assert job.proc.returncode != 0
    assert "rank 1 has not answered for" in stderr and "--dist-timeout" in stderr, stderr[-3000:]


STALLING_REWARD = '''
import os, time

def stalls(prompts, completions, completion_ids, **columns):
    """Rank 1 never returns from step 2's scoring (a reward server that stopped answering)."""
    if os.environ.get("RANK") == "1" and os.path.exists(os.environ["ZT_TEST_STALL_FLAG"]):
        time.sleep(10 ** 6)
    open(os.environ["ZT_TEST_STALL_FLAG"], "w").close()
    return [float(len(c)) for c in completions]
'''


def test_a_reward_function_that_hangs_inside_a_rollout_ends_the_job_with_every_stack(base_model_dir, tmp_path):
    """A GRPO rollout is watched like any step: rank 1 stuck in its reward function at step 2 ends
    the job within the hang timeout, its stack dump shows the function, and the report names the
    step's rollout as where it was."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join('{"prompt": "count to %d"}\n' % i for i in range(16)))
    (tmp_path / "rewards.py").write_text(STALLING_REWARD)
    out = tmp_path / "run"
    cmd = launcher_command("grpo.py", ["--init-from", base_model_dir, "--data", prompts, "--output-dir", out,
                                       "--reward-fn", f"{tmp_path / 'rewards.py'}:stalls", "--num-generations", 2,
                                       "--micro-batch-size", 4, "--max-new-tokens", 4, "--seq-len", 32,
                                       "--max-steps", 6, "--log-interval", 1, "--save-interval", 100,
                                       "--precision", "fp32", "--zero-stage", 2, "--hang-timeout", HANG_TIMEOUT,
                                       "--data-cache-dir", tmp_path / "cache"])
    env = launcher_env(ZT_TEST_STALL_FLAG=str(tmp_path / "stall-flag"))
    job = Job(cmd, env)
    job.wait_gone(timeout=300)
    stderr = job.output()[1]
    assert job.proc.returncode != 0
    stacks = (out / "hang" / "rank1.txt").read_text()
    assert "in stalls" in stacks and "in rollout" in stacks, stacks[-3000:]
    assert "the job is stalled" in stderr and ": preparing its batches" in stderr, stderr[-3000:]
