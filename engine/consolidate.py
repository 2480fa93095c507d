"""DeepSpeed checkpoint -> one `.pth`, one `.safetensors`, or an HF model directory; LoRA adapters
pulled out of checkpoints (PEFT format) and merged into base models; `inspect` of a checkpoint dir.

Everything streams: a tensor is read from the shards (engine.ds_checkpoint), converted and written
before the next is read, so memory holds one tensor, never the model. Output goes to a temporary
name next to OUTPUT and is renamed into place once complete; on any error nothing is left behind.

Tied weights: a `.pth` keeps both names over one storage (it loads strictly into the model,
`lm_head.weight` included); `.safetensors` files and HF directories leave the tied copy out, as
`save_pretrained` does.
"""

from __future__ import annotations

import collections
import io
import json
import math
import pickle
import re
import shutil
import struct
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch.utils.serialization import config as serialization_config

from engine.ds_checkpoint import (DTYPE_NAMES, Checkpoint, CheckpointInfo, TensorSource, describe, list_tags,
                                  load_checkpoint, resolve_tag, state_dict_sources)
from common.errors import ZerotrainError
from common.publish import publishing
from engine.run_dir import SIDECAR, RunDir, is_checkpoint_dir, is_tag_dir, resolve
from model.state_dict import check_state_dict

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")
PEFT_PREFIX = "base_model.model."


