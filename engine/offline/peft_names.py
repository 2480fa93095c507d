"""LoRA in PEFT's names: the settings the shards do not carry (alpha, rsLoRA, patterns), folding each
pair into its base weight (W + scale * B @ A), and the layout of a PEFT adapter (its file's tensor
names and adapter_config.json).

A PEFT model's state dict names a LoRA layer's tensors `M.base_layer.weight`, `M.lora_A.NAME.weight`
and `M.lora_B.NAME.weight` (embeddings: `M.lora_embedding_A.NAME`), and a modules_to_save layer's
`M.original_module.*` and `M.modules_to_save.NAME.*`, all under `base_model.model.`; an adapter file
leaves out NAME and the base weights.
"""

from __future__ import annotations

import collections
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from common.errors import ZerotrainError
from common.jsonio import read_json_object
from engine.checkpoint.run_dir import SIDECAR
from engine.checkpoint.sidecar import Sidecar
from engine.offline.tensors import Entry

PEFT_PREFIX = "base_model.model."

_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_embedding_A|lora_embedding_B|lora_A|lora_B)"
                       r"\.(?P<adapter>[^.]+)(?P<suffix>\.weight)?$")
# The same in a PEFT adapter file, where the adapter name is left out.
_ADAPTER_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_embedding_A|lora_embedding_B|lora_A|lora_B)"
                               r"(?P<suffix>\.weight)?$")
_SAVED = re.compile(r"^(?P<module>.+)\.modules_to_save\.(?P<adapter>[^.]+)\.(?P<rest>.+)$")
_ORIGINAL = re.compile(r"^(?P<module>.+)\.original_module\.(?P<rest>.+)$")


@dataclass
class AdapterConfig:
    """A LoRA adapter's PEFT config, read back (read_adapter_config) for what the shards do not
    say: its alpha and the rest. (The run's LoRA flags are engine.config.sections.LoraConfig;
    training records a live model's with engine.training.lora.adapter_config.)"""

    lora_alpha: float
    use_rslora: bool = False
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    fan_in_fan_out: bool | None = None
    config: dict[str, Any] = field(default_factory=dict)
    """The whole adapter config it came from (PEFT LoraConfig fields)."""
    source: str = ""

    def alpha_for(self, module: str) -> float:
        for pattern, alpha in self.alpha_pattern.items():
            if re.match(rf"(.*\.)?{pattern}$", module):
                return float(alpha)
        return float(self.lora_alpha)


def read_adapter_config(tag_dir: Path | None, sidecar: Sidecar | None, *, lora_alpha: float | None = None,
                        adapter_config: str | None = None) -> AdapterConfig | None:
    """The adapter config from --adapter-config FILE, else the run's saved config (the tag's
    zerotrain.json, `sidecar`), else an adapter_config.json in the checkpoint dir beside `tag_dir` (HF Trainer);
    --lora-alpha overrides the alpha."""
    config: dict[str, Any] | None = None
    source = ""
    if adapter_config:
        path = Path(adapter_config)
        path = path / "adapter_config.json" if path.is_dir() else path
        if not path.is_file():
            raise ZerotrainError(f"--adapter-config {adapter_config}: no such file")
        config, source = read_json_object(path), str(path)
    elif tag_dir is not None and sidecar is not None and sidecar.lora:
        config, source = dict(sidecar.lora), str(tag_dir / SIDECAR)
    elif tag_dir is not None and (tag_dir.parent / "adapter_config.json").is_file():
        path = tag_dir.parent / "adapter_config.json"
        config, source = read_json_object(path), str(path)
    if lora_alpha is not None:
        config = dict(config or {}, lora_alpha=lora_alpha)
        source = source or "--lora-alpha"
    if config is None:
        return None
    if config.get("lora_alpha") is None:
        raise ZerotrainError(f"{source} has no lora_alpha; pass --lora-alpha")
    return AdapterConfig(lora_alpha=float(config["lora_alpha"]), use_rslora=bool(config.get("use_rslora", False)),
                        alpha_pattern=dict(config.get("alpha_pattern") or {}),
                        fan_in_fan_out=config.get("fan_in_fan_out"), config=config, source=source)


def is_lora_matrix(name: str) -> bool:
    """A LoRA A or B matrix in a PEFT model's state dict (`M.lora_A.NAME.weight`, ...)."""
    return _LORA_KEY.match(name) is not None


def strip_peft(name: str) -> str:
    """A name without PEFT's `base_model.model.` prefix."""
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


@dataclass
class _LoraModule:
    a: Entry | None = None
    b: Entry | None = None
    embedding: bool = False


