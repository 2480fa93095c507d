"""Read DeepSpeed checkpoint folders safely, without DeepSpeed's engine and without reading
optimizer moments. Works on the checkpoints of any DeepSpeed program (zerotrain, HF Trainer's
`checkpoint-N/global_stepN`, DeepSpeed-Chat, a plain `deepspeed.initialize` script).

A tag folder (`global_stepN/`) holds `torch.save` files. What each ZeRO stage writes:

    stage 0     mp_rank_00_model_states.pt: 'module' (the whole state dict in the training dtype);
                a bf16/fp16 run's fp32 masters sit in its 'optimizer' ('fp32_groups' or
                'fp32_groups_flat', without names)
    stage 1, 2  mp_rank_00_model_states.pt as above plus 'param_shapes', 'shared_params', ...;
                [bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt: rank R's slice of each flat fp32
                group ('single_partition_of_fp32_groups', laid end to end over the ranks)
    stage 3     zero_pp_rank_R_mp_rank_00_model_states.pt: placeholders, buffers, 'param_shapes',
                rank R's slice of each frozen parameter; [bf16_]zero_pp_rank_R_..._optim_states.pt:
                'fp32_flat_groups', every trainable parameter's R-th slice (ceil(numel / world size)
                elements, the last rank's padded) back to back, in 'param_shapes' order

Files are unpickled with `weights_only=True` and mapped, not read (engine.offline.pth_io.load_located):
that reads only the pickle, and its locator gives each tensor's byte offset in the file. A tensor
is then read with plain file reads from those offsets, one at a time, so Adam moments are never
read and memory holds one tensor, not the checkpoint.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import logging
import math
import os
import re
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from common.errors import ZerotrainError
from engine.precision import DTYPE_NAMES
from engine.run_dir import is_universal_dir
from engine.sidecar import Sidecar
from engine.offline.pth_io import Piece, TensorSource, load_located, tied_names, torch_load
from model.state_dict import strip_wrappers

_ZERO3_MODEL = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt$")
_MODEL = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
_OPTIM = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
_UNSUPPORTED = {
    "mixture-of-experts": re.compile(r"^(expp_rank_\d+|layer_\d+_expert_\d+|expert_\d+)_.*\.pt$"),
    "pipeline-parallel": re.compile(r"^layer_\d+-model_\d+-model_states\.pt$"),
}


@functools.cache
def deepspeed_globals() -> list:
    """The classes DeepSpeed pickles into its checkpoints, and nothing else: the allowlist of
    `safe_load`. Found on first use, since importing deepspeed costs a second and ~25 MB."""
    first_import = "deepspeed" not in sys.modules
    captured = io.StringIO()
    # Importing deepspeed prints its accelerator detection to stdout, which would corrupt
    # `zerotrain inspect --json`; its logger is pointed back at stdout afterwards.
    with contextlib.redirect_stdout(captured) if first_import else contextlib.nullcontext():
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    for handler in logging.getLogger("DeepSpeed").handlers:
        if getattr(handler, "stream", None) is captured:
            handler.setStream(sys.stdout)
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_load(path: str | os.PathLike, *, trust_pickle: bool = False, mmap: bool = True) -> Any:
    """`torch.load` onto the CPU with `weights_only=True`, allowing only `deepspeed_globals()`.

    A refused class, a truncated or corrupt file: ZerotrainError naming the file. With
    `trust_pickle` the file is unpickled without restrictions (it can run arbitrary code).
    """
    return torch_load(path, map_location="cpu", mmap=mmap, trust_pickle=trust_pickle,
                      safe_globals=() if trust_pickle else deepspeed_globals(), kind="DeepSpeed checkpoints")


class _File:
    """One checkpoint file: its pickle, loaded mapped (no tensor data read), and where its tensors lie."""

    def __init__(self, path: Path, trust_pickle: bool) -> None:
        self.path = path
        self.state, self.locator = load_located(path, trust_pickle=trust_pickle, kind="DeepSpeed checkpoints",
                                                safe_globals=() if trust_pickle else deepspeed_globals())

    def piece(self, t: torch.Tensor, start: int = 0, numel: int | None = None) -> Piece:
        """Elements [start, start + numel) of the contiguous tensor `t` of this file's state."""
        return self.locator.piece(t, start, numel)

    def source(self, t: torch.Tensor, origin: str) -> TensorSource:
        return self.locator.source(t, origin)


