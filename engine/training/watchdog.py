"""A stalled or dead rank ends the job within minutes, not at the collective timeout.

One thread per rank, started by the loop (`Trainer.fit`), which tells it what the rank is doing:
`mark(what)` at each point of a step, `beat(step)` when an optimizer step is finished, and
`activity("eval" | "save")` around the longer work. Two things end the job:

* A stall: nothing finished within the allowance of what the rank is doing (`allowance`). The
  ranks stall together (the others wait for the stuck one in a collective), so each writes every
  thread's Python stack to RUN/hang/rank{N}.txt; rank 0 gathers where each rank is through the
  rendezvous store and prints the last step each finished, the ranks furthest behind marked; and
  every rank exits with HANG_EXIT, so torchrun, the deepspeed launcher or srun ends the job.
* A dead rank: each rank adds to its counter in the rendezvous store every `interval` seconds
  from this thread, which keeps counting while the main thread waits in a collective. A counter
  that stops for `dead_after` seconds means that process is gone (killed, out of memory, a lost
  node) or frozen: the ranks exit at once, naming it, instead of waiting out --dist-timeout. Rank
  0 watches every counter and posts its verdict; the others watch rank 0's counter and the
  verdict, so the store sees O(ranks) requests. A rank leaving the loop marks itself done (or
  failed, on an exception), so a rank still writing the final model alone is not taken for dead
  and the others stop at once when one fails.

Under SLURM, scripts/slurm/common.sh names a file in ZEROTRAIN_REQUEUE_FILE; a stall or a lost
rank writes it, and the batch script requeues the job, which resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import sys
import threading
import time
import traceback
from collections import deque
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from common.process import exit_process

HANG_EXIT = 75  # EX_TEMPFAIL: a stall or a lost rank; starting again (it resumes) can succeed
FAILED_EXIT = 1  # another rank stopped with an error, which its own output shows
FLOOR_S = 600.0  # the allowance of work not timed yet, and the least a default allowance is
FACTOR = 20.0  # an allowance is this many times the median duration of the same work
WARMUP_STEPS = 3  # steps timed before their median sets the step allowance
INTERVAL_S = 2.0
DEAD_AFTER_S = 30.0
GATHER_S = 20.0  # how long rank 0 waits for the other ranks' reports of a stall
REQUEUE_FILE_ENV = "ZEROTRAIN_REQUEUE_FILE"


def end_process(status: int) -> None:
    """The watchdog's way out: the main thread may be blocked in a collective for good."""
    exit_process(status, finish=False)