def _lora_modules(entries: list[Entry]) -> tuple[dict[str, _LoraModule], set[str]]:
    modules: dict[str, _LoraModule] = {}
    adapters: set[str] = set()
    for e in entries:
        m = _LORA_KEY.match(e.name)
        if m:
            mod = modules.setdefault(m.group("module"), _LoraModule())
            mod.embedding = m.group("kind").startswith("lora_embedding")
            if m.group("kind").endswith("A"):
                mod.a = e
            else:
                mod.b = e
            adapters.add(m.group("adapter"))
        elif m := _SAVED.match(e.name):
            adapters.add(m.group("adapter"))
    unsupported = [e.name for e in entries if not _LORA_KEY.match(e.name)
                   and any(p.startswith("lora_") for p in e.name.split("."))]
    if unsupported:
        raise ZerotrainError(f"LoRA variant not supported for folding ({unsupported[0]}: DoRA, LoRA bias, ...); "
                             f"pass --keep-lora-keys to keep the raw keys, or extract-adapter")
    if len(adapters) > 1:
        raise ZerotrainError(f"the checkpoint holds several adapters ({', '.join(sorted(adapters))}); pass "
                             f"--keep-lora-keys to keep the raw keys")
    for name, mod in modules.items():
        if mod.a is None or mod.b is None:
            raise ZerotrainError(f"LoRA module {name} has only one of its A/B matrices (checkpoint incomplete?)")
    return modules, adapters


def fold_lora(entries: list[Entry], aliases: dict[str, str], settings: AdapterConfig
              ) -> tuple[list[Entry], dict[str, str]]:
    """PEFT names -> plain model names with each LoRA pair folded into its base weight
    (W + scale * B @ A, computed in fp32), modules_to_save copies in place of the originals."""
    modules, _ = _lora_modules(entries)
    by_name = {e.name: e for e in entries}
    flip = _fan_in_fan_out(modules, by_name, settings)
    out: dict[str, Entry] = {}
    saved: set[str] = set()
    for e in entries:
        name = e.name
        if _LORA_KEY.match(name):
            continue
        if m := _ORIGINAL.match(name):
            if any(k.startswith(f"{m.group('module')}.modules_to_save.") for k in by_name):
                continue
            new = f"{m.group('module')}.{m.group('rest')}"
        elif m := _SAVED.match(name):
            new = f"{m.group('module')}.{m.group('rest')}"
            saved.add(strip_peft(new))
        else:
            new = name.replace(".base_layer.", ".")
        new = strip_peft(new)
        module = name[:-len(".weight")].removesuffix(".base_layer") if name.endswith(".weight") else None
        if module in modules:
            e = _folded(new, e, modules[module], settings.alpha_for(strip_peft(module)), settings.use_rslora, flip)
        if new in out and new not in saved:
            raise ZerotrainError(f"two checkpoint tensors map to {new} after folding LoRA; pass --keep-lora-keys")
        if new in out and _SAVED.match(name) is None:
            continue  # the modules_to_save copy wins over the original
        out[new] = replace(e, name=new)
    missing = [m for m in modules if not any(k in by_name for k in (f"{m}.base_layer.weight", f"{m}.weight"))]
    if missing:
        raise ZerotrainError(f"the checkpoint has LoRA matrices for {missing[0]} but not its base weight (saved "
                             f"with exclude_frozen_parameters?); extract the adapter with `zerotrain "
                             f"extract-adapter` and merge it into the base model with `zerotrain merge-adapter`")
    new_aliases = {}
    for alias, target in aliases.items():
        if _ORIGINAL.match(alias) or _LORA_KEY.match(alias):
            continue
        a, t = strip_peft(alias.replace(".base_layer.", ".")), strip_peft(target.replace(".base_layer.", "."))
        if t in out and a not in out:
            new_aliases[a] = t
    return list(out.values()), new_aliases


def _fan_in_fan_out(modules: dict[str, _LoraModule], by_name: dict[str, Entry], settings: AdapterConfig) -> bool:
    """Whether base weights are stored (in, out) as GPT-2's Conv1D: the config's word, else the shapes."""
    if settings.fan_in_fan_out is not None:
        return bool(settings.fan_in_fan_out)
    for name, mod in modules.items():
        base = by_name.get(f"{name}.base_layer.weight") or by_name.get(f"{name}.weight")
        if base is None or mod.embedding:
            continue
        out_in = (mod.b.shape[0], mod.a.shape[1])
        if base.shape != out_in and base.shape == out_in[::-1]:
            return True
        if base.shape == out_in and out_in[0] != out_in[1]:
            return False
    return False


