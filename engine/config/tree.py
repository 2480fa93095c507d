"""The whole run configuration: the sections every run has, plus the sections of the stage being
run (DPO's `pref`, distillation's `distill`, declared beside their objectives), built from one
flat or nested mapping of keys.

Every field is a YAML key, either flat or under its section's name, and a flag of the same name
in kebab-case (engine.config.parse)::

    train:
      micro_batch_size: 8
    lr: 3.0e-4          # flat keys work too; names are unique across sections

The resolved tree is saved with every run (`config.yaml`) and every checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field, fields
from functools import cache
from typing import Any, Iterable, TypeVar

import yaml

from common.errors import ZerotrainError, did_you_mean
from common.publish import write_text
from engine.config.sections import (
    COMMON_SECTIONS,
    CheckpointConfig,
    DataConfig,
    DistributedConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    check_choices,
)

Section = TypeVar("Section")

RETIRED = {"eval_batches": ("eval_samples", "validation samples in all, not micro-batches per rank")}
"""Keys earlier versions had: {old: (its replacement, what changed)}. Given by a user they are an
error naming the replacement; in a saved config (an earlier run's config.yaml) they are dropped."""


@dataclass
class Config:
    """The whole run configuration."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    stage_sections: dict[str, Any] = field(default_factory=dict)
    """The sections of the stage being run, by name (engine.objectives: a stage declares its own)."""

    def __post_init__(self) -> None:
        if self.optim.warmup_steps is None:  # resolved once, so config.yaml records what the run used
            self.optim.warmup_steps = min(100, self.train.max_steps // 10)
        if self.optim.warmup_steps > self.train.max_steps:
            raise ZerotrainError(
                f"optim.warmup_steps ({self.optim.warmup_steps}) is larger than train.max_steps "
                f"({self.train.max_steps}): lower --warmup-steps or raise --max-steps")

    def section(self, section_cls: type[Section]) -> Section:
        """The stage's own section of that class: `cfg.section(PrefConfig).beta`."""
        for value in self.stage_sections.values():
            if isinstance(value, section_cls):
                return value
        raise KeyError(f"this config has no {section_cls.__name__} section (sections: "
                       f"{', '.join(self.stage_sections) or 'none'}): build it for the stage that declares it")

    def check_world_size(self, world_size: int) -> int:
        """Return the global batch for `world_size` ranks, or fail if a set global_batch_size disagrees."""
        t = self.train
        derived = t.micro_batch_size * t.grad_accum * world_size
        if t.global_batch_size and t.global_batch_size != derived:
            raise ZerotrainError(
                f"train.global_batch_size is {t.global_batch_size} but micro_batch_size x grad_accum x "
                f"world size = {t.micro_batch_size} x {t.grad_accum} x {world_size} = {derived}: "
                f"set --global-batch-size {derived}, or 0 to derive it, or change --grad-accum")
        return derived

    def sections(self) -> dict[str, Any]:
        """Every section of this config by name, the common ones first."""
        return {**{cls.SECTION: getattr(self, cls.SECTION) for cls in COMMON_SECTIONS}, **self.stage_sections}

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(section) for name, section in self.sections().items()}

    def save(self, path: str | os.PathLike) -> None:
        """Write the resolved config as YAML (temporary name, then rename)."""
        write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, stage_sections: Iterable[type] = (),
                  source: str = "config", saved: bool = False) -> Config:
        """Build from nested ({section: {key: value}}) and/or flat ({key: value}) mappings, with the
        common sections and `stage_sections` (section dataclasses of the stage being run).
        `saved`: the mapping is a config an earlier run saved, whose retired keys are dropped."""
        classes = section_classes(tuple(stage_sections))
        owner = field_sections(tuple(stage_sections))
        flat: dict[str, Any] = {}
        merge(flat, values or {}, source, classes, saved=saved)
        per_section: dict[str, dict[str, Any]] = {name: {} for name in classes}
        for key, value in flat.items():
            if key in RETIRED:  # a saved config's (merge refused any other)
                continue
            if key not in owner:
                hint = did_you_mean(key, list(owner) + list(classes), cutoff=0.5)
                raise ZerotrainError(f"{source}: unknown key '{key}'" + (f"; {hint}" if hint else ""))
            per_section[owner[key]][key] = value
        built = {}
        for name, section_cls in classes.items():
            annotations = field_types(section_cls)
            given = {k: coerce(v, annotations[k], f"{source}: {name}.{k}") for k, v in per_section[name].items()}
            check_choices(section_cls, given)  # before the section's own checks, which may read these
            built[name] = section_cls(**given)
        common = {c.SECTION: built.pop(c.SECTION) for c in COMMON_SECTIONS}
        return cls(**common, stage_sections=built)


@cache
def section_classes(stage_sections: tuple[type, ...] = ()) -> dict[str, type]:
    """Section name -> dataclass: the common sections, then the stage's."""
    classes = {c.SECTION: c for c in (*COMMON_SECTIONS, *stage_sections)}
    if len(classes) != len(COMMON_SECTIONS) + len(stage_sections):
        raise ValueError(f"two config sections share a name: {[c.SECTION for c in stage_sections]}")
    return classes


@cache
def field_sections(stage_sections: tuple[type, ...] = ()) -> dict[str, str]:
    """Field name -> the name of its section (field names are unique across sections)."""
    owner: dict[str, str] = {}
    for name, section_cls in section_classes(stage_sections).items():
        for key in field_types(section_cls):
            if key in owner:
                raise ValueError(f"config field {key} is in both the {owner[key]} and the {name} section")
            owner[key] = name
    return owner


@cache
def field_types(section_cls: type) -> dict[str, Any]:
    """A section's field names and their types."""
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in fields(section_cls)}


def merge(into: dict[str, Any], new: dict[str, Any], source: str, classes: dict[str, type], *,
          saved: bool = False) -> None:
    """Merge a nested or flat mapping into one flat mapping; later values win. A retired key is an
    error naming its replacement, unless the mapping is a `saved` config (kept, for the caller to
    drop)."""
    for key, value in new.items():
        if key in classes and isinstance(value, dict):
            known = list(field_types(classes[key]))
            for sub_key, sub_value in value.items():
                if sub_key not in known and sub_key not in RETIRED:
                    hint = did_you_mean(sub_key, known, cutoff=0.5)
                    raise ZerotrainError(f"{source}: unknown key '{key}.{sub_key}'" + (f"; {hint}" if hint else ""))
                _check_retired(sub_key, source, saved)
                into[sub_key] = sub_value
        else:
            _check_retired(key, source, saved)
            into[key] = value


def _check_retired(key: str, source: str, saved: bool) -> None:
    if key in RETIRED and not saved:
        new, what = RETIRED[key]
        raise ZerotrainError(f"{source}: '{key}' was replaced by '{new}' ({what}): use {new} "
                             f"(--{new.replace('_', '-')})")


def coerce(value: Any, annotation: Any, where: str) -> Any:
    """Convert a YAML/CLI value to the field's type (YAML reads 5e-4 as a string, for one)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        annotation = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    try:
        if origin is list:  # "a,b" and ["a", "b"] alike
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, (list, tuple)):
                raise ValueError
            parts = [part.strip() for v in value for part in str(v).split(",") if part.strip()]
            item = args[0] if args and args[0] is not str else None
            return [coerce(part, item, where) for part in parts] if item is not None else parts
        if annotation is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if annotation is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if annotation is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if annotation is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        name = getattr(annotation, "__name__", str(annotation))
        raise ZerotrainError(f"{where}: expected {name}, got {value!r}") from None
    return value