@dataclass
class Entry:
    """One output tensor: its name, shape, the dtype it comes in, and how to make it.

    `produce(into)` returns the tensor; `into`, when not None, is a buffer of that shape and dtype
    it may fill and return instead of allocating.
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[torch.Tensor | None], torch.Tensor]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _entries(tensors: dict[str, TensorSource]) -> list[Entry]:
    return [Entry(name, src.shape, src.dtype, src.read) for name, src in tensors.items()]


class _Scratch:
    """Two buffers sized for the largest tensor, one to read into and one to convert into, reused
    for every tensor. (A fresh allocation per tensor fragments the heap, and RSS creeps up.)"""

    def __init__(self, entries: list[Entry], target: torch.dtype | None) -> None:
        casts = [e for e in entries if _out_dtype(e.dtype, target) != e.dtype]
        self.read = torch.empty(max((e.numel * e.dtype.itemsize for e in entries), default=0), dtype=torch.uint8)
        self.cast = torch.empty(max((e.numel * target.itemsize for e in casts), default=0), dtype=torch.uint8)

    @staticmethod
    def view(buf: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        return buf[:math.prod(shape) * dtype.itemsize].view(dtype).view(shape)


@dataclass
class Written:
    """What a consolidate / extract / merge wrote."""

    output: Path
    tensors: int
    params: int
    bytes: int
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Output writers


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


def _out_dtype(dtype: torch.dtype, target: torch.dtype | None) -> torch.dtype:
    return target if target is not None and dtype.is_floating_point else dtype


def _materialize(entry: Entry, target: torch.dtype | None, scratch: _Scratch) -> torch.Tensor:
    """The entry's tensor in its output dtype, in the scratch buffers where it can be; valid until
    the next call."""
    t = entry.produce(scratch.view(scratch.read, entry.dtype, entry.shape))
    if tuple(t.shape) != entry.shape:
        raise ZerotrainError(f"internal error: {entry.name} came out {tuple(t.shape)}, expected {entry.shape}")
    dtype = _out_dtype(t.dtype, target)
    if dtype != t.dtype:
        out = scratch.view(scratch.cast, dtype, entry.shape) if dtype == target and entry.dtype == t.dtype \
            else torch.empty(entry.shape, dtype=dtype)
        t = out.copy_(t)
    return t.contiguous()


def _as_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def write_safetensors(entries: list[Entry], path: Path, target: torch.dtype | None,
                      metadata: dict[str, str] | None = None) -> int:
    """Write one safetensors file, tensor by tensor (the header is known from the shapes)."""
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for e in entries:
        dtype = _out_dtype(e.dtype, target)
        if dtype not in SAFETENSORS_DTYPES:
            raise ZerotrainError(f"{e.name}: dtype {dtype} cannot be stored in safetensors")
        nbytes = e.numel * dtype.itemsize
        header[e.name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(e.shape),
                          "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    scratch = _Scratch(entries, target)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for e in entries:
            f.write(_as_bytes(_materialize(e, target, scratch)))
    return offset


class _StorageRef:
    def __init__(self, key: str, dtype: torch.dtype, numel: int) -> None:
        self.key, self.dtype, self.numel = key, dtype, numel


class _TensorRef:
    """Pickles as a tensor over a storage whose bytes are written afterwards (as torch.save does)."""

    def __init__(self, storage: _StorageRef, shape: tuple[int, ...]) -> None:
        self.storage, self.shape = storage, shape

    def __reduce_ex__(self, protocol: int) -> tuple:
        stride = tuple(math.prod(self.shape[i + 1:]) for i in range(len(self.shape)))
        return (torch._utils._rebuild_tensor_v2,
                (self.storage, 0, tuple(self.shape), stride, False, collections.OrderedDict()))


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> tuple | None:
        if isinstance(obj, _StorageRef):
            storage_type = getattr(torch, torch.storage._dtype_to_storage_type_map()[obj.dtype])
            return ("storage", storage_type, obj.key, "cpu", obj.numel)
        return None


def write_pth(entries: list[Entry], aliases: dict[str, str], path: Path, target: torch.dtype | None) -> int:
    """Write a `torch.save`-format state dict (loads with torch.load(weights_only=True)) tensor by
    tensor; tied names share their target's storage."""
    refs: dict[str, _TensorRef] = {}
    for i, e in enumerate(entries):
        refs[e.name] = _TensorRef(_StorageRef(str(i), _out_dtype(e.dtype, target), e.numel), e.shape)
    state = dict(refs)
    for alias, name in aliases.items():
        if name in refs:
            state[alias] = refs[name]
    data = io.BytesIO()
    _Pickler(data, protocol=2).dump(state)
    alignment = serialization_config.save.storage_alignment
    total = 0
    scratch = _Scratch(entries, target)
    with open(path, "wb") as f:
        writer = torch._C.PyTorchFileWriter(f, torch.serialization.get_crc32_options(), alignment)
        try:
            writer.write_record("data.pkl", data.getvalue(), len(data.getvalue()))
            writer.write_record(".format_version", "1", 1)
            writer.write_record(".storage_alignment", str(alignment), len(str(alignment)))
            writer.write_record("byteorder", "little", len("little"))
            for i, e in enumerate(entries):
                t = _materialize(e, target, scratch)
                nbytes = t.numel() * t.element_size()
                writer.write_record(f"data/{i}", t.data_ptr(), nbytes)
                total += nbytes
            writer.write_end_of_file()
        finally:
            del writer  # its destructor writes to f, so it must go before f closes (else: abort)
    return total


