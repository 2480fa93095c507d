"""A model as files in any format: reading a state-dict file (.safetensors or torch.save) or an HF
model directory as entries, and writing OUTPUT (the argument of consolidate and merge-adapter,
checked before any work) as a .pth, a .safetensors or an HF directory (save_pretrained's shards and
index), under a temporary name put in place once complete.
"""

from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from common.errors import ZerotrainError
from common.jsonio import read_json_object
from common.publish import publishing
from engine.config.precision import output_dtype
from engine.offline.pth_io import load_located, tied_names, write_pth
from engine.offline.safetensors_io import safetensors_entries, write_safetensors
from engine.offline.tensors import Entry, out_dtype, source_entries
from model.state_dict import strip_wrappers

# --------------------------------------------------------------------------------------------
# Reading


def state_dict_entries(path: str | os.PathLike, *, trust_pickle: bool = False
                       ) -> tuple[list[Entry], dict[str, str]]:
    """The tensors of a `.safetensors` or `torch.save` state-dict file, to read one at a time when
    written, and its tied names (a `torch.save` file's entries sharing one storage); wrapper
    prefixes (module., _orig_mod.) stripped."""
    path = Path(path)
    if not path.is_file():
        raise ZerotrainError(f"{path} does not exist")
    if path.suffix == ".safetensors":
        return [Entry(strip_wrappers(e.name), e.shape, e.dtype, e.produce) for e in safetensors_entries(path)], {}
    state, locator = load_located(path, trust_pickle=trust_pickle)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ZerotrainError(f"{path} is not a flat state dict {{name: tensor}}")
    aliases = tied_names(state)
    tensors = {strip_wrappers(k): locator.source(t) for k, t in state.items() if k not in aliases}
    return source_entries(tensors), {strip_wrappers(k): strip_wrappers(v) for k, v in aliases.items()}


def model_entries(path: Path, *, trust_pickle: bool = False) -> tuple[list[Entry], dict[str, str]]:
    """The tensors of a model, as `state_dict_entries` gives them: an HF directory (safetensors or
    pytorch_model.bin, sharded or not) or one .safetensors / .pth file."""
    if path.is_file():
        return state_dict_entries(path, trust_pickle=trust_pickle)
    if not path.is_dir():
        raise ZerotrainError(f"base model {path} does not exist")
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (path / index_name).is_file():
            files = list(dict.fromkeys(read_json_object(path / index_name).get("weight_map", {}).values()))
        elif (path / single).is_file():
            files = [single]
        else:
            continue
        entries: dict[str, Entry] = {}
        aliases: dict[str, str] = {}
        for f in files:
            e, a = state_dict_entries(path / f, trust_pickle=trust_pickle)
            entries.update((x.name, x) for x in e)
            aliases.update(a)
        return list(entries.values()), aliases
    raise ZerotrainError(f"{path} holds no model weights (model.safetensors[.index.json] or pytorch_model.bin)")


# --------------------------------------------------------------------------------------------
# Writing


def parse_size(size: str | int) -> int:
    """'5GB' -> 5 * 10**9 bytes; also KB/MB/TB, KiB/MiB/GiB/TiB and plain byte counts."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), flags=re.IGNORECASE)
    if not m:
        raise ZerotrainError(f"--max-shard-size {size!r} is not a size such as 5GB, 500MB or 2GiB")
    unit = (m.group(2) or "B").upper()
    power = "BKMGT".index(unit[0])
    value = float(m.group(1)) * ((1024 if "I" in unit else 1000) ** power)
    if value < 1:
        raise ZerotrainError(f"--max-shard-size {size!r} must be positive")
    return int(value)


def write_hf_dir(entries: list[Entry], out_dir: Path, target: torch.dtype | None, max_shard_size: int) -> int:
    """Safetensors shards of at most `max_shard_size` bytes (a larger tensor gets a shard of its
    own) and, when there is more than one, model.safetensors.index.json, as save_pretrained names them."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        nbytes = e.numel * out_dtype(e.dtype, target).itemsize
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += nbytes
    total = 0
    weight_map = {}
    for i, shard in enumerate(shards):
        name = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        total += write_safetensors(shard, out_dir / name, target)
        weight_map.update({e.name: name for e in shard})
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return total


def output_kind(output: Path) -> str:
    """pth, safetensors or dir (an HF directory): what an OUTPUT path asks for."""
    if output.suffix == ".pth":
        return "pth"
    if output.suffix == ".safetensors":
        return "safetensors"
    if output.suffix in (".pt", ".bin", ".ckpt"):
        raise ZerotrainError(f"output {output}: use a .pth or .safetensors file name, or a directory name "
                             f"(HF format)")
    return "dir"


def refuse_existing(output: Path, overwrite: bool) -> None:
    """An OUTPUT that exists is replaced only with --overwrite; the commands check before any work."""
    if output.exists() and not overwrite:
        raise ZerotrainError(f"{output} already exists; remove it, choose another path, or pass --overwrite")


@contextmanager
def staged(output: Path, overwrite: bool, is_dir: bool) -> Iterator[Path]:
    """A temporary path beside `output`, put in place of `output` only if the body succeeds."""
    refuse_existing(output, overwrite)
    with publishing(output, directory=is_dir) as tmp:
        yield tmp


def write_output(entries: list[Entry], aliases: dict[str, str], output: Path, kind: str, target: torch.dtype | None,
                 max_shard_size: int, overwrite: bool, extras: Callable[[Path], None] | None = None) -> int:
    """Write the entries as `output` of `kind` (`output_kind`; a .pth keeps the tied `aliases`) and,
    in an HF directory, what `extras(directory)` adds; returns the bytes of tensor data written.
    On any error nothing is left behind."""
    with staged(output, overwrite, is_dir=kind == "dir") as tmp:
        if kind == "pth":
            return write_pth(entries, aliases, tmp, target)
        if kind == "safetensors":
            return write_safetensors(entries, tmp, target)
        total = write_hf_dir(entries, tmp, target, max_shard_size)
        if extras is not None:
            extras(tmp)
        return total


@dataclass
class Written:
    """What a consolidate / extract / merge wrote."""

    output: Path
    tensors: int
    params: int
    bytes: int
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class OutputPlan:
    """An OUTPUT argument, checked before any work is done."""

    path: Path
    kind: str
    """pth, safetensors or dir (an HF directory)."""
    target: torch.dtype | None
    """The dtype floating-point weights are written in; None: each in its own."""
    shard_bytes: int
    """An HF directory's largest shard."""
    overwrite: bool

    def write(self, entries: list[Entry], aliases: dict[str, str],
              extras: Callable[[Path], None] | None = None) -> int:
        """Write the entries (a .pth keeps the tied `aliases`) and, in an HF directory, what
        `extras(directory)` adds; returns the bytes of tensor data written."""
        return write_output(entries, aliases, self.path, self.kind, self.target, self.shard_bytes, self.overwrite,
                            extras)


def plan_output(output: str, dtype: str, max_shard_size: str | int, overwrite: bool) -> OutputPlan:
    """The OutputPlan of OUTPUT, --dtype, --max-shard-size and --overwrite."""
    out = Path(output)
    kind = output_kind(out)
    target = output_dtype(dtype)
    shard_bytes = parse_size(max_shard_size)
    refuse_existing(out, overwrite)
    return OutputPlan(out, kind, target, shard_bytes, overwrite)
