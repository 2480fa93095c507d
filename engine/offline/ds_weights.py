"""The weights of a DeepSpeed checkpoint tag folder (engine.offline.ds_layout says what it holds),
as sources to read one tensor at a time: the fp32 masters where the tag has them, laid out as each
ZeRO stage lays them, else the module's weights.

Files are unpickled with `weights_only=True` and mapped, not read (engine.offline.pth_io.load_located):
that reads only the pickle, and its locator gives each tensor's byte offset in the file. A tensor
is then read with plain file reads from those offsets, one at a time, so Adam moments are never
read and memory holds one tensor, not the checkpoint.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.errors import ZerotrainError
from engine.checkpoint.sidecar import Sidecar
from engine.config.precision import DTYPE_NAMES
from engine.offline.ds_layout import (
    CheckpointInfo,
    ShardFile,
    describe,
    module_aliases,
    scan_layout,
)
from engine.offline.tensors import Piece, TensorSource
from model.state_dict import strip_wrappers


@dataclass
class Checkpoint:
    """The weights of one tag folder, as sources to read one at a time."""

    info: CheckpointInfo
    tensors: dict[str, TensorSource]
    """Names as saved (state-dict order), wrapper prefixes (module., _orig_mod.) stripped."""
    aliases: dict[str, str]
    """Tied names -> the name whose data they share (e.g. lm_head.weight -> model.embed_tokens.weight)."""
    notes: list[str] = field(default_factory=list)
    sidecar: Sidecar | None = None
    """The tag's zerotrain.json, when zerotrain wrote it."""


def load_checkpoint(tag_dir: str | os.PathLike, *, trust_pickle: bool = False) -> Checkpoint:
    """Map every tensor of a tag folder to its bytes: fp32 masters where they exist, else the
    module's weights (frozen parameters, buffers, fp32 training). Fails on an incomplete folder."""
    tag_dir = Path(tag_dir)
    info = describe(tag_dir, trust_pickle=trust_pickle)
    if not info.complete:
        raise ZerotrainError(f"checkpoint {tag_dir} is incomplete or inconsistent:\n  " + "\n  ".join(info.problems))
    layout = scan_layout(tag_dir)
    models = {r: ShardFile(p, trust_pickle) for r, p in sorted(layout.model_files.items())}
    optims = {r: ShardFile(p, trust_pickle) for r, p in sorted(layout.optim_files.items())}
    notes: list[str] = []
    if layout.zero3:
        tensors, aliases = _zero3_sources(models, optims, info.world_size or 1)
    else:
        tensors, aliases = _module_sources(models[0])
        if optims:
            masters = _flat_master_sources(models[0], optims)
        else:
            masters = _stage0_master_sources(models[0], tensors, notes)
        for name, src in masters.items():
            if name in tensors and tensors[name].shape != src.shape:
                raise ZerotrainError(f"{tag_dir}: fp32 master of {name} has shape {src.shape} but the module's "
                                     f"weight has {tensors[name].shape} (checkpoint layout not understood)")
            tensors[name] = src
    tensors = {strip_wrappers(k): v for k, v in tensors.items()}
    aliases = {strip_wrappers(k): strip_wrappers(v) for k, v in aliases.items()}
    for alias, target in list(aliases.items()):
        if target not in tensors:
            del aliases[alias]
        tensors.pop(alias, None)
    return Checkpoint(info, tensors, aliases, notes, Sidecar.read(tag_dir))


def _module_sources(model: ShardFile) -> tuple[dict[str, TensorSource], dict[str, str]]:
    """Stage 0-2: the module state dict holds every tensor in the training dtype."""
    state = model.state
    module = state.get("module")
    if not isinstance(module, dict):
        raise ZerotrainError(f"{model.path} has no 'module' state dict (not a DeepSpeed model-states file?)")
    buffers = set(state.get("buffer_names") or [])
    aliases = module_aliases(state)
    tensors = {}
    for name, t in module.items():
        if isinstance(t, torch.Tensor) and name not in aliases:
            tensors[name] = model.source(t, "buffer" if name in buffers else "module")
    return tensors, aliases


