"""Write DEMO_DIR/REPORT.md after `scripts/demo.sh`: the machine, the time of every step, the
configs, final losses and throughput of the pretrain, SFT and DPO runs, the DPO run's reward
accuracy and margin, the curves, the sample generations, and every artifact with its size.

    python scripts/demo_report.py runs/demo [--total-seconds S] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
from importlib import metadata
from pathlib import Path

import yaml

from engine.checkpoint.run_dir import RunDir

RUNS = (("pretrain", "pretrain"), ("sft", "LoRA SFT"), ("dpo", "DPO"))
# The preference metrics the DPO run logs (TRL's names), as the report shows them.
REWARDS = (("rewards/accuracies", "reward accuracy"), ("rewards/margins", "reward margin"))


def human(n: float) -> str:
    """Bytes in B/KB/MB/GB (powers of 1000, as `ls -h --si`)."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def count(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K" if n >= 1e3 else f"{n:.0f}"


def seconds(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{int(s // 60)} min {s % 60:02.0f} s"


def read_metrics(run: Path) -> tuple[list[dict], list[dict]]:
    """(train records, validation records) of a run's metrics.jsonl."""
    from engine.apps.plot import read_metrics as metrics_records

    records = metrics_records(run)
    return [r for r in records if "loss" in r], [r for r in records if "val_loss" in r]


def checkpoint_tags(run: Path) -> list[Path]:
    from engine.checkpoint.run_dir import zerotrain_tags

    checkpoints = RunDir(run).checkpoints
    return [checkpoints / tag for tag in zerotrain_tags(checkpoints)]


def sidecar(run: Path):
    """The newest checkpoint's zerotrain.json (stage, world size, precision, LoRA), if any."""
    from engine.checkpoint.sidecar import Sidecar

    tags = checkpoint_tags(run)
    return Sidecar.read(tags[-1]) if tags else None


def safetensors_params(path: Path) -> int:
    """Elements in a .safetensors file, from its header alone."""
    from engine.offline.safetensors_io import safetensors_entries

    return sum(e.numel for e in safetensors_entries(path))


def read_generations(path: Path) -> list[tuple[str, str]]:
    """(prompt, completion) pairs from `zerotrain generate` output."""
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    pattern = re.compile(r"^### prompt (\d+)\n(.*?)\n### completion \1\n(.*?)(?=\n### prompt \d+\n|\Z)", re.S | re.M)
    return [(m.group(2), m.group(3).rstrip("\n")) for m in pattern.finditer(text)]


def describe_data(entry: str) -> str:
    """A --data entry; for a `zerotrain prepare` directory, also its source files and train split."""
    meta_path = Path(entry) / "meta.json"
    if not meta_path.is_file():
        return inline(entry)
    meta = json.loads(meta_path.read_text())
    sources = ", ".join(Path(s["path"]).name for s in meta.get("sources", []))
    train = meta.get("splits", {}).get("train", {})
    amount = ", ".join(f"{count(v)} {k}" for k, v in train.items())
    return f"{inline(entry)} (from {sources}; train split: {amount})"


def fence(text: str, lang: str = "") -> str:
    ticks = "```"
    while ticks in text:
        ticks += "`"
    return f"{ticks}{lang}\n{text.rstrip()}\n{ticks}"


def inline(text: str) -> str:
    return "`" + text.replace("`", "'") + "`"


# --------------------------------------------------------------------------- sections

def environment(total_seconds: float | None, quick: bool) -> list[str]:
    versions = []
    for package in ("torch", "deepspeed", "transformers", "peft"):
        try:
            versions.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            pass
    lines = [f"Made by `scripts/demo.sh{' --quick' if quick else ''}` on {time.strftime('%Y-%m-%d %H:%M')}"
             + (f" in **{seconds(total_seconds)}**" if total_seconds is not None else "") + ".",
             "",
             f"Machine: {os.cpu_count()} CPU cores, {platform.system()} {platform.machine()}, "
             f"Python {platform.python_version()}, {', '.join(versions)}."]
    return lines


def timings(run_dir: Path, total_seconds: float | None) -> list[str]:
    path = run_dir / "timings.tsv"
    if not path.is_file():
        return []
    rows = [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines()[1:] if "\t" in line]
    lines = ["## Steps", "", "| step | time |", "| --- | ---: |"]
    lines += [f"| {name} | {seconds(float(s))} |" for name, s in rows]
    if total_seconds is not None:
        lines.append(f"| **total** | **{seconds(total_seconds)}** |")
    return lines + [""]


def objective(cfg: dict, kind: str | None) -> str:
    """What a run minimised, in words (a run's config.yaml holds its own stage's section only)."""
    if kind != "dpo":
        return "next-token loss on the assistant tokens" if kind == "sft" else "next-token loss"
    pref = cfg["pref"]
    if pref["pref_loss"] not in ("dpo", "ipo"):
        return f"{pref['pref_loss'].upper()}, beta={pref['beta']:g}, no reference model"
    if pref["ref_from"]:
        reference = inline(pref["ref_from"])
    elif cfg["lora"]["lora_r"]:
        reference = "the init model (the policy with its adapter disabled)"
    else:
        reference = "a frozen copy of the init model"
    cached = ", its log-probs computed once before training" if pref["precompute_ref"] else ""
    return f"{pref['pref_loss'].upper()}, beta={pref['beta']:g}; reference: {reference}{cached}"


def first_last(records: list[dict], key: str, bold_last: bool = True) -> str:
    """A metric at its first and last logged step: `a (step i) -> **b** (step j)`."""
    records = [r for r in records if r.get(key) is not None]
    if not records:
        return "-"
    last = f"{records[-1][key]:.3f}"
    return (f"{records[0][key]:.3f} (step {records[0]['step']}) -> {f'**{last}**' if bold_last else last} "
            f"(step {records[-1]['step']})")


def run_summary(run_dir: Path) -> list[str]:
    """One column per run: what it trained, on what, how it went."""
    columns = {}
    for name, title in RUNS:
        run = run_dir / name
        layout = RunDir(run)
        if not layout.config.is_file():
            continue
        cfg = yaml.safe_load(layout.config.read_text())
        side = sidecar(run)
        train, val = read_metrics(run) if layout.metrics.is_file() else ([], [])
        world = side.world_size if side else 1
        t = cfg["train"]
        lora = cfg["lora"]
        if lora["lora_r"]:
            what = (f"LoRA r={lora['lora_r']}, alpha={lora['lora_alpha']:g} on every linear projection; "
                    f"in full: {', '.join(lora['lora_modules_to_save']) or 'nothing'}")
        else:
            what = "every weight"
        init = inline(cfg["model"]["init_from"]) if cfg["model"]["init_from"] else f"random ({cfg['model']['preset']} preset)"
        speeds = [r["tokens_per_sec"] for r in train if r.get("tokens_per_sec")]
        rows = {
            "initialised from": init,
            "trained": what,
            "objective": objective(cfg, side.kind if side else None),
            "data": "<br>".join(describe_data(d) for d in cfg["data"]["data"]),
            "ZeRO stage / ranks / precision": f"{side.zero_stage if side else '?'} / {world} / {side.precision if side else '?'}",
            "steps x (micro batch x accum x ranks) x seq len":
                f"{t['max_steps']} x ({t['micro_batch_size']} x {t['grad_accum']} x {world}) x {cfg['data']['seq_len']}",
            "lr (peak, warmup, cosine floor)":
                f"{cfg['optim']['lr']:g}, {cfg['optim']['warmup_steps']} steps, x{cfg['optim']['min_lr_ratio']:g}",
            "tokens seen": count(train[-1]["tokens_seen"]) if train else "-",
            "train loss (first log -> last)": first_last(train, "loss"),
            "val loss (ppl) at the end":
                f"**{val[-1]['val_loss']:.3f}**" + (f" ({val[-1]['val_ppl']:.1f})" if "val_ppl" in val[-1] else "")
                + f" at step {val[-1]['step']}" if val else "-",
            "throughput (median over log windows, all ranks)": f"{statistics.median(speeds):,.0f} tokens/s" if speeds else "-",
        }
        for key, name in REWARDS:
            rows[f"{name} (first log -> last; val)"] = (
                f"{first_last(train, key)}; val {first_last(val, 'val_' + key, bold_last=False)}"
                if any(key in r for r in train) else "-")
        columns[title] = rows
    if not columns:
        return []
    titles = list(columns)
    keys = list(next(iter(columns.values())))
    lines = ["## Runs", "", "| | " + " | ".join(titles) + " |", "| --- |" + " --- |" * len(titles)]
    lines += [f"| {key} | " + " | ".join(columns[t][key] for t in titles) + " |" for key in keys]
    return lines + [""]


def preference(run_dir: Path) -> list[str]:
    """The DPO run's reward accuracy and margin along the run: step 1, where the policy is its
    reference, then one row per evaluation, training values averaged over the steps since the row before."""
    run = run_dir / "dpo"
    if not RunDir(run).metrics.is_file():
        return []
    train, val = read_metrics(run)
    if not any("rewards/accuracies" in r for r in train):
        return []
    ends = sorted({train[0]["step"], *(r["step"] for r in val), train[-1]["step"]})
    val_at = {r["step"]: r for r in val}
    lines = ["## Preference tuning (DPO)", "",
             "The SFT model tuned on preference pairs (chosen: the real answer to the prompt, rejected: "
             "the answer to another prompt). A pair's reward is beta times the log-probability ratio of "
             "the policy to the reference model (the SFT model); the *reward accuracy* is the fraction of "
             "pairs whose chosen reward is the higher (0 at step 1, where the policy is its reference, so "
             "both rewards are 0; 0.5 is a coin toss), the *margin* the mean of chosen minus rejected "
             "reward. Training columns: the mean over the logged steps of the row; validation: the held-out "
             "pairs at the row's last step.", "",
             "| steps | loss | reward accuracy | reward margin | val loss | val reward accuracy | val reward margin |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]

    def mean(records: list[dict], key: str) -> str:
        values = [r[key] for r in records if r.get(key) is not None]
        return f"{statistics.fmean(values):.3f}" if values else ""

    previous = None
    for end in ends:
        window = [r for r in train if (previous is None or r["step"] > previous) and r["step"] <= end]
        previous = end
        if not window and end not in val_at:
            continue
        first = window[0]["step"] if window else end
        v = [val_at[end]] if end in val_at else []
        lines.append(f"| {first if first == end else f'{first}-{end}'} | {mean(window, 'loss')} | "
                     f"{mean(window, 'rewards/accuracies')} | {mean(window, 'rewards/margins')} | "
                     f"{mean(v, 'val_loss')} | {mean(v, 'val_rewards/accuracies')} | {mean(v, 'val_rewards/margins')} |")
    if (run_dir / "plots" / "dpo.png").is_file():
        lines += ["", "![dpo](plots/dpo.png)"]
    return lines + [""]


def curves(run_dir: Path) -> list[str]:
    plots = sorted((run_dir / "plots").glob("*.png")) if (run_dir / "plots").is_dir() else []
    if not plots:
        return []
    lines = ["## Curves", "", "Loss, validation loss, learning rate and tokens/s against the step, and for a "
             "preference run its reward accuracy and margin (training, and validation dashed) "
             "(`zerotrain plot RUN_DIR... --out FILE.png`).", ""]
    for plot in plots:
        lines += [f"### {plot.stem}", "", f"![{plot.stem}](plots/{plot.name})", ""]
    return lines


def generations(run_dir: Path) -> list[str]:
    models = [(label, read_generations(run_dir / "samples" / f"{name}.txt"))
              for name, label in (("base", "base"), ("sft", "SFT"), ("dpo", "DPO"))]
    if not any(outputs for _, outputs in models):
        return []
    lines = ["## Sample generations", "",
             "Greedy decoding, the same prompts to every model: the base model continues the raw text "
             "(`--no-chat`); the SFT model (base + the extracted adapter) and the DPO model (the SFT model "
             "after preference tuning) get each prompt as a user message through the chat template, so "
             "SFT and DPO show each prompt's answer before and after DPO.", ""]
    prompts = list(dict.fromkeys(p for _, outputs in models for p, _ in outputs))
    for prompt in prompts:
        lines += [f"### {inline(prompt)}", ""]
        for label, outputs in ((label, dict(outputs)) for label, outputs in models):
            if prompt in outputs:
                completion = outputs[prompt] or "(nothing: the first token generated was end-of-text)"
                lines += [f"{label}:", "", fence(completion, "text"), ""]
    return lines


def artifacts(run_dir: Path) -> list[str]:
    """The notable outputs, then every file."""
    listed: list[tuple[str, Path]] = [("tokenizer (HF format)", run_dir / "tokenizer"),
                                      ("pretraining tokens (memmap)", run_dir / "data" / "pretrain"),
                                      ("SFT conversations and label masks", run_dir / "data" / "sft"),
                                      ("preference pairs (chosen and rejected tokens, label masks)",
                                       run_dir / "data" / "pref")]
    for name, title in RUNS:
        run = RunDir(run_dir / name)
        listed += [(f"{title}: resolved config", run.config), (f"{title}: metrics", run.metrics)]
        listed += [(f"{title}: DeepSpeed checkpoint (ZeRO shards)", tag) for tag in checkpoint_tags(run.root)]
        if (run.final / "model.safetensors").is_file():
            listed.append((f"{title}: final model (HF format)", run.final))
        if run.final_adapter.is_dir():
            listed.append((f"{title}: final adapter (PEFT, gathered from the live engine)", run.final_adapter))
    for path in sorted((run_dir / "consolidated").glob("*")) if (run_dir / "consolidated").is_dir() else []:
        what = {".safetensors": "safetensors", ".pth": "torch state dict"}.get(path.suffix, "HF directory")
        extra = f", {count(safetensors_params(path))} parameters" if path.suffix == ".safetensors" else ""
        listed.append((f"consolidated pretrain weights ({what}{extra})", path))
    if (run_dir / "adapter" / "adapter_model.safetensors").is_file():
        n = safetensors_params(run_dir / "adapter" / "adapter_model.safetensors")
        listed.append((f"adapter extracted from the SFT shards (PEFT, {count(n)} parameters)", run_dir / "adapter"))
    listed += [(f"generations: {p.stem}", p) for p in sorted((run_dir / "samples").glob("*.txt"))]
    listed += [(f"curves: {p.stem}", p) for p in sorted((run_dir / "plots").glob("*.png"))]
    listed += [("the commands run", run_dir / "commands.sh"), ("step times", run_dir / "timings.tsv")]

    lines = ["## Artifacts", "", "| artifact | path | size |", "| --- | --- | ---: |"]
    lines += [f"| {what} | `{path}` | {human(size(path))} |" for what, path in listed if path.exists()]
    files = sorted(p for p in run_dir.rglob("*") if p.is_file() and not p.name.startswith("."))
    lines += ["", "<details><summary>every file</summary>", "", "| path | size |", "| --- | ---: |"]
    lines += [f"| `{p}` | {human(p.stat().st_size)} |" for p in files if p.name != "REPORT.md"]
    return lines + ["", "</details>", ""]


def configs(run_dir: Path) -> list[str]:
    lines = []
    commands = run_dir / "commands.sh"
    if commands.is_file():
        lines += ["## Commands", "", fence(commands.read_text(encoding="utf-8"), "bash"), ""]
    lines += ["## Configs", "", "Each run's resolved `config.yaml` (the recipe plus the flags above)."]
    for name, title in RUNS:
        path = run_dir / name / "config.yaml"
        if path.is_file():
            lines += ["", f"### {title} (`{path}`)", "", fence(path.read_text(encoding="utf-8"), "yaml")]
    return lines + [""]


def write_report(run_dir: Path, total_seconds: float | None = None, quick: bool = False) -> Path:
    lines = ["# zerotrain demo report", ""]
    lines += environment(total_seconds, quick) + [""]
    for section in (timings(run_dir, total_seconds), run_summary(run_dir), preference(run_dir), curves(run_dir),
                    generations(run_dir), artifacts(run_dir), configs(run_dir)):
        lines += section
    out = run_dir / "REPORT.md"
    from common.publish import write_text

    write_text(out, "\n".join(lines).rstrip() + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", metavar="DEMO_DIR")
    parser.add_argument("--total-seconds", type=float, help="wall time of the whole demo, for the report")
    parser.add_argument("--quick", action="store_true", help="the demo ran with --quick")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    if not (run_dir / "pretrain" / "metrics.jsonl").is_file():
        print(f"demo_report.py: {run_dir} holds no demo run (no pretrain/metrics.jsonl); run scripts/demo.sh",
              file=sys.stderr)
        return 2
    out = write_report(run_dir, args.total_seconds, args.quick)
    print(f"report written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