# --------------------------------------------------------------------------------------------
# Describing a tag folder


@dataclass
class CheckpointInfo:
    """What a tag folder holds, found without reading tensor data."""

    tag: str
    path: Path
    zero_stage: int | None = None
    world_size: int | None = None
    """Data-parallel ranks that saved it."""
    dtype: str | None = None
    """Training dtype of the module weights: fp32, bf16 or fp16."""
    files: list[str] = field(default_factory=list)
    bytes: int = 0
    complete: bool = False
    problems: list[str] = field(default_factory=list)
    num_params: int | None = None
    is_lora: bool = False
    step: int | None = None


@dataclass
class _Layout:
    model_files: dict[int, Path]  # rank -> file (stage 3: one per rank; else rank 0 only)
    optim_files: dict[int, Path]
    zero3: bool
    other_mp: list[str]
    unsupported: list[str]


def _scan(tag_dir: Path) -> _Layout:
    model, optim, other_mp, unsupported = {}, {}, [], []
    zero3 = False
    for p in sorted(tag_dir.iterdir()):
        name = p.name
        if m := _ZERO3_MODEL.match(name):
            zero3 = True
            if int(m.group(2)):
                other_mp.append(name)
            else:
                model[int(m.group(1))] = p
        elif m := _MODEL.match(name):
            if int(m.group(1)):
                other_mp.append(name)
            else:
                model.setdefault(-1, p)
        elif m := _OPTIM.match(name):
            if int(m.group(3)):
                other_mp.append(name)
            else:
                optim[int(m.group(2))] = p
        else:
            unsupported += [f"{name} ({kind})" for kind, rx in _UNSUPPORTED.items() if rx.match(name)]
    if not zero3 and -1 in model:
        model = {0: model[-1]}
    elif zero3:
        model.pop(-1, None)
    return _Layout(model, optim, zero3, other_mp, unsupported)


def describe(tag_dir: str | os.PathLike, *, trust_pickle: bool = False) -> CheckpointInfo:
    """Stage, world size, dtype, files, size, completeness of one tag folder.

    Reads the pickles of one model-states and one optimizer file (not their tensors), the ZIP
    directory of every file, which is what a truncated file loses first, and the last MiB of each.
    Resume, consolidation, export, adapter extraction and inspect all come here, so a tag that
    otherwise looks complete also has every file with a whole-file digest (--verify-checkpoints
    full) re-hashed: reading the whole checkpoint once, 0.5-0.7 s/GB from the page cache here
    (BENCHMARKS.md). A tag already found broken, and a foreign one, are not hashed.
    """
    tag_dir = Path(tag_dir)
    info = CheckpointInfo(tag=tag_dir.name, path=tag_dir)
    if not tag_dir.is_dir():
        info.problems.append(f"{tag_dir} does not exist")
        return info
    layout = _scan(tag_dir)
    info.files = sorted(p.name for p in tag_dir.iterdir() if p.is_file())
    info.bytes = sum((tag_dir / f).stat().st_size for f in info.files)
    problems = info.problems
    if is_universal_dir(tag_dir):
        problems.append(f"{tag_dir} is a DeepSpeed universal checkpoint (ds_to_universal output); read the tag it "
                        f"was made from")
        return info
    if layout.other_mp:
        problems.append(f"model/tensor-parallel files ({', '.join(layout.other_mp[:3])}) are not supported")
    if layout.unsupported:
        problems.append(f"{', '.join(layout.unsupported[:3])}: such checkpoints are not supported")
    if not layout.model_files:
        problems.append("no *_model_states.pt file")
        return info

    broken = {p for p in [*layout.model_files.values(), *layout.optim_files.values()] if not _zip_ok(p)}
    first_model = next((p for r, p in sorted(layout.model_files.items()) if p not in broken), None)
    first_optim = next((p for r, p in sorted(layout.optim_files.items()) if p not in broken), None)
    model_state = _state_or_problem(first_model, trust_pickle, problems)
    optim_state = _state_or_problem(first_optim, trust_pickle, problems)
    info.zero_stage, info.world_size = _stage_and_world(layout, model_state, optim_state)
    if model_state is not None:
        info.step = model_state.get("global_steps")
        module = model_state.get("module") or {}
        info.dtype = next((DTYPE_NAMES.get(t.dtype) for t in module.values()
                           if isinstance(t, torch.Tensor) and t.is_floating_point()), None)
        info.is_lora = any(_is_lora_key(k) for k in _param_names(model_state))
        info.num_params = _count_params(model_state, layout.zero3)

    ws = info.world_size or 1
    expected_optim = info.zero_stage not in (None, 0) or bool(layout.optim_files)
    ranks = range(ws)
    if layout.zero3:
        for r in ranks:
            if r not in layout.model_files:
                problems.append(f"rank {r}: model states file zero_pp_rank_{r}_mp_rank_00_model_states.pt is missing")
    if expected_optim:
        prefix = "bf16_" if first_optim and first_optim.name.startswith("bf16_") else ""
        for r in ranks:
            if r not in layout.optim_files:
                problems.append(f"rank {r}: optimizer file {prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt "
                                f"is missing")
    for kind, files in (("model states", layout.model_files), ("optimizer", layout.optim_files)):
        for r, p in sorted(files.items()):
            if p in broken:
                problems.append(f"rank {r}: {kind} file {p.name} is truncated or corrupt")
            elif info.world_size and r >= info.world_size:
                problems.append(f"rank {r}: {p.name} is there but the checkpoint was saved by {info.world_size} "
                                f"ranks (a leftover of another run?)")
    problems.extend(manifest_problems(tag_dir, whole_files=not problems))
    info.complete = not problems
    return info


