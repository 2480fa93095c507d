"""The run directory: the one place that knows its layout, and what a path a user passes stands for.

    RUN/config.yaml          the resolved config, written at start
    RUN/tokenizer/           the tokenizer the run uses (HF format)
    RUN/metrics.jsonl        one JSON object per logged step
    RUN/rollouts.jsonl       RL runs: every completion of each logged step (engine.objectives.grpo)
    RUN/checkpoints/         DeepSpeed's save_checkpoint dir: latest, global_stepN/ (+ _universal)
        global_stepN/zerotrain.json   the sidecar, written last (engine.checkpoint.sidecar)
        global_stepN/objective_state_{rank}.pt   what an objective carries to later steps, if anything
    RUN/final/               the trained model in HF format, with the tokenizer
    RUN/final/adapter/       LoRA runs: the PEFT adapter
    RUN/hang/rankN.txt       a stalled job's Python stacks, one file per rank (engine.training.watchdog)

Every command that takes a model, an adapter or a checkpoint accepts a run directory for it, and
`resolve` turns what the user passed into what the command reads (`resolve_tag`: a CKPT_DIR and
its --tag into one tag folder; `adapter_only`: a LoRA run, whose model is its base plus its adapter).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from common.errors import ZerotrainError
from model.state_dict import STATE_DICT_SUFFIXES

CONFIG = "config.yaml"
TOKENIZER = "tokenizer"
METRICS = "metrics.jsonl"
ROLLOUTS = "rollouts.jsonl"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
FINAL = "final"
ADAPTER = "adapter"
HANG = "hang"
SIDECAR = "zerotrain.json"
OBJECTIVE_STATE = "objective_state_{rank}.pt"
UNIVERSAL_SUFFIX = "_universal"

TAG_RE = re.compile(r"^global_step(\d+)$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
MODEL_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                      "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class RunDir:
    """Paths inside one run directory."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def config(self) -> Path:
        return self.root / CONFIG

    @property
    def tokenizer(self) -> Path:
        return self.root / TOKENIZER

    @property
    def metrics(self) -> Path:
        return self.root / METRICS

    @property
    def rollouts(self) -> Path:
        return self.root / ROLLOUTS

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    @property
    def final(self) -> Path:
        return self.root / FINAL

    @property
    def final_adapter(self) -> Path:
        return self.root / FINAL / ADAPTER

    @property
    def hang(self) -> Path:
        return self.root / HANG

    def tag(self, step: int) -> Path:
        return self.checkpoints / tag_name(step)


# --------------------------------------------------------------------------- checkpoint tags

def tag_name(step: int) -> str:
    return f"global_step{step}"


def tag_order(tag: str) -> tuple:
    """Sort key of tags: by the step number they end with (global_step2 before global_step10),
    tags without one last, by name."""
    m = re.search(r"(\d+)$", tag)
    return (0, int(m.group(1)), tag) if m else (1, 0, tag)


def universal_dir(tag_dir: Path) -> Path:
    """Where zerotrain puts DeepSpeed's universal conversion of a tag (beside it)."""
    return tag_dir.with_name(tag_dir.name + UNIVERSAL_SUFFIX)


def is_universal_dir(path: Path) -> bool:
    """A universal checkpoint (ds_to_universal's output, whatever its name): model states beside a
    zero/ folder of per-parameter files. It is not a tag folder of its own."""
    return (path / "zero").is_dir()


def zerotrain_tags(ckpt_dir: Path) -> list[str]:
    """global_stepN folders, oldest first (unfinished saves included)."""
    if not ckpt_dir.is_dir():
        return []
    tags = [p.name for p in ckpt_dir.iterdir() if p.is_dir() and TAG_RE.match(p.name)]
    return sorted(tags, key=tag_order)


def is_tag_dir(path: Path) -> bool:
    """A DeepSpeed checkpoint tag folder (what save_checkpoint writes for one tag)."""
    return path.is_dir() and any(path.glob("*model_states.pt"))


def is_checkpoint_dir(path: Path) -> bool:
    """A DeepSpeed checkpoint directory (the one given to save_checkpoint): `latest` or tag folders."""
    return path.is_dir() and ((path / LATEST).is_file() or any(is_tag_dir(p) for p in path.iterdir()))


