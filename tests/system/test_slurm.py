"""scripts/slurm/pretrain.sbatch on a real one-node SLURM cluster: a job runs to the end; a job
sent SIGUSR1 mid-run (as `--signal=B:USR1@300` does before the time limit) checkpoints, requeues
itself and finishes at the same step with the same weights, bit for bit, as the unbroken job."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import ROOT, train_losses

pytestmark = pytest.mark.system

SLURM_DIR = ROOT / "scripts" / "slurm"
# Long enough (a few seconds) that the notice, sent once training has started, lands mid-run.
MAX_STEPS = 300
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL")


def train_args(tokenizer_dir, data, out) -> list[str]:
    args = {"preset": "debug", "tokenizer": tokenizer_dir, "data": data, "output-dir": out, "seq-len": 32,
            "micro-batch-size": 4, "max-steps": MAX_STEPS, "warmup-steps": 2, "lr": 3e-3, "log-interval": 1,
            "eval-interval": 1000, "eval-samples": 16, "save-interval": 1000, "precision": "fp32", "seed": 1}
    return [x for k, v in args.items() for x in (f"--{k}", str(v))]


def submit(cluster, log_dir: Path, args: list[str], script: Path = SLURM_DIR / "pretrain.sbatch") -> str:
    """sbatch from the checkout (as users do), one rank per allocated CPU; the job id. Standard
    error (progress bars, warnings) goes to a file of its own: SLURM writes the two streams into
    one file as their pieces arrive, which can cut a line of one in two."""
    proc = subprocess.run(["sbatch", "--parsable", f"--output={log_dir}/%x-%j.out", f"--error={log_dir}/%x-%j.err",
                           "--cpus-per-task=2",
                           str(script), *args],
                          cwd=ROOT, env=cluster.env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def wait_job(cluster, job_id: str, states: tuple[str, ...], timeout: float = 300) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = cluster.job(job_id)
        if job["JobState"] in states:
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} still {job['JobState']} after {timeout:.0f} s")


def job_log(log_dir: Path, job_id: str) -> str:
    """The job's standard output (two ranks and every restart share the file)."""
    return (log_dir / f"zt-pretrain-{job_id}.out").read_text(errors="replace")


def job_report(log_dir: Path, job_id: str) -> str:
    """For a failing assertion: the output and the end of standard error, without progress bars."""
    err = (log_dir / f"zt-pretrain-{job_id}.err").read_text(errors="replace").replace("\r", "\n").splitlines()
    err = [line for line in err if not re.match(r"\s*(pretrain|Writing model shards):", line)]
    return job_log(log_dir, job_id) + "\n--- stderr ---\n" + "\n".join(err[-60:])