def write_hf_dir(entries: list[Entry], out_dir: Path, target: torch.dtype | None, max_shard_size: int) -> int:
    """Safetensors shards of at most `max_shard_size` bytes (a larger tensor gets a shard of its
    own) and, when there is more than one, model.safetensors.index.json, as save_pretrained names them."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        nbytes = e.numel * _out_dtype(e.dtype, target).itemsize
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


@contextmanager
def _staged(output: Path, overwrite: bool, is_dir: bool) -> Iterator[Path]:
    """A temporary path beside `output`, put in place of `output` only if the body succeeds."""
    if output.exists() and not overwrite:
        raise ZerotrainError(f"{output} already exists; remove it, choose another path, or pass --overwrite")
    with publishing(output, directory=is_dir) as tmp:
        yield tmp


def _output_kind(output: Path) -> str:
    if output.suffix == ".pth":
        return "pth"
    if output.suffix == ".safetensors":
        return "safetensors"
    if output.suffix in (".pt", ".bin", ".ckpt"):
        raise ZerotrainError(f"output {output}: use a .pth or .safetensors file name, or a directory name "
                             f"(HF format)")
    return "dir"


def _write(entries: list[Entry], aliases: dict[str, str], output: Path, kind: str, target: torch.dtype | None,
           max_shard_size: int, overwrite: bool, extras: Callable[[Path], None] | None = None) -> int:
    with _staged(output, overwrite, is_dir=kind == "dir") as tmp:
        if kind == "pth":
            return write_pth(entries, aliases, tmp, target)
        if kind == "safetensors":
            return write_safetensors(entries, tmp, target)
        total = write_hf_dir(entries, tmp, target, max_shard_size)
        if extras is not None:
            extras(tmp)
        return total


# --------------------------------------------------------------------------------------------
# LoRA


_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_embedding_A|lora_embedding_B|lora_A|lora_B)"
                       r"\.(?P<adapter>[^.]+)(?P<suffix>\.weight)?$")
# The same in a PEFT adapter file, where the adapter name is left out.
_ADAPTER_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_embedding_A|lora_embedding_B|lora_A|lora_B)"
                               r"(?P<suffix>\.weight)?$")
_SAVED = re.compile(r"^(?P<module>.+)\.modules_to_save\.(?P<adapter>[^.]+)\.(?P<rest>.+)$")
_ORIGINAL = re.compile(r"^(?P<module>.+)\.original_module\.(?P<rest>.+)$")


@dataclass
class LoraSettings:
    """What the shards do not say about a LoRA adapter: its alpha and the rest of its PEFT config."""

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


def lora_settings(ckpt_root: Path | None, ckpt: Checkpoint | None, *, lora_alpha: float | None = None,
                  adapter_config: str | None = None) -> LoraSettings | None:
    """LoRA settings from --adapter-config FILE, else the run's saved config (zerotrain.json), else an
    adapter_config.json in the checkpoint dir (HF Trainer); --lora-alpha overrides the alpha."""
    config: dict[str, Any] | None = None
    source = ""
    if adapter_config:
        path = Path(adapter_config)
        path = path / "adapter_config.json" if path.is_dir() else path
        if not path.is_file():
            raise ZerotrainError(f"--adapter-config {adapter_config}: no such file")
        config, source = _read_json(path), str(path)
    elif ckpt is not None and ckpt.sidecar is not None and ckpt.sidecar.lora:
        config, source = dict(ckpt.sidecar.lora), str(ckpt.info.path / SIDECAR)
    elif ckpt_root is not None and (ckpt_root / "adapter_config.json").is_file():
        config, source = _read_json(ckpt_root / "adapter_config.json"), str(ckpt_root / "adapter_config.json")
    if lora_alpha is not None:
        config = dict(config or {}, lora_alpha=lora_alpha)
        source = source or "--lora-alpha"
    if config is None:
        return None
    if config.get("lora_alpha") is None:
        raise ZerotrainError(f"{source} has no lora_alpha; pass --lora-alpha")
    return LoraSettings(lora_alpha=float(config["lora_alpha"]), use_rslora=bool(config.get("use_rslora", False)),
                        alpha_pattern=dict(config.get("alpha_pattern") or {}),
                        fan_in_fan_out=config.get("fan_in_fan_out"), config=config, source=source)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ZerotrainError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise ZerotrainError(f"{path}: expected a JSON object")
    return data


def _strip_peft(name: str) -> str:
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


def fold_lora(entries: list[Entry], aliases: dict[str, str], settings: LoraSettings
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
            saved.add(_strip_peft(new))
        else:
            new = name.replace(".base_layer.", ".")
        new = _strip_peft(new)
        module = name[:-len(".weight")].removesuffix(".base_layer") if name.endswith(".weight") else None
        if module in modules:
            e = _folded(new, e, modules[module], settings.alpha_for(_strip_peft(module)), settings.use_rslora, flip)
        if new in out and new not in saved:
            raise ZerotrainError(f"two checkpoint tensors map to {new} after folding LoRA; pass --keep-lora-keys")
        if new in out and _SAVED.match(name) is None:
            continue  # the modules_to_save copy wins over the original
        out[new] = Entry(new, e.shape, e.dtype, e.produce)
    missing = [m for m in modules if not any(k in by_name for k in (f"{m}.base_layer.weight", f"{m}.weight"))]
    if missing:
        raise ZerotrainError(f"the checkpoint has LoRA matrices for {missing[0]} but not its base weight (saved "
                             f"with exclude_frozen_parameters?); extract the adapter with `zerotrain "
                             f"extract-adapter` and merge it into the base model with `zerotrain merge-adapter`")
    new_aliases = {}
    for alias, target in aliases.items():
        if _ORIGINAL.match(alias) or _LORA_KEY.match(alias):
            continue
        a, t = _strip_peft(alias.replace(".base_layer.", ".")), _strip_peft(target.replace(".base_layer.", "."))
        if t in out and a not in out:
            new_aliases[a] = t
    return list(out.values()), new_aliases


def _fan_in_fan_out(modules: dict[str, _LoraModule], by_name: dict[str, Entry], settings: LoraSettings) -> bool:
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

    return Entry(name, base.shape, torch.float32 if base.dtype.is_floating_point else base.dtype, produce)


# --------------------------------------------------------------------------------------------
# Model config and tokenizer for HF directories


def _embedding_rows(entries: list[Entry], suffixes: tuple[str, ...]) -> int | None:
    return next((e.shape[0] for e in entries if e.name.endswith(suffixes)), None)


def _load_config_json(path: Path):
    from transformers import AutoConfig

    data = _read_json(path)
    if "model_type" not in data:
        raise ZerotrainError(f"{path} has no model_type; pass a transformers config.json")
    try:
        return AutoConfig.for_model(**data)
    except (ValueError, KeyError, TypeError) as e:
        raise ZerotrainError(f"{path} is not a transformers config: {e}") from None


def _preset_config(preset: str, entries: list[Entry]):
    from model.presets import preset_config

    vocab = _embedding_rows(entries, ("embed_tokens.weight", "wte.weight"))
    positions = _embedding_rows(entries, ("wpe.weight",))
    return preset_config(preset, vocab_size=vocab, max_seq_len=positions), f"preset {preset!r}"


def find_model_config(ckpt_root: Path, ckpt: Checkpoint | None, entries: list[Entry], *,
                      config: str | None = None, preset: str | None = None, default_preset: str | None = None):
    """The transformers config for an HF directory, and where it came from: --config, --preset, the
    checkpoint dir's config.json (HF Trainer), the tag's zerotrain.json, the run dir's config.json,
    and last `default_preset` (a training run's --preset, for a checkpoint that carries no config)."""
    if config:
        path = Path(config)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise ZerotrainError(f"--config {config}: no such file")
        return _load_config_json(path), str(path)
    if preset:
        return _preset_config(preset, entries)
    if (ckpt_root / "config.json").is_file():
        return _load_config_json(ckpt_root / "config.json"), str(ckpt_root / "config.json")
    model_config = ckpt.sidecar.model_config if ckpt and ckpt.sidecar else None
    if model_config and "model_type" in model_config:
        from transformers import AutoConfig

        return AutoConfig.for_model(**model_config), str(ckpt.info.path / SIDECAR)
    if (ckpt_root.parent / "config.json").is_file():
        return _load_config_json(ckpt_root.parent / "config.json"), str(ckpt_root.parent / "config.json")
    if default_preset:
        return _preset_config(default_preset, entries)
    return None, ""


def _check_against_config(entries: list[Entry], model_config, where: str) -> None:
    """The entries must be the state dict of the model `model_config` builds (tied copies optional);
    `where` says where the config came from."""
    from model.build import build_from_config

    with torch.device("meta"):
        model = build_from_config(model_config, where)
    check_state_dict({e.name: e.shape for e in entries}, model, source="the checkpoint",
                     target=f"the model config from {where}", advice="Pass the right one with --config or --preset.",
                     noun="checkpoint")


def _tokenizer_source(ckpt_root: Path, ckpt: Checkpoint | None) -> Path | None:
    candidates = [ckpt_root, ckpt_root.parent / "tokenizer"]
    path = ckpt.sidecar.tokenizer if ckpt and ckpt.sidecar else None
    if path:
        candidates.append(Path(path))
    for c in candidates:
        if (c.is_file() and c.suffix == ".model") or _is_tokenizer_dir(c):
            return c
    return None


def _is_tokenizer_dir(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json",
                                                              "tokenizer.model"))


