"""Every training stage zerotrain has, found by its declaration (engine.objectives.base.Stage).

A stage is a `Stage` object at the top level of a module of engine/objectives; `all_stages`
finds each one there, so adding a stage touches no list here. A stage declared elsewhere (a
plugin, a test) joins with `register`.

What zerotrain knows about stages it learns from here: a launcher's config (its own section, and
a clear refusal of another stage's flags), which launchers train on a data kind, and a saved
config of any stage.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Any

import engine.objectives
from common.errors import ZerotrainError
from engine.config.parse import parse_config
from engine.config.sections import flag
from engine.config.tree import Config
from engine.data.kinds import data_kind
from engine.objectives.base import Stage

_registered: dict[str, Stage] = {}


def all_stages() -> dict[str, Stage]:
    """Every stage by name: those declared in engine/objectives, then the registered ones."""
    found: dict[str, Stage] = {}
    for info in pkgutil.iter_modules(engine.objectives.__path__, "engine.objectives."):
        for value in vars(importlib.import_module(info.name)).values():
            if isinstance(value, Stage):
                found.setdefault(value.name, value)
    return {**found, **_registered}


def register(stage: Stage) -> Stage:
    """Make a stage declared outside engine/objectives known (its flags, its data kinds)."""
    existing = all_stages().get(stage.name)
    if existing is not None and existing is not stage:
        raise ValueError(f"a stage named {stage.name!r} is already declared")
    _registered[stage.name] = stage
    return stage


def stage_sections() -> tuple[type, ...]:
    """Every stage's own config section, each once."""
    return tuple(dict.fromkeys(s.section for s in all_stages().values() if s.section is not None))


def config_for(stage: Stage, argv: list[str] | None, *, defaults: dict[str, Any] | None = None) -> Config:
    """The config of a `stage` run from its command line: the common sections and its own, with
    the stage's defaults. A flag or YAML key of another stage's section is refused, naming the
    launcher it belongs to, rather than ignored; --help lists the stage's sections only."""
    cfg = parse_config(argv, stage_sections=stage_sections(), description=stage_description(stage),
                       defaults={**dict(stage.defaults), **(defaults or {})}, shown=stage.sections,
                       epilog=stage_epilog(stage))
    check_stage_sections(cfg, stage)
    cfg.stage_sections = {name: section for name, section in cfg.stage_sections.items()
                          if type(section) in stage.sections}
    return cfg


def check_stage_sections(cfg: Config, stage: Stage) -> None:
    """Refuse values given for another stage's config section (say --beta given to
    launcher/sft.py), which that stage would silently ignore."""
    owners = {s.section: s for s in all_stages().values() if s.section is not None}
    for name, given in cfg.stage_sections.items():
        if type(given) in stage.sections:
            continue
        default = type(given)()
        changed = [f.name for f in dataclasses.fields(given) if getattr(given, f.name) != getattr(default, f.name)]
        if changed:
            owner = owners[type(given)]
            raise ZerotrainError(f"{', '.join(map(flag, changed))}: not a flag of {stage.name} ({name} section); "
                                 f"drop it, or run the launcher it belongs to ({owner.launcher})")


def load_config(values: dict[str, Any], source: str) -> Config:
    """A saved config (config.yaml, a checkpoint's) of a run of any stage, earlier zerotrain
    versions' included (they saved every stage's section)."""
    return Config.from_dict(values, stage_sections=stage_sections(), source=source, saved=True)


def launchers_for(kind: str) -> list[str]:
    """The launchers whose stage trains on data of `kind`."""
    return [s.launcher for s in all_stages().values() if kind in s.data_kinds]


def stage_description(stage: Stage) -> str:
    """The --help description of a stage's launcher."""
    kinds = " or ".join(data_kind(k).title for k in stage.data_kinds)
    return f"zerotrain {stage.name}: {stage.summary or 'train'} (on {kinds})"


def stage_epilog(stage: Stage) -> str:
    """The end of a stage's --help: the ways to launch it, and where the manual is."""
    script = stage.launcher
    forms = [(f"python {script} --flag value ...", "one process: CPU, or one GPU"),
             (f"torchrun --nproc_per_node N {script} ...", "N processes on this machine"),
             (f"deepspeed --hostfile hostfiles/a100 {script} ...", "several machines over ssh"),
             (f"sbatch scripts/slurm/{stage.name}.sbatch", "under SLURM")]
    width = max(len(command) for command, _ in forms) + 3
    return "\n".join(["launch (the same flags in every form):",
                      *(f"  {command.ljust(width)}{what}" for command, what in forms), "",
                      "YAML: --config FILE.yaml takes the same names as keys, flat or by section; flags override it.",
                      "manual: docs/README.md (a page per stage); every flag of every launcher: docs/flags.md"])
