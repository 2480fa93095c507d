"""Kill soak: seeded trials that SIGKILL one rank of a 2-rank run at a random moment, resume it
with --resume auto, and compare the final weights bit for bit with an unbroken run.

    .venv/bin/python scripts/soak/kill_resume.py --trials 20 [--seed 0] [--out runs/soak]

Each trial picks a ZeRO stage (2 or 3), a rank (0 or 1), a step and a moment:
  step     inside the loss of one micro-batch of that step (micro-batch 1: between micro-batches)
  ds-save  inside DeepSpeed's save, once its first file on that rank is written
  save     after DeepSpeed's shards, before zerotrain's own files
  eval     as the evaluation after that step starts
The run (torchrun, debug preset, data/samples/tinyshakespeare.txt, fp32, seq-len 32, --keep-last 1)
goes through tests/fault_launcher.py with the kill injected. The trial checks that the job died
and that no rank outlived it (every launch is bounded by --timeout), that `latest` names the
newest checkpoint saved before the kill and that it is complete, that a half-written tag is
not complete, then resumes until the run finishes and checks that the first resume started from
that checkpoint (from the beginning when the kill came before the first save finished), that it
said it skipped a half-written tag, and that every tensor of final/ equals the unbroken run's of
the same stage (made once per stage here). Failed trials keep their run directory and logs.

One line per trial, then "N/N bit-identical"; every trial's record in OUT/results.json; exit
status 1 if any trial failed. The trials of one --seed are the same on every machine.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from engine.checkpoint.run_dir import LATEST, SIDECAR, tag_name  # noqa: E402
from tests.fault_launcher import KILL_POINTS  # noqa: E402
from tests.helpers import launcher_command, launcher_env  # noqa: E402

STAGES = (2, 3)
RANKS = 2
STEPS, GRAD_ACCUM, SAVE_INTERVAL, EVAL_INTERVAL = 8, 2, 2, 3
SAVE_STEPS = [s for s in range(1, STEPS + 1) if s % SAVE_INTERVAL == 0 or s == STEPS]
EVAL_STEPS = [s for s in range(1, STEPS + 1) if s % EVAL_INTERVAL == 0 or s == STEPS]
RUN_FLAGS = {"preset": "debug", "data": ROOT / "data" / "samples" / "tinyshakespeare.txt", "seq-len": 32,
             "micro-batch-size": 2, "grad-accum": GRAD_ACCUM, "max-steps": STEPS, "warmup-steps": 2, "lr": 3e-3,
             "log-interval": 1, "eval-interval": EVAL_INTERVAL, "eval-samples": 8, "save-interval": SAVE_INTERVAL,
             "keep-last": 1, "precision": "fp32", "seed": 11}


@dataclass
class Trial:
    index: int
    stage: int
    rank: int
    where: str
    step: int
    micro: int = 0
    """The micro-batch whose loss the kill interrupts (where == 'step')."""

    @property
    def name(self) -> str:
        micro = f" micro-batch {self.micro}" if self.where == "step" else ""
        return f"zero{self.stage} rank{self.rank} {self.where:7} step {self.step}{micro}"

    @property
    def kill_flag(self) -> str:
        return f"{self.step}:{self.where}" + (f":{self.micro}" if self.where == "step" else "")

    @property
    def expected_resume(self) -> int | None:
        """The step of the newest checkpoint complete before the kill: at every moment the kill
        comes before step `step`'s save has finished (the evaluation comes before the save)."""
        return max((s for s in SAVE_STEPS if s < self.step), default=None)


@dataclass
class Result:
    trial: Trial
    problems: list[str] = field(default_factory=list)
    resumed_from: str | None = None
    launches: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems


def plan(trials: int, seed: int) -> list[Trial]:
    """The seeded trials: the moments in turn, each with both stages equally often; rank, step
    (one where that moment happens) and micro-batch drawn."""
    rng = random.Random(seed)
    out = []
    for i in range(trials):
        where = KILL_POINTS[i % len(KILL_POINTS)]
        stage = STAGES[(i + i // len(KILL_POINTS)) % len(STAGES)]
        steps = {"step": range(1, STEPS + 1), "ds-save": SAVE_STEPS, "save": SAVE_STEPS, "eval": EVAL_STEPS}[where]
        out.append(Trial(i, stage, rng.randrange(RANKS), where, rng.choice(list(steps)),
                         rng.randrange(GRAD_ACCUM) if where == "step" else 0))
    return out


def launch(script: str, run_dir: Path, stage: int, log: Path, timeout: int,
           extra: Sequence[str] = ()) -> tuple[int, str]:
    """Run a 2-rank launch; (exit status, its output). A launch still running after `timeout`, or
    a rank that outlives torchrun, is killed and reported as hung."""
    flags = {**RUN_FLAGS, "output-dir": run_dir, "zero-stage": stage}
    cmd = launcher_command(script, [x for k, v in flags.items() for x in (f"--{k}", v)] + list(extra), nproc=RANKS)
    env = launcher_env(run_dir.parent.parent / "cache")
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            status = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            status = None
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    # torchrun starts each rank in a session of its own: a rank left behind is found by its
    # command line, which names this trial's run directory.
    deadline = time.time() + (10 if status is not None else 0)
    while (left := processes_naming(run_dir)) and time.time() < deadline:
        time.sleep(0.2)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    if status is None:
        raise Hung(f"still running after {timeout} s (log {log})")
    if left:
        raise Hung(f"{len(left)} rank(s) outlived the job (exit {status}; log {log})")
    return status, log.read_text(errors="replace")


class Hung(Exception):
    pass


def processes_naming(run_dir: Path) -> list[int]:
    """Live processes whose command line names `run_dir`."""
    needle = os.fsencode(run_dir)
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue  # gone meanwhile
            if needle in cmdline and state != "Z":
                pids.append(int(entry.name))
    return pids


def same_weights(a: Path, b: Path) -> list[str]:
    """Why final/ of run a differs from run b's (empty when every tensor is equal)."""
    import torch
    from safetensors.torch import load_file

    wa, wb = (load_file(run / "final" / "model.safetensors") for run in (a, b))
    if wa.keys() != wb.keys():
        return [f"tensor names differ: {sorted(wa.keys() ^ wb.keys())}"]
    return [f"{key} differs" for key in sorted(wa) if not torch.equal(wa[key], wb[key])]


def run_trial(trial: Trial, reference: Path, work: Path, timeout: int, max_resumes: int = 3) -> Result:
    from engine.checkpoint.resume import tag_problems

    result = Result(trial)
    start = time.time()
    run = work / f"trial{trial.index:03d}" / "run"
    shutil.rmtree(run.parent, ignore_errors=True)
    run.parent.mkdir(parents=True)
    problems = result.problems
    try:
        status, output = launch("tests/fault_launcher.py", run, trial.stage, run.parent / "killed.log", timeout,
                                ["--fault-kill-at", trial.kill_flag, "--fault-kill-rank", str(trial.rank)])
        result.launches += 1
        if status == 0 or "SIGKILL" not in output or (run / "final").exists():
            problems.append(f"the job was not killed (exit {status}; log {run.parent / 'killed.log'})")
        ckpts = run / "checkpoints"
        expected = None if trial.expected_resume is None else tag_name(trial.expected_resume)
        latest = (ckpts / LATEST).read_text().strip() if (ckpts / LATEST).is_file() else None
        if latest != expected:
            problems.append(f"latest names {latest} after the kill, expected {expected}")
        elif latest is not None and tag_problems(ckpts / latest):
            problems.append(f"latest {latest} is not complete: {tag_problems(ckpts / latest)}")
        if (ckpts / tag_name(trial.step) / SIDECAR).exists():
            problems.append(f"{tag_name(trial.step)} looks complete though its save was killed")
        while not (run / "final" / "model.safetensors").is_file() and result.launches <= max_resumes:
            log = run.parent / f"resume{result.launches}.log"
            status, output = launch("pretrain.py", run, trial.stage, log, timeout, ["--resume", "auto"])
            if result.launches == 1:
                result.resumed_from = _resumed_from(output)
                wanted = f"{expected} at step {trial.expected_resume}" if expected else None
                if result.resumed_from != wanted:
                    problems.append(f"resumed from {result.resumed_from}, expected {wanted} (log {log})")
                half = tag_name(trial.step)
                if trial.where.endswith("save") and not any(f"{why} {half}" in output for why in (
                        "skipped incomplete checkpoint(s)", "only unfinished save(s)")):
                    problems.append(f"the resume did not say it skipped the half-written {half} (log {log})")
            result.launches += 1
            if status != 0:
                problems.append(f"resume {result.launches - 1} exited {status} (log {log})")
        if not (run / "final" / "model.safetensors").is_file():
            problems.append(f"no final model after {result.launches - 1} resumes")
        else:
            problems += same_weights(reference, run)
    except Hung as e:
        problems.append(f"hung: {e}")
    result.seconds = time.time() - start
    if result.ok:
        shutil.rmtree(run.parent, ignore_errors=True)  # failed trials keep their runs and logs
    return result


def _resumed_from(output: str) -> str | None:
    """'global_step4 at step 4' from the resume's "resumed from .../global_step4 at step 4" line."""
    for line in output.splitlines():
        if "[zerotrain] resumed from " in line:
            return line.split("resumed from ", 1)[1].rsplit("/", 1)[-1].strip()
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="the same seed makes the same trials")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "soak", help="work directory; results.json here")
    parser.add_argument("--timeout", type=int, default=300, help="seconds one launch may take before it counts as hung")
    args = parser.parse_args(argv)
    started = time.time()
    work = args.out / "work"
    trials = plan(args.trials, args.seed)
    references = {}
    for stage in sorted({t.stage for t in trials}):
        run = work / f"reference_zero{stage}" / "run"
        shutil.rmtree(run.parent, ignore_errors=True)
        run.parent.mkdir(parents=True)
        status, _ = launch("pretrain.py", run, stage, run.parent / "run.log", args.timeout)
        if status != 0:
            print(f"the unbroken ZeRO-{stage} run failed (exit {status}; log {run.parent / 'run.log'})",
                  file=sys.stderr)
            return 1
        references[stage] = run
        print(f"unbroken ZeRO-{stage} run done ({time.time() - started:.0f} s)", flush=True)
    results = []
    for trial in trials:
        result = run_trial(trial, references[trial.stage], work, args.timeout)
        results.append(result)
        verdict = (f"resumed from {result.resumed_from or 'the start'}, bit-identical" if result.ok
                   else "FAILED: " + "; ".join(result.problems))
        print(f"trial {trial.index + 1:2d}/{len(trials)}  {trial.name:38}  {verdict}  ({result.seconds:.0f} s)",
              flush=True)
    passed = sum(r.ok for r in results)
    wall = time.time() - started
    summary = f"{passed}/{len(results)} bit-identical"
    print(f"{summary} ({wall / 60:.1f} min)")
    (args.out / "results.json").write_text(json.dumps({
        "command": " ".join([os.path.relpath(sys.executable, ROOT), *sys.argv]), "seed": args.seed,
        "summary": summary, "passed": passed, "trials": len(results), "wall_seconds": round(wall, 1),
        "run_flags": {k: str(v) for k, v in RUN_FLAGS.items()},
        "results": [{**asdict(r.trial), "ok": r.ok, "problems": r.problems, "resumed_from": r.resumed_from,
                     "launches": r.launches, "seconds": round(r.seconds, 1)} for r in results]}, indent=2))
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
