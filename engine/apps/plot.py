"""Training curves of one or several runs in one PNG: loss, validation loss, learning rate and
tokens/s against the step, one line per run (`zerotrain plot RUN_DIR... [--out FILE.png]`).
When a run logged preference metrics (launcher/dpo.py), a third column shows its reward accuracy
and reward margin, training and validation (dashed, with markers) in the same panel and colour.

Reads each run's metrics.jsonl as the trainer writes it: step records (loss, lr, tokens_per_sec,
...) and validation records (val_loss). A step logged twice (a run resumed from an earlier
checkpoint logs those steps again) keeps its latest record.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import ZerotrainError
from common.publish import publishing
from engine.checkpoint.run_dir import RunDir

# (metrics.jsonl key, panel title, y-axis label)
PANELS = (("loss", "training loss", "loss"),
          ("val_loss", "validation loss", "loss"),
          ("lr", "learning rate", "lr"),
          ("tokens_per_sec", "throughput", "tokens/s"))
# More columns, each drawn only when some run has its metrics: (training key, panel title, y-axis
# label, a gray reference line or None: chance accuracy, zero margin). The val_ series of the key
# shares the panel.
PREF_PANELS = (("rewards/accuracies", "reward accuracy", "chosen reward > rejected", 0.5),
               ("rewards/margins", "reward margin", "chosen - rejected reward", 0.0))
REWARD_MODEL_PANELS = (("accuracy", "reward model accuracy", "r(chosen) > r(rejected)", 0.5),
                       ("margin", "reward model margin", "r(chosen) - r(rejected)", 0.0))
RL_PANELS = (("reward", "mean reward (RL)", "reward", None),
             ("completions/mean_length", "completion length (RL)", "tokens", None))
COLUMNS = (PREF_PANELS, REWARD_MODEL_PANELS, RL_PANELS)
VAL = "val_"


@dataclass
class RunCurves:
    """One run's series: key -> (steps, values), steps ascending."""

    label: str
    series: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return max((s[-1] for s, _ in self.series.values() if s), default=0)


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of RUN_DIR/metrics.jsonl. A last line cut short (the run is writing it) is left out."""
    run_dir = Path(run_dir)
    path = RunDir(run_dir).metrics
    if not run_dir.is_dir():
        raise ZerotrainError(f"run directory {run_dir} does not exist")
    if not path.is_file():
        raise ZerotrainError(f"{run_dir} has no metrics.jsonl: pass a run directory (the --output-dir of a "
                             "training run that has logged at least one step)")
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines):  # no newline after it yet: being written
                continue
            raise ZerotrainError(f"{path}:{number}: invalid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ZerotrainError(f"{path}:{number}: not a metrics record (a JSON object with an integer 'step')")
        records.append(record)
    return records


def run_curves(records: list[dict], label: str) -> RunCurves:
    """Series per panel key; a step's latest value wins, missing/null/non-finite values are gaps."""
    curves = RunCurves(label)
    keys = [key for key, _, _ in PANELS] + [k for column in COLUMNS for key, *_ in column for k in (key, VAL + key)]
    for key in keys:
        by_step: dict[int, float] = {}
        for record in records:
            if key in record:
                value = record[key]
                by_step[record["step"]] = float(value) if isinstance(value, (int, float)) else math.nan
        steps = sorted(by_step)
        values = [by_step[s] if math.isfinite(by_step[s]) else math.nan for s in steps]
        if any(math.isfinite(v) for v in values):
            curves.series[key] = (steps, values)
    return curves


def run_labels(run_dirs: list[Path]) -> list[str]:
    """Each run's directory name; with parent folders added where two names would be the same."""
    parts = [Path(os.path.abspath(d)).parts for d in run_dirs]
    depth = 1
    while True:
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels) or depth >= max(len(p) for p in parts):
            return labels
        depth += 1


def plot_runs(run_dirs: list[str | Path], out: str | Path, title: str | None = None) -> list[RunCurves]:
    """Draw the panels for `run_dirs` into the PNG `out` (written to a temporary name, then
    renamed); return the curves drawn. Four panels (2 x 2, 1200 x 800 pixels), and a column of
    two more (600 pixels wider) for each of preference, reward-model and RL metrics some run has."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not run_dirs:
        raise ZerotrainError("no run directories given")
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise ZerotrainError(f"--out {out}: the plot is a PNG image, give a name ending in .png")
    dirs = [Path(d) for d in run_dirs]
    runs = [run_curves(read_metrics(d), label) for d, label in zip(dirs, run_labels(dirs))]
    extra = [column for column in COLUMNS
             if any(k in run.series for run in runs for key, *_ in column for k in (key, VAL + key))]

    columns = 2 + len(extra)
    fig = Figure(figsize=(6 * columns, 8), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)  # the Agg canvas: no display needed, whatever matplotlib's default backend
    grid = fig.subplots(2, columns, sharex=True)
    for ax, (key, panel_title, ylabel) in zip(list(grid[:, :2].flat), PANELS):
        drawn = 0
        for index, run in enumerate(runs):
            if key not in run.series:
                continue
            steps, values = run.series[key]
            # Markers where points are sparse: validation every eval_interval steps, or a lone point.
            ax.plot(steps, values, label=run.label, color=f"C{index % 10}",
                    marker="o" if key == "val_loss" or len(steps) < 2 else None, markersize=3, linewidth=1.5)
            drawn += 1
        _finish_panel(ax, panel_title, ylabel, drawn)
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    for at, column in enumerate(extra, 2):
        for ax, (key, panel_title, ylabel, reference) in zip(grid[:, at], column):
            if reference is not None:
                ax.axhline(reference, color="gray", linestyle=":", linewidth=1, label="_reference")
            drawn = 0
            for index, run in enumerate(runs):
                for series_key, val in ((key, False), (VAL + key, True)):
                    if series_key not in run.series:
                        continue
                    steps, values = run.series[series_key]
                    ax.plot(steps, values, label=run.label + (" (val)" if val else ""), color=f"C{index % 10}",
                            linestyle="--" if val else "-", marker="o" if val or len(steps) < 2 else None,
                            markersize=3, linewidth=1.5)
                    drawn += 1
            if key in ("rewards/accuracies", "accuracy"):
                ax.set_ylim(-0.05, 1.05)
            _finish_panel(ax, panel_title, ylabel, drawn)
    for ax in grid[-1]:
        ax.set_xlabel("step")
    fig.suptitle(title or ("training curves: " + ", ".join(r.label for r in runs)))

    with publishing(out) as tmp:
        fig.savefig(tmp, format="png")
    return runs


def _finish_panel(ax, title: str, ylabel: str, drawn: int) -> None:
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if drawn:
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="gray")