def _write_extras(out: Path, model_config, target: torch.dtype | None, entries: list[Entry],
                  generation_dir: Path | None, tokenizer: Path | None) -> None:
    from transformers import GenerationConfig

    names = {e.name for e in entries}
    if getattr(model_config, "tie_word_embeddings", False) and "lm_head.weight" in names:
        # A trained copy of lm_head (LoRA modules_to_save) no longer equals the embeddings.
        model_config.tie_word_embeddings = False
    dtype = target or next((e.dtype for e in entries if e.dtype.is_floating_point), torch.float32)
    model_config.dtype = dtype
    model_config.save_pretrained(out)
    if generation_dir is not None and (generation_dir / "generation_config.json").is_file():
        shutil.copy2(generation_dir / "generation_config.json", out / "generation_config.json")
    else:
        GenerationConfig.from_model_config(model_config).save_pretrained(out)
    if tokenizer is not None and tokenizer.is_file():
        from model.tokenizer import load_tokenizer

        load_tokenizer(str(tokenizer)).save_pretrained(out)
    elif tokenizer is not None:
        for name in TOKENIZER_FILES:
            if (tokenizer / name).is_file():
                shutil.copy2(tokenizer / name, out / name)


# --------------------------------------------------------------------------------------------
# The commands


def _output_plan(output: str, dtype: str, max_shard_size: str | int, overwrite: bool):
    """(path, kind, target dtype, shard bytes) of an OUTPUT argument, checked before any work."""
    out = Path(output)
    kind = _output_kind(out)
    target = _dtype(dtype)
    shard_bytes = parse_size(max_shard_size)
    if out.exists() and not overwrite:
        raise ZerotrainError(f"{out} already exists; remove it, choose another path, or pass --overwrite")
    return out, kind, target, shard_bytes


