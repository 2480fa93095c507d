"""Peak resident memory of a benchmark process, recorded by the process itself.

    from peak_rss import peak_rss_bytes, write_peak_rss_at_exit

`peak_rss_bytes()` is this process's high-water mark of resident memory: `VmHWM` of
/proc/self/status on Linux, which belongs to the process's own address space (a launcher's
memory at fork does not count, unlike `ru_maxrss`, which keeps the parent's RSS at spawn time
across exec), else `ru_maxrss`. Each rank of a multi-rank run records its own; a run's figure
is their sum. `write_peak_rss_at_exit(path)` writes it as JSON when the interpreter exits, so it
covers everything the process did (start-up, training, saving).
"""

from __future__ import annotations

import atexit
import json
import resource
import sys
from pathlib import Path


def peak_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def write_peak_rss_at_exit(path: str | Path) -> None:
    path = Path(path)

    def write() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"peak_rss": peak_rss_bytes()}))

    atexit.register(write)


def summed_peak_rss(directory: str | Path, pattern: str = "rss-rank*.json") -> tuple[int, int]:
    """(sum of the recorded peaks, how many processes recorded one) under `directory`."""
    peaks = [json.loads(p.read_text())["peak_rss"] for p in sorted(Path(directory).glob(pattern))]
    return sum(peaks), len(peaks)