class Watchdog:
    """See the module docstring. `timeout` is --hang-timeout: None for the default, 0 for off."""

    def __init__(self, hang_dir: Path | None, rank: int, world_size: int, timeout: float | None, *, store=None,
                 interval: float = INTERVAL_S, dead_after: float = DEAD_AFTER_S, gather: float = GATHER_S,
                 exit: Callable[[int], Any] = end_process) -> None:
        self.hang_dir, self.rank, self.world_size, self.timeout = hang_dir, rank, world_size, timeout
        self.enabled = hang_dir is not None and timeout != 0
        self.store, self.interval, self.dead_after, self.gather, self.exit = store, interval, dead_after, gather, exit
        self.durations: dict[str, deque[float]] = {k: deque(maxlen=100) for k in ("step", "eval", "save")}
        self.ended: str | None = None  # the verdict acted on (tests read it when `exit` returns)
        # Written by the training thread, read by the watchdog thread; each is replaced whole.
        self._span = ("step", time.monotonic())  # what the rank is doing, since when
        self._step = 0  # the last finished step
        self._where = (0, "starting")  # (mark number within the step, what)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._seen: dict[int, tuple[int, float]] = {}  # peer -> (its counter, when it last changed)
        self._finished: set[int] = set()
        self._store_failing_since: float | None = None

    @classmethod
    def off(cls) -> Watchdog:
        return cls(None, 0, 1, 0)

    # ------------------------------------------------------------------ the training thread's side

    def start(self, step: int) -> Watchdog:
        self._step = step
        self._span = ("step", time.monotonic())
        if self.enabled:
            if self.store is None and self.world_size > 1:
                from engine.distributed import rendezvous_store

                self.store = rendezvous_store("zerotrain/watchdog/")
            self._thread = threading.Thread(target=self._run, name="zerotrain-watchdog", daemon=True)
            self._thread.start()
        return self

    def mark(self, what: str) -> None:
        self._where = (self._where[0] + 1, what)

    def beat(self, step: int) -> None:
        now = time.monotonic()
        self.durations["step"].append(now - self._span[1])
        self._step, self._where, self._span = step, (0, "between steps"), ("step", now)

    @contextmanager
    def activity(self, kind: str) -> Iterator[None]:
        """Evaluation or a save: timed on its own, with its own allowance."""
        self._span, self._where = (kind, time.monotonic()), (self._where[0] + 1, kind)
        try:
            yield
        finally:
            now = time.monotonic()
            self.durations[kind].append(now - self._span[1])
            self._span = ("step", now)

    def stop(self, failed: bool = False) -> None:
        """Leave: the thread ends, and the others learn this rank finished (or failed)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval + 5)
        if self.store is not None:
            try:
                self.store.set(f"{'failed' if failed else 'done'}/{self.rank}", "1")
            except Exception:  # noqa: BLE001 - the store may be gone with rank 0; nothing to tell then
                pass

    def __enter__(self) -> Watchdog:
        return self

    def __exit__(self, kind, value, tb) -> None:
        self.stop(failed=kind is not None)

    def allowance(self, kind: str) -> float:
        """Seconds `kind` may take: --hang-timeout for a step (by default max(FLOOR_S, FACTOR x the
        median step once WARMUP_STEPS are timed)); evaluation and saves get max(the step's setting
        or FLOOR_S, FACTOR x their own median), and at least FLOOR_S the first time."""
        seen = list(self.durations[kind])
        if kind == "step":
            if self.timeout is not None:
                return self.timeout
            return max(FLOOR_S, FACTOR * statistics.median(seen)) if len(seen) >= WARMUP_STEPS else FLOOR_S
        base = self.timeout if self.timeout is not None else FLOOR_S
        return max(base, FACTOR * statistics.median(seen)) if seen else max(base, FLOOR_S)

    # ------------------------------------------------------------------ the watchdog thread

    def _run(self) -> None:
        if self.store is not None:  # count at once: a rank may freeze before the first interval is up
            self._check_peers()
        while not self._stop.wait(self.interval):
            kind, since = self._span
            waited = time.monotonic() - since
            if waited > self.allowance(kind):
                return self._stalled(kind, waited)
            if self.store is not None:
                verdict = self._check_peers()
                if verdict is not None:
                    return self._act_on(verdict)

    def _check_peers(self) -> dict | None:
        """A verdict when a rank is gone or failed or rank 0 posted one; else None."""
        now = time.monotonic()
        try:
            self.store.add(f"alive/{self.rank}", 1)
            if self.rank != 0 and self.store.check(["verdict"]):
                return json.loads(self.store.get("verdict"))
            for peer in (range(1, self.world_size) if self.rank == 0 else [0]):
                if peer in self._finished:
                    continue
                count = self.store.add(f"alive/{peer}", 0)
                last, changed = self._seen.get(peer, (None, now))
                if count != last:
                    self._seen[peer] = (count, now)
                elif self.store.check([f"done/{peer}"]):
                    self._finished.add(peer)
                elif self.store.check([f"failed/{peer}"]):
                    return {"kind": "failed", "rank": peer}
                elif now - changed > self.dead_after * (1 if count else 2):  # 0: not started yet, or died before
                    return {"kind": "dead", "rank": peer, "seconds": now - changed}
            self._store_failing_since = None
        except Exception as e:  # noqa: BLE001 - the store's own errors vary by version and backend
            if self._store_failing_since is None:
                self._store_failing_since = now
            elif now - self._store_failing_since > self.dead_after:
                return {"kind": "store", "rank": 0, "error": str(e)}
        return None

    def _act_on(self, verdict: dict) -> None:
        if verdict["kind"] == "stall":  # posted by rank 0: stalled there, so here too, only later
            kind, since = self._span
            return self._stalled(kind, time.monotonic() - since)
        if self.rank == 0 and self.store is not None:
            try:
                self.store.set("verdict", json.dumps(verdict))
            except Exception:  # noqa: BLE001 - the others find out by themselves then
                pass
        peer = verdict["rank"]
        if self.rank == 0 or peer == 0:  # one copy of the message: rank 0's, or the finder of rank 0's end
            if verdict["kind"] == "failed":
                say(f"rank {peer} stopped with an error (its output above says why); ending the job")
            elif verdict["kind"] == "dead":
                say(f"rank {peer} has not answered for {verdict['seconds']:.0f} s: its process died (killed, out of "
                    f"memory, a lost node) or froze. Ending the job now instead of waiting out the collective "
                    f"timeout (--dist-timeout); a new start resumes from the last checkpoint (--resume auto)")
            else:
                say(f"the rendezvous store no longer answers ({verdict['error']}): rank 0 or the launcher is gone; "
                    "ending the job. A new start resumes from the last checkpoint (--resume auto)")
        self._end(verdict["kind"], FAILED_EXIT if verdict["kind"] == "failed" else HANG_EXIT)

    def _stalled(self, kind: str, waited: float) -> None:
        mark, where = self._where
        doing = where if kind == "step" else kind
        report = {"rank": self.rank, "host": socket.gethostname(), "pid": os.getpid(), "step": self._step,
                  "mark": mark, "doing": doing, "waited": waited, "allowance": self.allowance(kind)}
        header = (f"rank {self.rank} ({report['host']}, pid {report['pid']}): no progress for {waited:.0f} s "
                  f"(allowance {report['allowance']:.0f} s) while {describe(report)}\n")
        write_stacks(self.hang_dir / f"rank{self.rank}.txt", header)
        if self.store is None:
            say(f"the job is stalled: {header.strip()}. Python stacks of every thread: "
                f"{self.hang_dir / f'rank{self.rank}.txt'}. Ending it (exit {HANG_EXIT}); a new start resumes from "
                "the last checkpoint (--resume auto)")
            return self._end("stall", HANG_EXIT)
        try:
            self.store.set(f"stalled/{self.rank}", json.dumps(report))
            if self.rank == 0:
                say(self._summary(self._gather()))
                self.store.set("verdict", json.dumps({"kind": "stall", "rank": 0}))
            else:  # stay until rank 0 has read this report: the launcher may end rank 0 once one rank exits
                deadline = time.monotonic() + self.gather
                while time.monotonic() < deadline and not self.store.check(["verdict"]):
                    time.sleep(0.2)
        except Exception as e:  # noqa: BLE001 - the stack file is written; the report is a bonus
            say(f"rank {self.rank}: stalled ({header.strip()}); could not reach the other ranks: {e}")
        self._end("stall", HANG_EXIT)

    def _gather(self) -> dict[int, dict | None]:
        """Every rank's stall report, waiting up to `gather` seconds for those not in yet."""
        reports: dict[int, dict | None] = {}
        deadline = time.monotonic() + self.gather
        while True:
            for r in range(self.world_size):
                if r not in reports and self.store.check([f"stalled/{r}"]):
                    reports[r] = json.loads(self.store.get(f"stalled/{r}"))
            if len(reports) == self.world_size or time.monotonic() > deadline:
                return {r: reports.get(r) for r in range(self.world_size)}
            time.sleep(0.2)

    def _summary(self, reports: dict[int, dict | None]) -> str:
        known = [r for r in reports.values() if r is not None]
        behind = min((r["step"], r["mark"]) for r in known)
        spread = len({(r["step"], r["mark"]) for r in known}) > 1
        lines = [f"the job is stalled: rank 0 finished no step for {reports[0]['waited']:.0f} s "
                 f"(allowance {reports[0]['allowance']:.0f} s, --hang-timeout). Where each rank is:"]
        for rank, r in sorted(reports.items(), key=lambda kv: (kv[1] is None, kv[1] and (kv[1]["step"], kv[1]["mark"]))):
            if r is None:
                lines.append(f"  rank {rank}: no report within {self.gather:.0f} s (dead, or stuck holding the GIL)")
                continue
            flag = "   <- behind" if spread and (r["step"], r["mark"]) == behind else ""
            lines.append(f"  rank {rank} ({r['host']}, pid {r['pid']}): {describe(r)}{flag}")
        if not spread:
            lines.append("  (every rank is at the same point: the stall is inside it; see the stacks)")
        lines.append(f"Python stacks of every thread: {self.hang_dir}/rank<N>.txt. Ending the job (exit {HANG_EXIT}); "
                     "a new start resumes from the last checkpoint (--resume auto)")
        return "\n".join(lines)

    def _end(self, kind: str, status: int) -> None:
        self.ended = kind
        marker = os.environ.get(REQUEUE_FILE_ENV)
        if marker and status == HANG_EXIT:
            from common.publish import write_text

            try:
                write_text(Path(marker), kind + "\n")
            except OSError as e:
                say(f"could not write {marker} ({e}); the batch script will not requeue the job")
        self.exit(status)


def describe(report: dict) -> str:
    return f"last finished step {report['step']}, now {report['doing']}"


def say(message: str) -> None:
    print(f"zerotrain watchdog: {message}", file=sys.stderr, flush=True)


def write_stacks(path: Path, header: str) -> None:
    """Every thread's Python stack, the main thread first, to `path` (written whole)."""
    from common.publish import write_text

    names = {t.ident: t.name for t in threading.enumerate()}
    main = threading.main_thread().ident
    parts = [header]
    for ident, frame in sorted(sys._current_frames().items(), key=lambda kv: kv[0] != main):
        parts.append(f"\nThread {names.get(ident, '?')} ({ident}), most recent call last:\n")
        parts.extend(traceback.format_stack(frame))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, "".join(parts))