def _flat_master_sources(model: ShardFile, optims: dict[int, ShardFile]) -> dict[str, TensorSource]:
    """Stage 1/2 (and bf16 BF16_Optimizer) fp32 masters: per group, rank slices laid end to end."""
    osds = {r: f.state.get("optimizer_state_dict") or {} for r, f in optims.items()}
    ranks = sorted(optims)
    first = osds[ranks[0]]
    key = "single_partition_of_fp32_groups"
    if any(key not in osd for osd in osds.values()):
        raise ZerotrainError(f"{optims[ranks[0]].path} has no '{key}' (an optimizer layout zerotrain does not know)")
    num_groups = len(first[key])
    param_shapes = model.state.get("param_shapes") or [{} for _ in range(num_groups)]
    module = model.state.get("module") or {}
    mappings = [osds[r].get("param_slice_mappings") for r in ranks]
    sources: dict[str, TensorSource] = {}
    for g in range(num_groups):
        parts = [(optims[r], osds[r][key][g]) for r in ranks]
        dtype = parts[0][1].dtype
        shapes = dict(param_shapes[g]) if g < len(param_shapes) else {}
        if all(m is not None and g < len(m) for m in mappings):
            names = list(shapes) or list(dict.fromkeys(n for m in mappings for n in m[g]))
            for name in names:
                shape = tuple(shapes[name]) if name in shapes else tuple(module[name].shape)
                pieces = tuple(f.piece(t, int(m[g][name].start), int(m[g][name].numel))
                               for (f, t), m in zip(parts, mappings) if name in m[g])
                if sum(p.numel for p in pieces) != math.prod(shape):
                    raise ZerotrainError(f"{optims[ranks[0]].path}: the fp32 slices of {name} hold "
                                         f"{sum(p.numel for p in pieces)} elements, its shape {shape} needs "
                                         f"{math.prod(shape)} (checkpoint layout not understood)")
                sources[name] = TensorSource(shape, dtype, pieces, "fp32 master")
            continue
        if not shapes:
            raise ZerotrainError(f"{model.path} has no 'param_shapes' for group {g}: cannot place the fp32 masters")
        paddings = (first.get("param_alignment_paddings") or [None] * num_groups)[g]
        total = sum(t.numel() for _, t in parts)
        offset = 0
        for i, (name, shape) in enumerate(shapes.items()):
            numel = math.prod(shape)
            sources[name] = TensorSource(tuple(shape), dtype, _slice(parts, offset, numel, total), "fp32 master")
            offset += numel + (paddings[i] if paddings else 0)
        # DeepSpeed pads each group to a multiple of 2 x world size, so only compare after rounding up.
        align = 2 * len(ranks)
        if math.ceil(offset / align) * align != math.ceil(total / align) * align:
            raise ZerotrainError(f"{optims[ranks[0]].path}: group {g} holds {total} fp32 elements but its "
                                 f"parameters take {offset} (checkpoint layout not understood)")
    return sources


def _slice(parts: list[tuple[ShardFile, torch.Tensor]], start: int, numel: int, total: int) -> tuple[Piece, ...]:
    """Elements [start, start + numel) of the concatenation of `parts`."""
    if start + numel > total:
        raise ZerotrainError(f"{parts[0][0].path}: a parameter runs past the end of its flat group "
                             f"({start + numel} > {total} elements; checkpoint layout not understood)")
    pieces, base = [], 0
    for f, t in parts:
        lo, hi = max(start, base), min(start + numel, base + t.numel())
        if lo < hi:
            pieces.append(f.piece(t, lo - base, hi - lo))
        base += t.numel()
    return tuple(pieces)


def _stage0_master_sources(model: ShardFile, tensors: dict[str, TensorSource], notes: list[str]) -> dict[str, TensorSource]:
    """Stage 0, bf16/fp16: FP16_Optimizer keeps unnamed fp32 masters in the parameter-group order.

    Parameters are matched to masters in module order: the next unmatched parameter of the same
    shape whose low-precision weight equals the master cast down (DeepSpeed copies it so after
    every step). When that fails for a group, the module weights stay and a note says so.
    """
    opt = model.state.get("optimizer")
    if not isinstance(opt, dict):
        return {}
    groups = opt.get("fp32_groups") or opt.get("fp32_groups_flat")
    if not groups:
        return {}
    candidates = [n for n, s in tensors.items() if s.origin == "module" and s.dtype != torch.float32
                  and s.dtype.is_floating_point]
    if not candidates:
        return {}
    sources: dict[str, TensorSource] = {}
    taken: set[str] = set()
    for g, group in enumerate(groups):
        flat = isinstance(group, torch.Tensor)
        items = [group] if flat else list(group)
        matched: dict[str, TensorSource] = {}
        ok = True
        for t in items:
            pos = 0
            while pos < t.numel():
                name = _match_master(model, t, pos, candidates, taken | set(matched), tensors, flat)
                if name is None:
                    ok = False
                    break
                numel = tensors[name].numel
                matched[name] = TensorSource(tensors[name].shape, t.dtype, (model.piece(t, pos, numel),), "fp32 master")
                pos += numel
            if not ok:
                break
        if ok:
            sources.update(matched)
            taken |= set(matched)
        else:
            notes.append(f"the fp32 masters of parameter group {g} could not be matched to parameter names; "
                         f"the module's {DTYPE_NAMES.get(tensors[candidates[0]].dtype)} weights are used for them")
    return sources