def _folded(name: str, base: Entry, mod: _LoraModule, alpha: float, rslora: bool, flip: bool) -> Entry:
    r = mod.a.shape[0]
    scale = alpha / (math.sqrt(r) if rslora else r)
    if mod.embedding:
        delta_shape = (mod.a.shape[1], mod.b.shape[0])
        transpose = True
    else:
        delta_shape = (mod.b.shape[0], mod.a.shape[1])
        transpose = base.shape != delta_shape or (flip and delta_shape[0] == delta_shape[1])
        if transpose:
            delta_shape = delta_shape[::-1]
    if base.shape != delta_shape:
        raise ZerotrainError(f"LoRA of {name}: B @ A has shape {delta_shape} but the base weight {base.shape}")

    def produce(into: torch.Tensor | None = None) -> torch.Tensor:
        delta = mod.b.produce(None).float() @ mod.a.produce(None).float()
        if transpose:
            delta = delta.T
        return base.produce(None).float() + delta * scale

    return replace(base, name=name, dtype=torch.float32 if base.dtype.is_floating_point else base.dtype,
                   produce=produce)


def peft_adapter(entries: list[Entry], settings: AdapterConfig) -> tuple[list[Entry], dict[str, Any]]:
    """The adapter of a PEFT model's tensors as PEFT saves it: the LoRA matrices and modules_to_save
    copies under an adapter file's names, and its adapter_config.json fields (rank and target
    modules from the shapes, the rest from `settings`)."""
    modules, _ = _lora_modules(entries)
    adapter_entries: list[Entry] = []
    saved_modules: list[str] = []
    for e in entries:
        if m := _LORA_KEY.match(e.name):
            name = f"{m.group('module')}.{m.group('kind')}{m.group('suffix') or ''}"
        elif m := _SAVED.match(e.name):
            name = f"{m.group('module')}.{m.group('rest')}"
            saved_modules.append(strip_peft(m.group("module")))
        else:
            continue
        adapter_entries.append(replace(e, name=PEFT_PREFIX + strip_peft(name)))
    return adapter_entries, _adapter_config(modules, entries, settings, list(dict.fromkeys(saved_modules)))


def lora_name_in_model(adapter_name: str) -> str | None:
    """An adapter file's LoRA matrix (PEFT prefix stripped) under the name a PEFT model gives it,
    adapter `default`, as `fold_lora` reads it; None for its other tensors (modules_to_save)."""
    m = _ADAPTER_LORA_KEY.match(adapter_name)
    return f"{m.group('module')}.{m.group('kind')}.default{m.group('suffix') or ''}" if m else None


def lora_module(name: str) -> str:
    """The module a LoRA matrix of a PEFT model's state dict belongs to."""
    m = _LORA_KEY.match(name)
    if m is None:
        raise ValueError(f"{name} is not a LoRA matrix name")
    return m.group("module")


def _adapter_config(modules: dict[str, _LoraModule], entries: list[Entry], settings: AdapterConfig,
                    saved_modules: list[str]) -> dict[str, Any]:
    """PEFT config: rank and target modules from the shards, the rest from the saved settings."""
    paths = {strip_peft(m): mod.a.shape[0] for m, mod in modules.items()}
    leaves = {p.rsplit(".", 1)[-1] for p in paths}
    all_modules = set()
    for e in entries:
        if not (_LORA_KEY.match(e.name) or _SAVED.match(e.name) or _ORIGINAL.match(e.name)):
            all_modules.add(strip_peft(e.name.replace(".base_layer.", ".")).rsplit(".", 1)[0])
    # Leaf names ("q_proj") when every module of that name has LoRA, else the full module paths.
    uncovered = {m for m in all_modules if m.rsplit(".", 1)[-1] in leaves and m not in paths}
    targets = sorted(leaves) if not uncovered else sorted(paths)
    ranks = collections.Counter(paths.values())
    r = ranks.most_common(1)[0][0]
    config = {k: v for k, v in settings.config.items()}
    config.update(
        r=r,
        lora_alpha=settings.lora_alpha,
        target_modules=targets,
        modules_to_save=saved_modules or None,
        rank_pattern={p: rank for p, rank in paths.items() if rank != r},
    )
    if settings.fan_in_fan_out is None:
        by_name = {e.name: e for e in entries}
        config["fan_in_fan_out"] = _fan_in_fan_out(modules, by_name, settings)
    config.setdefault("task_type", "CAUSAL_LM")
    config.pop("peft_type", None)
    return config