def file_fingerprint(path: Path) -> str:
    """Size plus a hash of the last MiB: a torch zip file ends with its central directory, which
    holds the CRC-32 of every record, so this changes with any tensor's contents."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(max(0, size - (1 << 20)))
        tail = f.read()
    return f"{size}:{hashlib.sha256(tail).hexdigest()[:32]}"


def manifest_problems(tag_dir: Path, *, whole_files: bool = True) -> list[str]:
    """Files that differ from the manifest zerotrain records when it saves (none for foreign checkpoints).

    With `whole_files`, once every file passes the tail check, each file the save's background
    thread hashed whole (engine.checksums) is hashed again and compared; a file it had not reached
    when the process died keeps the tail check only.
    """
    from engine.checksums import digest_problems

    sidecar = Sidecar.read(tag_dir)
    if sidecar is None:
        return []
    problems = []
    for name, fingerprint in sidecar.files.items():
        path = tag_dir / name
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif file_fingerprint(path) != fingerprint:
            size = int(fingerprint.split(":")[0])
            what = "truncated" if path.stat().st_size < size else "not the file this checkpoint wrote (another run's?)"
            problems.append(f"{path} is {what}")
    if whole_files and not problems:
        problems = digest_problems(tag_dir, list(sidecar.files))
    return problems


def _state_or_problem(path: Path | None, trust_pickle: bool, problems: list[str]) -> dict | None:
    if path is None:
        return None
    try:
        state = _File(path, trust_pickle).state
    except ZerotrainError as e:
        problems.append(str(e))
        return None
    if not isinstance(state, dict):
        problems.append(f"{path} holds a {type(state).__name__}, not a DeepSpeed checkpoint dict")
        return None
    return state


def _zip_ok(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            size = path.stat().st_size
            return all(i.header_offset + i.compress_size <= size for i in z.infolist())
    except (zipfile.BadZipFile, OSError):
        return False


def _stage_and_world(layout: _Layout, model_state: dict | None, optim_state: dict | None
                     ) -> tuple[int | None, int | None]:
    osd = (optim_state or {}).get("optimizer_state_dict") or {}
    ds_config = (model_state or {}).get("ds_config") or (optim_state or {}).get("ds_config") or {}
    config_stage = ((ds_config.get("zero_optimization") or {}) if isinstance(ds_config, dict) else {}).get("stage")
    if layout.zero3:
        stage = 3
    elif "zero_stage" in osd:
        stage = int(getattr(osd["zero_stage"], "value", osd["zero_stage"]))
    elif isinstance(config_stage, int):
        stage = config_stage
    else:
        stage = 0 if not layout.optim_files else None
    count = osd.get("partition_count")
    if isinstance(count, (list, tuple)):
        count = max(count) if count else None
    if count is None and model_state is not None:
        count = model_state.get("dp_world_size")
    if count is None and layout.optim_files:
        count = max(layout.optim_files) + 1
    return stage, int(count) if count is not None else None


def _param_names(model_state: dict) -> list[str]:
    names = list(model_state.get("module") or {})
    for shapes in model_state.get("param_shapes") or []:
        names += list(shapes)
    names += list(model_state.get("frozen_param_shapes") or {})
    return names


def _is_lora_key(name: str) -> bool:
    return ".lora_A." in name or ".lora_embedding_A." in name


def _count_params(model_state: dict, zero3: bool) -> int:
    buffers = set(model_state.get("buffer_names") or [])
    if zero3:
        shapes = {k: v for d in model_state.get("param_shapes") or [] for k, v in d.items()}
        shapes.update(model_state.get("frozen_param_shapes") or {})
        return sum(math.prod(s) for s in shapes.values())
    aliases = _module_aliases(model_state)
    return sum(t.numel() for k, t in (model_state.get("module") or {}).items()
               if isinstance(t, torch.Tensor) and k not in buffers and k not in aliases)


def _module_aliases(model_state: dict) -> dict[str, str]:
    """Tied names: DeepSpeed's 'shared_params', and module entries that share a storage and shape."""
    aliases = dict(model_state.get("shared_params") or {})
    for name, target in tied_names(model_state.get("module") or {}).items():
        aliases.setdefault(name, target)
    return aliases