def _match_master(model: ShardFile, t: torch.Tensor, pos: int, candidates: list[str], taken: set[str],
                  tensors: dict[str, TensorSource], flat: bool) -> str | None:
    remaining = t.numel() - pos
    for name in candidates:
        src = tensors[name]
        if name in taken or src.numel > remaining or (not flat and src.shape != tuple(t.shape)):
            continue
        master = TensorSource((src.numel,), t.dtype, (model.piece(t, pos, src.numel),)).read()
        if torch.equal(master.to(src.dtype), src.read().reshape(-1)):
            return name
    return None


def _zero3_cut(numel: int, world: int) -> tuple[int, list[int]]:
    """How ZeRO-3 cuts a parameter of `numel` elements over `world` ranks: each holds a slice of
    ceil(numel / world) elements, of which the first `takes[r]` are the parameter's (the rest, on the
    last ranks, padding)."""
    part = math.ceil(numel / world)
    return part, [min(part, numel - r * part) for r in range(world)]


def _zero3_sources(models: dict[int, ShardFile], optims: dict[int, ShardFile], world: int
                   ) -> tuple[dict[str, TensorSource], dict[str, str]]:
    """Stage 3: each parameter is cut in `world` equal slices (the last padded), one per rank."""
    first = models[0].state
    module = first.get("module") or {}
    buffers = set(first.get("buffer_names") or [])
    aliases = dict(first.get("shared_params") or {})
    shapes = {k: tuple(v) for d in first.get("param_shapes") or [] for k, v in d.items()}
    frozen = {k: tuple(v) for k, v in (first.get("frozen_param_shapes") or {}).items()}
    tensors: dict[str, TensorSource] = {}

    key = "fp32_flat_groups"
    osds = {r: f.state.get("optimizer_state_dict") or {} for r, f in optims.items()}
    if shapes and any(key not in osd for osd in osds.values()):
        raise ZerotrainError(f"{optims[0].path} has no '{key}' (an optimizer layout zerotrain does not know)")
    flat = {r: list(osd[key]) if isinstance(osd.get(key), (list, tuple)) else
            [osd[key]] if key in osd else [] for r, osd in osds.items()}
    per_rank = {r: sum(t.numel() for t in flat[r]) for r in flat}
    if len(set(per_rank.values())) > 1:
        raise ZerotrainError(f"the ranks' fp32 partitions differ in size ({per_rank}): checkpoint files from "
                             f"different runs?")
    total = next(iter(per_rank.values()), 0)
    offset = 0
    masters: dict[str, TensorSource] = {}
    for name, shape in shapes.items():
        part, takes = _zero3_cut(math.prod(shape), world)
        pieces: list[Piece] = []
        for r, take in enumerate(takes):
            if take > 0:
                pieces += _slice([(optims[r], t) for t in flat[r]], offset, take, total)
        masters[name] = TensorSource(shape, flat[0][0].dtype if flat[0] else torch.float32, tuple(pieces),
                                     "fp32 master")
        offset += part
    if offset != total:
        raise ZerotrainError(f"{optims[0].path}: the fp32 partition holds {total} elements per rank but the "
                             f"parameters take {offset} (checkpoint layout not understood)")

    frozen_sources: dict[str, TensorSource] = {}
    for name, shape in frozen.items():
        pieces = []
        dtype = None
        for r, take in enumerate(_zero3_cut(math.prod(shape), world)[1]):
            frags = models[r].state.get("frozen_param_fragments") or {}
            if name not in frags:
                raise ZerotrainError(f"{models[r].path} lacks its slice of frozen parameter {name}")
            dtype = frags[name].dtype
            if take > 0:
                pieces.append(models[r].piece(frags[name], 0, take))
        frozen_sources[name] = TensorSource(shape, dtype or torch.float32, tuple(pieces), "frozen")

    for name, t in module.items():
        if name in masters:
            tensors[name] = masters.pop(name)
        elif name in frozen_sources:
            tensors[name] = frozen_sources.pop(name)
        elif name in aliases:
            continue
        elif isinstance(t, torch.Tensor) and (name in buffers or t.numel() > 0):
            tensors[name] = models[0].source(t, "buffer" if name in buffers else "module")
        else:
            raise ZerotrainError(f"{models[0].path}: no data for {name} (not in param_shapes, "
                                 f"frozen_param_shapes or the buffers)")
    tensors.update(masters)
    tensors.update(frozen_sources)
    return tensors, aliases