def consolidate(ckpt_dir: str, output: str, *, tag: str | None = None, dtype: str = "fp32",
                max_shard_size: str | int = "5GB", keep_lora_keys: bool = False, lora_alpha: float | None = None,
                adapter_config: str | None = None, config: str | None = None, preset: str | None = None,
                default_preset: str | None = None,
                trust_pickle: bool = False, overwrite: bool = False) -> Written:
    """Write the weights of one checkpoint tag as OUTPUT (.pth, .safetensors or an HF directory)."""
    out, kind, target, shard_bytes = _output_plan(output, dtype, max_shard_size, overwrite)
    tag_dir = resolve_tag(ckpt_dir, tag)
    ckpt_root = tag_dir.parent
    ckpt = load_checkpoint(tag_dir, trust_pickle=trust_pickle)
    entries, aliases = _entries(ckpt.tensors), dict(ckpt.aliases)
    notes = list(ckpt.notes)
    if ckpt.info.is_lora and not keep_lora_keys:
        settings = lora_settings(ckpt_root, ckpt, lora_alpha=lora_alpha, adapter_config=adapter_config)
        if settings is None:
            raise ZerotrainError(f"{tag_dir} is a LoRA checkpoint and its lora_alpha is unknown (no zerotrain.json "
                                 f"or adapter_config.json beside it): pass --lora-alpha A or --adapter-config FILE "
                                 f"to fold the adapter into the weights, or --keep-lora-keys to keep the raw keys")
        entries, aliases = fold_lora(entries, aliases, settings)
        notes.append(f"LoRA folded into the base weights (alpha from {settings.source})")
    extras = None
    if kind == "dir":
        if keep_lora_keys and ckpt.info.is_lora:
            raise ZerotrainError("--keep-lora-keys keeps PEFT's key names, which an HF model directory cannot hold; "
                                 "write a .pth or .safetensors file instead")
        model_config, where = find_model_config(ckpt_root, ckpt, entries, config=config, preset=preset,
                                                default_preset=default_preset)
        if model_config is None:
            raise ZerotrainError(f"no model config for {tag_dir} (no config.json beside the checkpoint, no "
                                 f"zerotrain.json): pass --config CONFIG_JSON or --preset NAME to write an HF "
                                 f"directory, or write a .pth / .safetensors file")
        _check_against_config(entries, model_config, where)
        tokenizer = _tokenizer_source(ckpt_root, ckpt)
        if tokenizer is None:
            notes.append("no tokenizer found beside the checkpoint; copy one into the directory")
        generation_dir = ckpt_root if (ckpt_root / "generation_config.json").is_file() else ckpt_root.parent
        extras = lambda d: _write_extras(d, model_config, target, entries, generation_dir, tokenizer)  # noqa: E731
    total = _write(entries, aliases, out, kind, target, shard_bytes, overwrite, extras)
    params = sum(e.numel for e in entries)
    return Written(out, len(entries), params, total, notes)


