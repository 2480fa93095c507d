"""What a DeepSpeed checkpoint tag folder holds, found without DeepSpeed's engine and without
reading tensor data: the pickle allowlist, the files each ZeRO stage writes, stage, world size,
dtype, completeness, and the manifest zerotrain records. Works on the checkpoints of any DeepSpeed
program (zerotrain, HF Trainer's `checkpoint-N/global_stepN`, DeepSpeed-Chat, a plain
`deepspeed.initialize` script); engine.offline.ds_weights reads the weights.

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
from engine.checkpoint.run_dir import is_universal_dir
from engine.checkpoint.sidecar import Sidecar
from engine.config.precision import DTYPE_NAMES
from engine.offline.peft_names import is_lora_matrix
from engine.offline.pth_io import load_located, tied_names, torch_load
from engine.offline.tensors import Piece, TensorSource

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


class ShardFile:
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
class Layout:
    model_files: dict[int, Path]  # rank -> file (stage 3: one per rank; else rank 0 only)
    optim_files: dict[int, Path]
    zero3: bool
    other_mp: list[str]
    unsupported: list[str]


def scan_layout(tag_dir: Path) -> Layout:
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
    return Layout(model, optim, zero3, other_mp, unsupported)


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
    layout = scan_layout(tag_dir)
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
        info.is_lora = any(is_lora_matrix(k) for k in _param_names(model_state))
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
    thread hashed whole (engine.checkpoint.checksums) is hashed again and compared; a file it had not reached
    when the process died keeps the tail check only.
    """
    from engine.checkpoint.checksums import digest_problems

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
        state = ShardFile(path, trust_pickle).state
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


def _stage_and_world(layout: Layout, model_state: dict | None, optim_state: dict | None
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


def _count_params(model_state: dict, zero3: bool) -> int:
    buffers = set(model_state.get("buffer_names") or [])
    if zero3:
        shapes = {k: v for d in model_state.get("param_shapes") or [] for k, v in d.items()}
        shapes.update(model_state.get("frozen_param_shapes") or {})
        return sum(math.prod(s) for s in shapes.values())
    aliases = module_aliases(model_state)
    return sum(t.numel() for k, t in (model_state.get("module") or {}).items()
               if isinstance(t, torch.Tensor) and k not in buffers and k not in aliases)


def module_aliases(model_state: dict) -> dict[str, str]:
    """Tied names: DeepSpeed's 'shared_params', and module entries that share a storage and shape."""
    aliases = dict(model_state.get("shared_params") or {})
    for name, target in tied_names(model_state.get("module") or {}).items():
        aliases.setdefault(name, target)
    return aliases