def list_tags(ckpt_dir: str | Path) -> list[str]:
    """The tag folders of any DeepSpeed checkpoint directory (those holding *_model_states.pt, not
    universal conversions), by step number."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    tags = [p.name for p in root.iterdir() if is_tag_dir(p) and not is_universal_dir(p)]
    return sorted(tags, key=tag_order)


# --------------------------------------------------------------------------- what a path stands for

Kind = Literal["hf", "weights", "state_dict", "deepspeed", "adapter"]
DESCRIPTIONS: dict[str, str] = {
    "hf": "a model directory (HF format, with config.json)",
    "weights": "a directory of model weights (model.safetensors or pytorch_model.bin)",
    "state_dict": "a .pth/.pt/.safetensors state dict",
    "deepspeed": "a DeepSpeed checkpoint directory (latest, global_stepN/) or one of its tag folders",
    "adapter": "a PEFT adapter directory (adapter_config.json)",
}


@dataclass(frozen=True)
class Resolved:
    """What a user-given path stands for: `path` is what to read (for `deepspeed`, the checkpoint
    directory, with `tag` set when a tag folder was named); `tokenizer` lies beside it, if any."""

    kind: Kind
    path: Path
    tokenizer: Path | None = None
    tag: str | None = None


def has_tokenizer(directory: Path) -> bool:
    return directory.is_dir() and any((directory / name).is_file() for name in TOKENIZER_FILES)


def _tokenizer_near(*candidates: Path) -> Path | None:
    return next((c for c in candidates if has_tokenizer(c)), None)


def _classify(path: Path) -> Resolved | None:
    """What `path` itself is, without looking into it as a run directory."""
    if path.is_file():
        if path.suffix in STATE_DICT_SUFFIXES:
            return Resolved("state_dict", path, _tokenizer_near(path.parent))
        return None
    if (path / "adapter_config.json").is_file():
        return Resolved("adapter", path, _tokenizer_near(path))
    has_weights = any((path / name).is_file() for name in MODEL_WEIGHT_FILES)
    if (path / "config.json").is_file() and has_weights:
        return Resolved("hf", path, _tokenizer_near(path))
    if has_weights:
        return Resolved("weights", path, _tokenizer_near(path))
    if is_tag_dir(path) and not is_universal_dir(path):
        ckpt_dir = path.parent
        return Resolved("deepspeed", ckpt_dir, _tokenizer_near(ckpt_dir, ckpt_dir.parent / TOKENIZER), path.name)
    if is_checkpoint_dir(path):  # also HF Trainer's checkpoint-N/: config.json beside the shards
        return Resolved("deepspeed", path, _tokenizer_near(path, path.parent / TOKENIZER))
    if (path / "config.json").is_file():  # a config without weights: from_pretrained will say so
        return Resolved("hf", path, _tokenizer_near(path))
    return None


def resolve(path: str | Path, accept: tuple[Kind, ...], what: str) -> Resolved:
    """What `path` stands for, among the kinds `accept`ed (in order of preference for a run
    directory); `what` names the argument in errors ("--init-from", "BASE", ...).

    A run directory stands for its final/ model (hf, weights), its final/adapter/ (adapter) or its
    checkpoints/ (deepspeed), whichever is accepted and present first. A final/ directory stands
    for its adapter/ when only adapters are accepted.
    """
    path = Path(path)
    if not path.exists():
        raise ZerotrainError(f"{what} {path} does not exist")
    found = _classify(path)
    if found is not None and found.kind in accept:
        return found
    if path.is_dir():
        run = RunDir(path)
        inside = {"hf": [run.final], "weights": [run.final], "adapter": [run.final_adapter, path / ADAPTER],
                  "deepspeed": [run.checkpoints], "state_dict": []}
        for kind in accept:
            for candidate in inside[kind]:
                sub = _classify(candidate) if candidate.exists() else None
                if sub is not None and sub.kind == kind:
                    if sub.tokenizer is None and has_tokenizer(run.tokenizer):
                        sub = Resolved(sub.kind, sub.path, run.tokenizer, sub.tag)
                    return sub
    wanted = ", ".join(DESCRIPTIONS[k] for k in accept)
    run = RunDir(path)
    if path.is_dir() and (run.config.is_file() or run.checkpoints.is_dir()) and not run.final.is_dir():
        raise ZerotrainError(f"{what}: run directory {path} has no {FINAL}/ model yet; finish the run, or turn a "
                             f"checkpoint into a model with `zerotrain consolidate {run.checkpoints} OUT_DIR`")
    it_is = f" (it is {DESCRIPTIONS[found.kind]})" if found is not None else ""
    raise ZerotrainError(f"{what} {path} is not {wanted}, nor a zerotrain run directory holding one{it_is}")


def adapter_only(run: RunDir) -> bool:
    """A LoRA run's final/: its adapter/ and no merged model (--merge-lora-at-end writes one). Such a
    run stands for its base model (config.yaml's init_from) with final/adapter/ on top."""
    return (run.final_adapter / "adapter_config.json").is_file() and _classify(run.final) is None


def checkpoint_dir(ckpt_dir: str | Path) -> Path:
    """What a CKPT_DIR argument names: the directory itself (a checkpoint directory or one tag
    folder), or for a zerotrain run directory its checkpoints/."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        raise ZerotrainError(f"checkpoint directory {root} does not exist")
    if is_checkpoint_dir(RunDir(root).checkpoints):
        root = resolve(root, ("deepspeed",), "CKPT_DIR").path
    return root


def resolve_tag(ckpt_dir: str | Path, tag: str | None = None) -> Path:
    """The tag folder a CKPT_DIR argument and --tag name: `tag` if given, else the one `latest` names.

    CKPT_DIR may also be a tag folder itself (it holds *_model_states.pt) when no tag is given, or
    a zerotrain run directory (its checkpoints/).
    """
    root = checkpoint_dir(ckpt_dir)
    if tag is None and is_tag_dir(root):
        return root
    tags = list_tags(root)
    available = f"available tags: {', '.join(tags)}" if tags else "it holds no checkpoint tags"
    if tag is not None:
        if (root / tag).is_dir():
            return root / tag
        raise ZerotrainError(f"no checkpoint tag {tag!r} in {root}; {available}")
    if not tags:
        raise ZerotrainError(f"{root} holds no DeepSpeed checkpoint (no global_stepN/ folder with "
                             f"*_model_states.pt files); pass the directory given to save_checkpoint")
    latest = root / LATEST
    if not latest.is_file():
        raise ZerotrainError(f"{root} has no 'latest' file; pass --tag ({available})")
    name = latest.read_text().strip()
    if not (root / name).is_dir():
        raise ZerotrainError(f"{latest} names {name!r}, which does not exist in {root} (deleted or not yet "
                             f"written?); pass --tag ({available})")
    return root / name
