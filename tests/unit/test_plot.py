"""`zerotrain plot`: hand-written metrics.jsonl files -> one PNG with four panels, one line per run;
six when a run logged preference metrics (reward accuracy and margin, training and validation)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from common.errors import ZerotrainError
from engine.apps.cli import main
from engine.apps.plot import plot_runs, read_metrics, run_curves, run_labels

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(run_dir: Path, records: list[dict], tail: str = "") -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return run_dir


def step(s: int, loss: float | None, lr: float = 1e-3, tok_s: float = 1000.0) -> dict:
    return {"step": s, "loss": loss, "lr": lr, "grad_norm": 1.0, "tokens_per_sec": tok_s, "tokens_seen": 512 * s}


@pytest.fixture
def two_runs(tmp_path) -> list[Path]:
    a = write_run(tmp_path / "a" / "pretrain", [step(10, 5.0), step(20, 4.0), {"step": 20, "val_loss": 4.2, "val_ppl": 66.7},
                                                 step(30, 3.5), {"step": 30, "val_loss": 3.9, "val_ppl": 49.4}])
    b = write_run(tmp_path / "b" / "pretrain", [step(5, 6.0, lr=5e-4, tok_s=800.0), step(10, 5.5, lr=4e-4, tok_s=900.0)])
    return [a, b]


def pref_step(s: int, accuracy: float, margin: float) -> dict:
    return {**step(s, 0.69), "rewards/chosen": margin / 2, "rewards/rejected": -margin / 2,
            "rewards/accuracies": accuracy, "rewards/margins": margin, "logps/chosen": -50.0, "logps/rejected": -60.0}


def pref_val(s: int, accuracy: float, margin: float) -> dict:
    return {"step": s, "val_loss": 0.6, "val_rewards/accuracies": accuracy, "val_rewards/margins": margin}


def drawn_figures(monkeypatch) -> list:
    """The figures plot_runs saves, kept for inspection."""
    from matplotlib.figure import Figure

    figures = []
    savefig = Figure.savefig

    def keep(self, *args, **kwargs):
        figures.append(self)
        return savefig(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    return figures


def image_size(path: Path) -> tuple[int, int]:
    from matplotlib.image import imread

    height, width = imread(path).shape[:2]
    return width, height


def test_two_runs_make_one_valid_png(two_runs, tmp_path):
    out = tmp_path / "plots" / "compare.png"
    runs = plot_runs(two_runs, out)
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert image_size(out) == (1200, 800)
    assert [r.label for r in runs] == ["a/pretrain", "b/pretrain"]  # same names: parents tell them apart
    assert runs[0].series["val_loss"] == ([20, 30], [4.2, 3.9])
    assert "val_loss" not in runs[1].series
    assert [p.name for p in out.parent.iterdir()] == ["compare.png"]  # no temporary file left


def test_panels_draw_one_line_per_run_labelled_by_dir_name(two_runs, tmp_path, monkeypatch):
    figures = drawn_figures(monkeypatch)
    plot_runs(two_runs, tmp_path / "x.png")
    axes = figures[0].axes
    assert [ax.get_title() for ax in axes] == ["training loss", "validation loss", "learning rate", "throughput"]
    assert [line.get_label() for line in axes[0].get_lines()] == ["a/pretrain", "b/pretrain"]
    assert [line.get_label() for line in axes[1].get_lines()] == ["a/pretrain"]
    assert list(axes[3].get_lines()[1].get_ydata()) == [800.0, 900.0]
    assert axes[2].get_xlabel() == axes[3].get_xlabel() == "step"


def test_preference_runs_add_reward_accuracy_and_margin_panels(two_runs, tmp_path, monkeypatch):
    """A DPO run's rewards/accuracies and rewards/margins get a third column, its val_ series in the
    same panel and colour (dashed, with markers); a run without them draws nothing there."""
    dpo = write_run(tmp_path / "dpo", [pref_step(1, 0.0, 0.0), pref_step(2, 0.5, 0.1), pref_val(2, 0.5, 0.05),
                                       pref_step(3, 0.75, 0.4), pref_val(3, 0.8, 0.3)])
    figures = drawn_figures(monkeypatch)
    out = tmp_path / "dpo.png"
    runs = plot_runs([two_runs[0], dpo], out)
    assert image_size(out) == (1800, 800)
    assert runs[1].series["rewards/accuracies"] == ([1, 2, 3], [0.0, 0.5, 0.75])
    assert runs[1].series["val_rewards/margins"] == ([2, 3], [0.05, 0.3])
    assert "rewards/accuracies" not in runs[0].series

    axes = figures[0].axes
    assert [ax.get_title() for ax in axes] == ["training loss", "validation loss", "reward accuracy",
                                               "learning rate", "throughput", "reward margin"]
    accuracy, margin = axes[2], axes[5]
    lines = {line.get_label(): line for line in accuracy.get_lines()}
    assert list(lines) == ["_reference", "dpo", "dpo (val)"]  # the pretrain run has no rewards
    assert list(lines["_reference"].get_ydata()) == [0.5, 0.5]  # chance
    assert list(lines["dpo (val)"].get_ydata()) == [0.5, 0.8]
    assert lines["dpo"].get_color() == lines["dpo (val)"].get_color() and lines["dpo (val)"].get_linestyle() == "--"
    assert accuracy.get_ylim() == (-0.05, 1.05)
    assert list(margin.get_lines()[1].get_ydata()) == [0.0, 0.1, 0.4]
    assert [ax.get_xlabel() for ax in axes] == [""] * 3 + ["step"] * 3


def test_repeated_steps_keep_the_latest_record_and_null_losses_are_gaps(tmp_path):
    # a resumed run logs steps 20 and 30 again; step 40 had a non-finite loss (logged as null)
    run = write_run(tmp_path / "run", [step(10, 5.0), step(20, 4.0), step(30, 3.0), step(20, 4.1), step(30, 3.4),
                                       step(40, None)])
    curves = run_curves(read_metrics(run), "run")
    steps, losses = curves.series["loss"]
    assert steps == [10, 20, 30, 40]
    assert losses[:3] == [5.0, 4.1, 3.4] and math.isnan(losses[3])
    assert curves.steps == 40


def test_a_last_line_being_written_is_left_out(tmp_path):
    run = write_run(tmp_path / "run", [step(10, 5.0)], tail='{"step": 20, "lo')
    assert [r["step"] for r in read_metrics(run)] == [10]


def test_a_bad_line_in_the_middle_names_file_and_line(tmp_path):
    run = write_run(tmp_path / "run", [step(10, 5.0)], tail="not json\n" + json.dumps(step(20, 4.0)) + "\n")
    with pytest.raises(ZerotrainError, match=r"metrics\.jsonl:2: invalid JSON"):
        read_metrics(run)
    (run / "metrics.jsonl").write_text('{"loss": 1.0}\n')
    with pytest.raises(ZerotrainError, match=r"metrics\.jsonl:1: not a metrics record"):
        read_metrics(run)


def test_a_dir_without_metrics_is_a_clear_error(tmp_path, two_runs, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["plot", str(two_runs[0]), str(empty), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert f"{empty} has no metrics.jsonl" in err and "run directory" in err
    assert not (tmp_path / "x.png").exists()
    assert main(["plot", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_default_out_and_png_only(two_runs, tmp_path, capsys, monkeypatch):
    assert main(["plot", str(two_runs[0])]) == 0
    assert (two_runs[0] / "curves.png").read_bytes()[:8] == PNG_MAGIC
    assert "wrote" in capsys.readouterr().out
    monkeypatch.chdir(tmp_path)
    assert main(["plot", *map(str, two_runs)]) == 0
    assert (tmp_path / "curves.png").read_bytes()[:8] == PNG_MAGIC
    assert main(["plot", str(two_runs[0]), "--out", str(tmp_path / "x.jpg")]) == 2
    assert "ending in .png" in capsys.readouterr().err


def test_a_failed_write_keeps_the_old_image_and_leaves_no_temporary(two_runs, tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    out = tmp_path / "curves.png"
    out.write_bytes(b"old")

    def broken(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(OSError, match="disk full"):
        plot_runs(two_runs, out)
    assert out.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_labels_are_dir_names_unless_they_clash():
    assert run_labels([Path("runs/pretrain"), Path("runs/sft")]) == ["pretrain", "sft"]
    assert run_labels([Path("x/a/run"), Path("y/a/run")]) == ["x/a/run", "y/a/run"]


def test_rl_runs_add_reward_and_completion_length_panels(two_runs, tmp_path, monkeypatch):
    """A GRPO run's reward and completions/mean_length get a column of their own, beside a DPO
    run's preference column when both are plotted."""
    grpo = write_run(tmp_path / "grpo", [{"step": s, "loss": 0.0, "reward": r, "completions/mean_length": n}
                                         for s, r, n in ((1, 0.2, 14.0), (2, 0.3, 13.5), (3, 0.45, 12.0))])
    dpo = write_run(tmp_path / "dpo", [pref_step(1, 0.0, 0.0), pref_step(2, 0.5, 0.1)])
    figures = drawn_figures(monkeypatch)
    out = tmp_path / "rl.png"
    runs = plot_runs([dpo, grpo], out)
    assert image_size(out) == (2400, 800)
    assert runs[1].series["reward"] == ([1, 2, 3], [0.2, 0.3, 0.45])
    axes = figures[0].axes
    assert [ax.get_title() for ax in axes] == ["training loss", "validation loss", "reward accuracy",
                                               "mean reward (RL)", "learning rate", "throughput", "reward margin",
                                               "completion length (RL)"]
    reward, length = axes[3], axes[7]
    assert [line.get_label() for line in reward.get_lines()] == ["grpo"]  # no reference line, the dpo run has none
    assert list(length.get_lines()[0].get_ydata()) == [14.0, 13.5, 12.0]