# --------------------------------------------------------------------------------------------
# Reading the weights


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
    layout = _scan(tag_dir)
    models = {r: _File(p, trust_pickle) for r, p in sorted(layout.model_files.items())}
    optims = {r: _File(p, trust_pickle) for r, p in sorted(layout.optim_files.items())}
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


def _module_sources(model: _File) -> tuple[dict[str, TensorSource], dict[str, str]]:
    """Stage 0-2: the module state dict holds every tensor in the training dtype."""
    state = model.state
    module = state.get("module")
    if not isinstance(module, dict):
        raise ZerotrainError(f"{model.path} has no 'module' state dict (not a DeepSpeed model-states file?)")
    buffers = set(state.get("buffer_names") or [])
    aliases = _module_aliases(state)
    tensors = {}
    for name, t in module.items():
        if isinstance(t, torch.Tensor) and name not in aliases:
            tensors[name] = model.source(t, "buffer" if name in buffers else "module")
    return tensors, aliases


def _flat_master_sources(model: _File, optims: dict[int, _File]) -> dict[str, TensorSource]:
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


def _slice(parts: list[tuple[_File, torch.Tensor]], start: int, numel: int, total: int) -> tuple[Piece, ...]:
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


def _stage0_master_sources(model: _File, tensors: dict[str, TensorSource], notes: list[str]) -> dict[str, TensorSource]:
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


def _match_master(model: _File, t: torch.Tensor, pos: int, candidates: list[str], taken: set[str],
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


def _zero3_sources(models: dict[int, _File], optims: dict[int, _File], world: int
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
        numel = math.prod(shape)
        part = math.ceil(numel / world)
        pieces: list[Piece] = []
        for r in range(world):
            take = min(part, numel - r * part)
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
        numel = math.prod(shape)
        part = math.ceil(numel / world)
        pieces = []
        dtype = None
        for r in range(world):
            frags = models[r].state.get("frozen_param_fragments") or {}
            if name not in frags:
                raise ZerotrainError(f"{models[r].path} lacks its slice of frozen parameter {name}")
            take = min(part, numel - r * part)
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