def _dtype(name: str) -> torch.dtype | None:
    if name == "auto":
        return None
    if name not in DTYPES:
        raise ZerotrainError(f"--dtype {name!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


def extract_adapter(ckpt_dir: str, out_dir: str, *, tag: str | None = None, lora_alpha: float | None = None,
                    adapter_config: str | None = None, dtype: str = "fp32", trust_pickle: bool = False,
                    overwrite: bool = False) -> Written:
    """Write the LoRA adapter of a checkpoint in PEFT format (adapter_model.safetensors + adapter_config.json)."""
    out = Path(out_dir)
    target = _dtype(dtype)
    if out.exists() and not overwrite:
        raise ZerotrainError(f"{out} already exists; remove it, choose another path, or pass --overwrite")
    tag_dir = resolve_tag(ckpt_dir, tag)
    ckpt = load_checkpoint(tag_dir, trust_pickle=trust_pickle)
    if not ckpt.info.is_lora:
        raise ZerotrainError(f"{tag_dir} holds no LoRA weights (no lora_A keys); nothing to extract")
    settings = lora_settings(tag_dir.parent, ckpt, lora_alpha=lora_alpha, adapter_config=adapter_config)
    if settings is None:
        raise ZerotrainError(f"the lora_alpha of {tag_dir} is unknown (no zerotrain.json or adapter_config.json "
                             f"beside it): pass --lora-alpha A or --adapter-config FILE")
    entries = _entries(ckpt.tensors)
    modules, _ = _lora_modules(entries)
    adapter_entries: list[Entry] = []
    saved_modules: list[str] = []
    for e in entries:
        if m := _LORA_KEY.match(e.name):
            name = f"{m.group('module')}.{m.group('kind')}{m.group('suffix') or ''}"
        elif m := _SAVED.match(e.name):
            name = f"{m.group('module')}.{m.group('rest')}"
            saved_modules.append(_strip_peft(m.group("module")))
        else:
            continue
        name = PEFT_PREFIX + _strip_peft(name)
        adapter_entries.append(Entry(name, e.shape, e.dtype, e.produce))
    peft_config = _adapter_config(modules, entries, settings, list(dict.fromkeys(saved_modules)))

    from peft import LoraConfig

    known = set(LoraConfig.__dataclass_fields__)
    with _staged(out, overwrite, is_dir=True) as tmp:
        total = write_safetensors(adapter_entries, tmp / "adapter_model.safetensors", target)
        LoraConfig(**{k: v for k, v in peft_config.items() if k in known}).save_pretrained(str(tmp))
    params = sum(e.numel for e in adapter_entries)
    return Written(out, len(adapter_entries), params, total, [f"lora_alpha from {settings.source}"])


def _adapter_config(modules: dict[str, _LoraModule], entries: list[Entry], settings: LoraSettings,
                    saved_modules: list[str]) -> dict[str, Any]:
    """PEFT config: rank and target modules from the shards, the rest from the saved settings."""
    paths = {_strip_peft(m): mod.a.shape[0] for m, mod in modules.items()}
    leaves = {p.rsplit(".", 1)[-1] for p in paths}
    all_modules = set()
    for e in entries:
        if not (_LORA_KEY.match(e.name) or _SAVED.match(e.name) or _ORIGINAL.match(e.name)):
            all_modules.add(_strip_peft(e.name.replace(".base_layer.", ".")).rsplit(".", 1)[0])
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


def merge_adapter(base: str, adapter: str, output: str, *, dtype: str = "auto", max_shard_size: str | int = "5GB",
                  trust_pickle: bool = False, overwrite: bool = False) -> Written:
    """Fold a PEFT LoRA adapter into a base model (HF dir or .pth/.safetensors), tensor by tensor."""
    out, kind, target, shard_bytes = _output_plan(output, dtype, max_shard_size, overwrite)
    # run directories stand for what their final/ holds: RUN/final (base), RUN/final/adapter
    base_path = resolve(base, ("hf", "weights", "state_dict"), "BASE").path
    adapter_path = resolve(adapter, ("adapter",), "ADAPTER").path
    base_tensors, base_aliases = _model_sources(base_path, trust_pickle)
    config_file = adapter_path / "adapter_config.json"
    settings = lora_settings(None, None, adapter_config=str(config_file))
    if settings.config.get("peft_type", "LORA") != "LORA" or settings.config.get("use_dora"):
        raise ZerotrainError(f"{config_file}: only plain LoRA adapters can be merged (peft_type "
                             f"{settings.config.get('peft_type')}, use_dora {settings.config.get('use_dora')})")
    weights = next((adapter_path / n for n in ("adapter_model.safetensors", "adapter_model.bin")
                    if (adapter_path / n).is_file()), None)
    if weights is None:
        raise ZerotrainError(f"{adapter_path} has no adapter_model.safetensors or adapter_model.bin")
    adapter_tensors, _ = state_dict_sources(weights, trust_pickle=trust_pickle)

    merged: dict[str, Entry] = {e.name: e for e in _entries(base_tensors)}
    lora: list[Entry] = []
    replaced = 0
    for e in _entries(adapter_tensors):
        name = _strip_peft(e.name)
        m = _ADAPTER_LORA_KEY.match(name)
        if m:
            name = f"{m.group('module')}.{m.group('kind')}.default{m.group('suffix') or ''}"
            lora.append(Entry(name, e.shape, e.dtype, e.produce))
            continue
        if name in merged and merged[name].shape != e.shape:
            raise ZerotrainError(f"adapter tensor {e.name} has shape {e.shape}, the base's {merged[name].shape}")
        merged[name] = Entry(name, e.shape, e.dtype, e.produce)  # modules_to_save: the trained copy wins
        base_aliases.pop(name, None)
        replaced += 1
    if not lora and not replaced:
        raise ZerotrainError(f"{weights} holds no LoRA weights")
    missing = [e.name for e in lora if _LORA_KEY.match(e.name).group("module") + ".weight" not in merged]
    if missing:
        raise ZerotrainError(f"the adapter targets {_LORA_KEY.match(missing[0]).group('module')}, which the base "
                             f"model {base_path} does not have; is it the adapter's base model?")
    entries, aliases = fold_lora(list(merged.values()) + lora, base_aliases, settings)
    if target is None:  # keep each base tensor's dtype: folded weights go back to their base's
        base_dtypes = {name: src.dtype for name, src in base_tensors.items()}
        entries = [_cast_to(e, base_dtypes.get(e.name)) for e in entries]
    extras = None
    if kind == "dir":
        config_dir = base_path if base_path.is_dir() else base_path.parent
        if not (config_dir / "config.json").is_file():
            raise ZerotrainError(f"no config.json beside {base_path}: an HF directory output needs one; "
                                 f"write a .pth or .safetensors file instead")
        model_config = _load_config_json(config_dir / "config.json")
        _check_against_config(entries, model_config, str(config_dir / "config.json"))
        tokenizer = adapter_path if _is_tokenizer_dir(adapter_path) else _tokenizer_source(config_dir, None)
        extras = lambda d: _write_extras(d, model_config, target, entries, config_dir, tokenizer)  # noqa: E731
    total = _write(entries, aliases, out, kind, target, shard_bytes, overwrite, extras)
    return Written(out, len(entries), sum(e.numel for e in entries), total,
                   [f"{len(lora) // 2} LoRA pairs folded, {replaced} modules_to_save tensors replaced"])


def _cast_to(e: Entry, dtype: torch.dtype | None) -> Entry:
    if dtype is None or dtype == e.dtype or not e.dtype.is_floating_point:
        return e
    return Entry(e.name, e.shape, dtype, lambda into=None: e.produce(None).to(dtype))


def _model_sources(path: Path, trust_pickle: bool) -> tuple[dict[str, TensorSource], dict[str, str]]:
    """The tensors of a model: an HF directory (safetensors or pytorch_model.bin, sharded or not) or
    one .safetensors / .pth file."""
    if path.is_file():
        return state_dict_sources(path, trust_pickle=trust_pickle)
    if not path.is_dir():
        raise ZerotrainError(f"base model {path} does not exist")
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (path / index_name).is_file():
            files = list(dict.fromkeys(_read_json(path / index_name).get("weight_map", {}).values()))
        elif (path / single).is_file():
            files = [single]
        else:
            continue
        tensors: dict[str, TensorSource] = {}
        aliases: dict[str, str] = {}
        for f in files:
            t, a = state_dict_sources(path / f, trust_pickle=trust_pickle)
            tensors.update(t)
            aliases.update(a)
        return tensors, aliases
    raise ZerotrainError(f"{path} holds no model weights (model.safetensors[.index.json] or pytorch_model.bin)")


def inspect(ckpt_dir: str, *, trust_pickle: bool = False) -> tuple[str | None, list[CheckpointInfo]]:
    """`latest` (or None) and the description of every tag in a checkpoint dir (or of one tag folder)."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        raise ZerotrainError(f"checkpoint directory {root} does not exist")
    if is_checkpoint_dir(RunDir(root).checkpoints):
        root = resolve(root, ("deepspeed",), "CKPT_DIR").path
    if is_tag_dir(root):
        return None, [describe(root, trust_pickle=trust_pickle)]
    tags = list_tags(root)
    if not tags:
        raise ZerotrainError(f"{root} holds no DeepSpeed checkpoint (no global_stepN/ folder with *_model_states.pt)")
    latest = (root / "latest").read_text().strip() if (root / "latest").is_file() else None
    return latest, [describe(root / t, trust_pickle=trust_pickle) for t in tags]


def format_inspect(root: str, latest: str | None, infos: list[CheckpointInfo]) -> str:
    """The table `zerotrain inspect` prints."""
    lines = [f"{root}" + (f" (latest: {latest})" if latest else "")]
    rows = [("tag", "step", "stage", "ranks", "dtype", "params", "LoRA", "size", "complete")]
    for i in infos:
        rows.append((i.tag, _str(i.step), _str(i.zero_stage), _str(i.world_size), i.dtype or "?",
                     _human(i.num_params, 1000, "") if i.num_params is not None else "?",
                     "yes" if i.is_lora else "no", _human(i.bytes, 1000, "B"), "yes" if i.complete else "NO"))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    for r in rows:
        lines.append("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
    for i in infos:
        lines += [f"{i.tag}: {p}" for p in i.problems]
    if latest and latest not in {i.tag for i in infos}:
        lines.append(f"latest names {latest!r}, which is not there")
    return "\n".join(lines)


def _str(v: Any) -> str:
    return "?" if v is None else str(v)


def _human(n: int, base: int, unit: str) -> str:
    for prefix in ("", "K", "M", "G", "T"):
        if abs(n) < base or prefix == "T":
            return f"{n:.1f}{prefix}{unit}" if prefix else f"{n}{unit}"
        n /= base
    return str(n)


__all__ = ["DTYPES", "Entry", "LoraSettings", "Written", "consolidate", "extract_adapter", "fold_lora",
           "format_inspect", "inspect", "lora_settings", "merge_adapter", "parse_size", "write_hf_dir",
           "write_pth", "write_safetensors", "DTYPE_NAMES"]