@pytest.fixture(scope="module")
def unbroken_job(slurm_cluster, tokenizer_dir, pretrain_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("slurm_unbroken")
    job_id = submit(slurm_cluster, tmp, train_args(tokenizer_dir, pretrain_data, tmp / "run"))
    job = wait_job(slurm_cluster, job_id, FINAL_STATES)
    return job, job_log(tmp, job_id), tmp / "run"


def test_pretrain_job_runs_to_the_end(unbroken_job):
    job, log, run = unbroken_job
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", log
    assert "1 node(s) x 2 rank(s)" in log and "training finished (exit 0)" in log
    assert sorted(train_losses(run)) == list(range(1, MAX_STEPS + 1))
    assert (run / "final" / "model.safetensors").is_file()


def test_preempted_job_checkpoints_requeues_and_matches(slurm_cluster, unbroken_job, tokenizer_dir, pretrain_data,
                                                        tmp_path):
    job_id = submit(slurm_cluster, tmp_path, train_args(tokenizer_dir, pretrain_data, tmp_path / "run"))
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and metrics.read_text().strip()):  # training has started
        assert time.monotonic() < deadline, f"job {job_id} never started training"
        assert slurm_cluster.job(job_id)["JobState"] in ("PENDING", "RUNNING"), job_report(tmp_path, job_id)
        time.sleep(0.1)
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", job_id)

    # The batch script requeues the job after the ranks have saved. SLURM holds a requeued job
    # until its old credential has expired (cred_expire, 10 s in the test cluster) and then
    # starts it by itself. (Forcing StartTime=now races slurmd: "Job credential revoked".)
    deadline = time.monotonic() + 300
    while (job := slurm_cluster.job(job_id))["Restarts"] == "0" or job["JobState"] != "PENDING":
        assert job["JobState"] not in FINAL_STATES, job_report(tmp_path, job_id)
        assert time.monotonic() < deadline, f"job {job_id} was not requeued: {job}"
        time.sleep(0.5)
    job = wait_job(slurm_cluster, job_id, FINAL_STATES)
    log, report = job_log(tmp_path, job_id), job_report(tmp_path, job_id)
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0" and job["Restarts"] == "1", report

    stopped = re.search(r"stopped by signal SIGUSR1 at step (\d+)", log)
    assert stopped, report
    step = int(stopped.group(1))
    assert 1 <= step < MAX_STEPS, report
    assert "SIGUSR1: the ranks save a checkpoint and stop" in log
    assert "requeueing job" in log and "(restart 1)" in log
    assert f"resumed from {tmp_path / 'run' / 'checkpoints' / f'global_step{step}'} at step {step}" in log
    assert "training finished (exit 0)" in log

    _, _, unbroken = unbroken_job
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert max(r["step"] for r in records) == MAX_STEPS
    assert train_losses(tmp_path / "run") == train_losses(unbroken)
    a = load_file(unbroken / "final" / "model.safetensors")
    b = load_file(tmp_path / "run" / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == torch.float32 and torch.equal(a[key], b[key]), key


def test_batch_scripts_share_one_body():
    launchers = sorted((ROOT / "launcher").glob("*.py"))
    assert [p.stem for p in launchers] == sorted(p.stem for p in SLURM_DIR.glob("*.sbatch"))  # one per launcher
    for name in ("common.sh", "node.sh", *(f"{p.stem}.sbatch" for p in launchers)):
        subprocess.run(["bash", "-n", str(SLURM_DIR / name)], check=True)
    for name, launcher in ((f"{p.stem}.sbatch", f"launcher/{p.stem}.py") for p in launchers):
        text = (SLURM_DIR / name).read_text()
        for directive in ("--output=logs/%x-%j.out", "--signal=B:USR1@", "--requeue", "--ntasks-per-node=1"):
            assert f"#SBATCH {directive}" in text, (name, directive)
        assert 'scripts/slurm/common.sh"' in text and f'zt_run {launcher} "$@"' in text
    # outside a job the body refuses to run, saying how to submit
    proc = subprocess.run(["bash", "-c", f'source {SLURM_DIR}/common.sh; zt_run launcher/pretrain.py'],
                          capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2 and "not inside a SLURM job" in proc.stderr


def fault_sbatch(tmp_path: Path) -> Path:
    """pretrain.sbatch running tests/fault_launcher.py (faults injected through the trainer's hooks)."""
    script = tmp_path / "fault.sbatch"
    text = (SLURM_DIR / "pretrain.sbatch").read_text()
    assert 'zt_run launcher/pretrain.py "$@"' in text
    script.write_text(text.replace('zt_run launcher/pretrain.py "$@"', 'zt_run tests/fault_launcher.py "$@"'))
    return script


def test_a_hung_rank_ends_the_job_which_requeues_itself_and_finishes(slurm_cluster, tokenizer_dir, pretrain_data,
                                                                      tmp_path):
    """The watchdog's exit under srun: every process ends, the batch script requeues the job and
    the restart resumes from the last checkpoint (the test's hang happens once per run)."""
    run = tmp_path / "run"
    args = train_args(tokenizer_dir, pretrain_data, run) + ["--max-steps", "8", "--save-interval", "2",
                                                             "--hang-timeout", "8", "--fault-hang-at", "5"]
    job_id = submit(slurm_cluster, tmp_path, args, fault_sbatch(tmp_path))
    job = wait_job(slurm_cluster, job_id, FINAL_STATES, timeout=420)
    log, report = job_log(tmp_path, job_id), job_report(tmp_path, job_id)
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", report
    assert "the watchdog ended training (stall" in log and "requeueing job" in log, report
    assert f"resumed from {run / 'checkpoints' / 'global_step4'} at step 4" in log, report
    assert "in hang_forever" in (run / "hang" / "rank1.txt").read_text()
    assert "the job is stalled" in (tmp_path / f"zt-pretrain-{job_id}.err").read_text(errors="replace")
    assert sorted(train_losses(run)) == list(range(1, 9))


def test_a_killed_rank_ends_the_job_within_a_minute(slurm_cluster, tokenizer_dir, pretrain_data, tmp_path):
    run = tmp_path / "run"
    args = train_args(tokenizer_dir, pretrain_data, run) + ["--fault-kill-at", "60:step", "--fault-kill-rank", "1"]
    job_id = submit(slurm_cluster, tmp_path, args, fault_sbatch(tmp_path))
    deadline = time.monotonic() + 300
    while not (run / "metrics.jsonl").is_file() or 59 not in train_losses(run):  # the kill is one step away
        assert time.monotonic() < deadline and slurm_cluster.job(job_id)["JobState"] in ("PENDING", "RUNNING"), \
            job_report(tmp_path, job_id)
        time.sleep(0.1)
    killed = time.monotonic()
    job = wait_job(slurm_cluster, job_id, FINAL_STATES, timeout=120)
    assert time.monotonic() - killed < 60, job_report(tmp_path, job_id)
    assert job["JobState"] == "FAILED" and job["Restarts"] == "0", job_report(tmp_path, job_id)
