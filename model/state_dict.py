"""State dicts: the names training wrappers add, reading a `.pth`/`.safetensors` file, and
checking names and shapes against a model before its weights are copied in.

Every path that puts saved weights into a model (a state-dict file, a DeepSpeed checkpoint at
--init-from) and every tool that writes a model directory checks through `check_state_dict`, so
a mismatch reads the same wherever it is found.
"""

from __future__ import annotations

import collections
import pickle
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import safetensors
import safetensors.torch
import torch

from common.errors import ZerotrainError

STATE_DICT_SUFFIXES = (".pth", ".pt", ".safetensors")

# DDP and DeepSpeed wrap the model as `module` (at the front of every name, once per wrapper);
# torch.compile as `_orig_mod`, which can sit at any depth (a compiled submodule).
WRAPPER_PREFIX = "module."
COMPILE_PART = "_orig_mod"

_MISMATCHES_LISTED = 5


def strip_wrappers(name: str) -> str:
    """Drop the `module.` (DDP/DeepSpeed) and `_orig_mod.` (torch.compile) parts of a name."""
    while name.startswith(WRAPPER_PREFIX):
        name = name[len(WRAPPER_PREFIX):]
    return ".".join(part for part in name.split(".") if part != COMPILE_PART)


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a `.pth`/`.pt` (torch.save) or `.safetensors` state dict onto the CPU, with the
    wrapper parts of its names stripped (`strip_wrappers`)."""
    path = Path(path)
    how_to = (
        "save one with torch.save(model.state_dict(), ...) or safetensors, "
        "or consolidate a DeepSpeed checkpoint with `zerotrain consolidate`"
    )
    try:
        if path.suffix == ".safetensors":
            state = safetensors.torch.load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError, safetensors.SafetensorError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ZerotrainError(f"cannot read state dict {path}: {first_line}; {how_to}.") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ZerotrainError(f"{path} is not a flat state dict {{name: tensor}}; {how_to}.")
    return {strip_wrappers(key): tensor for key, tensor in state.items()}


def check_state_dict(shapes: Mapping[str, Sequence[int]], model: torch.nn.Module, *, source: str, target: str,
                     advice: str, noun: str = "file") -> None:
    """Saved weights of these names and `shapes` must be the state dict of `model`, tied copies
    optional (one name of each tied group is enough). Else a ZerotrainError: "`source` does not
    match `target`", the first differing keys with both shapes, and `advice`.

    `model` may live on the meta device: only names and shapes are looked at. `noun` names the
    saved side in the per-key lines ("file", "checkpoint").
    """
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    # Tied names (lm_head.weight and the input embeddings) share one Parameter object.
    groups: dict[int, list[str]] = collections.defaultdict(list)
    for name, param in model.named_parameters(remove_duplicate=False):
        groups[id(param)].append(name)
    present = {k for k in expected if k in shapes}
    satisfied = {name for names in groups.values() if present & set(names) for name in names}
    problems = [f"{k}: {noun} {tuple(shapes[k])} vs model {s}" for k, s in expected.items()
                if k in shapes and tuple(shapes[k]) != s]
    problems += [f"{k}: missing from {noun} (model {s})" for k, s in expected.items()
                 if k not in shapes and k not in satisfied]
    problems += [f"{k}: {noun} {tuple(s)}, not in model" for k, s in shapes.items() if k not in expected]
    if problems:
        listed = "\n  ".join(problems[:_MISMATCHES_LISTED])
        raise ZerotrainError(
            f"{source} does not match {target} ({len(problems)} differing keys, first "
            f"{min(_MISMATCHES_LISTED, len(problems))}):\n  {listed}\n{advice}"
        )


def copy_into(model: torch.nn.Module, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Copy named tensors (checked with `check_state_dict`) into the model's parameters and
    buffers, cast to their dtype. One at a time: a caller that reads them lazily holds one tensor
    beside the model, never a second copy of it."""
    targets = model.state_dict()  # detached views of the live parameters and buffers
    for name, tensor in tensors:
        targets[name].copy_(tensor)
