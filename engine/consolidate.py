"""`zerotrain consolidate`: a DeepSpeed checkpoint -> one `.pth`, one `.safetensors`, or an HF model
directory (weights, config.json, generation_config.json, tokenizer), a LoRA adapter folded in; and
the tensor writers and HF-directory pieces that extract-adapter and merge-adapter (engine.adapters)
write with as well.

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
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
from torch.utils.serialization import config as serialization_config

from common.errors import ZerotrainError
from common.publish import publishing
from engine.ds_checkpoint import Checkpoint, TensorSource, load_checkpoint, read_json_object, resolve_tag
from engine.lora import fold_lora, lora_settings
from engine.run_dir import SIDECAR, TOKENIZER_FILES, RunDir, has_tokenizer
from model.state_dict import check_state_dict

if TYPE_CHECKING:
    from transformers import PretrainedConfig  # imported where used: it takes seconds

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
# What is copied from a tokenizer directory into an HF directory: the files that make one
# (run_dir.TOKENIZER_FILES) and those that come with them.
COPIED_TOKENIZER_FILES = (*TOKENIZER_FILES, "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json",
                          "chat_template.jinja", "chat_template.json")


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


def source_entries(tensors: dict[str, TensorSource]) -> list[Entry]:
    """Entries that read each tensor from its source when written."""
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
def staged(output: Path, overwrite: bool, is_dir: bool) -> Iterator[Path]:
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
    with staged(output, overwrite, is_dir=kind == "dir") as tmp:
        if kind == "pth":
            return write_pth(entries, aliases, tmp, target)
        if kind == "safetensors":
            return write_safetensors(entries, tmp, target)
        total = write_hf_dir(entries, tmp, target, max_shard_size)
        if extras is not None:
            extras(tmp)
        return total


# --------------------------------------------------------------------------------------------
# Model config and tokenizer for HF directories


def _embedding_rows(entries: list[Entry], suffixes: tuple[str, ...]) -> int | None:
    return next((e.shape[0] for e in entries if e.name.endswith(suffixes)), None)


def load_config_json(path: Path) -> PretrainedConfig:
    """The transformers config in a config.json, with an error naming the file when it is none."""
    from transformers import AutoConfig

    data = read_json_object(path)
    if "model_type" not in data:
        raise ZerotrainError(f"{path} has no model_type; pass a transformers config.json")
    try:
        return AutoConfig.for_model(**data)
    except (ValueError, KeyError, TypeError) as e:
        raise ZerotrainError(f"{path} is not a transformers config: {e}") from None


def _preset_config(preset: str, entries: list[Entry]) -> tuple[PretrainedConfig, str]:
    from model.presets import preset_config

    vocab = _embedding_rows(entries, ("embed_tokens.weight", "wte.weight"))
    positions = _embedding_rows(entries, ("wpe.weight",))
    return preset_config(preset, vocab_size=vocab, max_seq_len=positions), f"preset {preset!r}"


def find_model_config(ckpt_root: Path, ckpt: Checkpoint | None, entries: list[Entry], *,
                      config: str | None = None, preset: str | None = None, default_preset: str | None = None
                      ) -> tuple[PretrainedConfig | None, str]:
    """The transformers config for an HF directory, and where it came from: --config, --preset, the
    checkpoint dir's config.json (HF Trainer), the tag's zerotrain.json, the run dir's config.json,
    and last `default_preset` (a training run's --preset, for a checkpoint that carries no config)."""
    if config:
        path = Path(config)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise ZerotrainError(f"--config {config}: no such file")
        return load_config_json(path), str(path)
    if preset:
        return _preset_config(preset, entries)
    if (ckpt_root / "config.json").is_file():
        return load_config_json(ckpt_root / "config.json"), str(ckpt_root / "config.json")
    model_config = ckpt.sidecar.model_config if ckpt and ckpt.sidecar else None
    if model_config and "model_type" in model_config:
        from transformers import AutoConfig

        return AutoConfig.for_model(**model_config), str(ckpt.info.path / SIDECAR)
    if (ckpt_root.parent / "config.json").is_file():
        return load_config_json(ckpt_root.parent / "config.json"), str(ckpt_root.parent / "config.json")
    if default_preset:
        return _preset_config(default_preset, entries)
    return None, ""


def check_against_config(entries: list[Entry], model_config: PretrainedConfig, where: str) -> None:
    """The entries must be the state dict of the model `model_config` builds (tied copies optional);
    `where` says where the config came from."""
    from model.build import build_from_config

    with torch.device("meta"):
        model = build_from_config(model_config, where)
    check_state_dict({e.name: e.shape for e in entries}, model, source="the checkpoint",
                     target=f"the model config from {where}", advice="Pass the right one with --config or --preset.",
                     noun="checkpoint")


def untie_trained_head(model_config: PretrainedConfig, entries: list[Entry]) -> None:
    """Untie a config's output embeddings from its input embeddings when the entries carry an
    lm_head of their own: a trained copy (LoRA modules_to_save) no longer equals the embeddings."""
    if getattr(model_config, "tie_word_embeddings", False) and any(e.name == "lm_head.weight" for e in entries):
        model_config.tie_word_embeddings = False


def tokenizer_source(ckpt_root: Path, ckpt: Checkpoint | None) -> Path | None:
    """The tokenizer to put beside weights from `ckpt_root`: in it (HF Trainer), in its run
    directory's tokenizer/, or the one the run was configured with (a directory or a .model file)."""
    candidates = [ckpt_root, RunDir(ckpt_root.parent).tokenizer]
    path = ckpt.sidecar.tokenizer if ckpt and ckpt.sidecar else None
    if path:
        candidates.append(Path(path))
    for c in candidates:
        if (c.is_file() and c.suffix == ".model") or has_tokenizer(c):
            return c
    return None


def write_extras(out: Path, model_config: PretrainedConfig, target: torch.dtype | None, entries: list[Entry],
                 generation_dir: Path | None, tokenizer: Path | None) -> None:
    """The rest of an HF directory beside the weights in `out`: config.json (dtype and tying as
    written), generation_config.json (copied from `generation_dir`, else from the config) and the
    tokenizer's files."""
    from transformers import GenerationConfig

    untie_trained_head(model_config, entries)
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
        for name in COPIED_TOKENIZER_FILES:
            if (tokenizer / name).is_file():
                shutil.copy2(tokenizer / name, out / name)


# --------------------------------------------------------------------------------------------
# The command


def output_dtype(name: str) -> torch.dtype | None:
    """The dtype a --dtype flag names (fp32, bf16, fp16); None for auto (each tensor's own)."""
    if name == "auto":
        return None
    if name not in DTYPES:
        raise ZerotrainError(f"--dtype {name!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


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
        return _write(entries, aliases, self.path, self.kind, self.target, self.shard_bytes, self.overwrite, extras)


def plan_output(output: str, dtype: str, max_shard_size: str | int, overwrite: bool) -> OutputPlan:
    """The OutputPlan of OUTPUT, --dtype, --max-shard-size and --overwrite."""
    out = Path(output)
    kind = _output_kind(out)
    target = output_dtype(dtype)
    shard_bytes = parse_size(max_shard_size)
    if out.exists() and not overwrite:
        raise ZerotrainError(f"{out} already exists; remove it, choose another path, or pass --overwrite")
    return OutputPlan(out, kind, target, shard_bytes, overwrite)


def checkpoint_entries(ckpt: Checkpoint, *, keep_lora_keys: bool = False, lora_alpha: float | None = None,
                       adapter_config: str | None = None) -> tuple[list[Entry], dict[str, str], list[str]]:
    """The weights of a loaded checkpoint tag (fp32 masters where it has them), its tied names, and
    notes for the user. A LoRA checkpoint's adapter is folded into the base weights, with the alpha
    from `lora_settings`, unless `keep_lora_keys`."""
    tag_dir = ckpt.info.path
    entries, aliases = source_entries(ckpt.tensors), dict(ckpt.aliases)
    notes = list(ckpt.notes)
    if ckpt.info.is_lora and not keep_lora_keys:
        settings = lora_settings(tag_dir.parent, ckpt, lora_alpha=lora_alpha, adapter_config=adapter_config)
        if settings is None:
            raise ZerotrainError(f"{tag_dir} is a LoRA checkpoint and its lora_alpha is unknown (no zerotrain.json "
                                 f"or adapter_config.json beside it): pass --lora-alpha A or --adapter-config FILE "
                                 f"to fold the adapter into the weights, or --keep-lora-keys to keep the raw keys")
        entries, aliases = fold_lora(entries, aliases, settings)
        notes.append(f"LoRA folded into the base weights (alpha from {settings.source})")
    return entries, aliases, notes


def consolidate(ckpt_dir: str, output: str, *, tag: str | None = None, dtype: str = "fp32",
                max_shard_size: str | int = "5GB", keep_lora_keys: bool = False, lora_alpha: float | None = None,
                adapter_config: str | None = None, config: str | None = None, preset: str | None = None,
                trust_pickle: bool = False, overwrite: bool = False) -> Written:
    """Write the weights of one checkpoint tag as OUTPUT (.pth, .safetensors or an HF directory)."""
    plan = plan_output(output, dtype, max_shard_size, overwrite)
    tag_dir = resolve_tag(ckpt_dir, tag)
    ckpt_root = tag_dir.parent
    ckpt = load_checkpoint(tag_dir, trust_pickle=trust_pickle)
    entries, aliases, notes = checkpoint_entries(ckpt, keep_lora_keys=keep_lora_keys, lora_alpha=lora_alpha,
                                                 adapter_config=adapter_config)
    extras = None
    if plan.kind == "dir":
        if keep_lora_keys and ckpt.info.is_lora:
            raise ZerotrainError("--keep-lora-keys keeps PEFT's key names, which an HF model directory cannot hold; "
                                 "write a .pth or .safetensors file instead")
        model_config, where = find_model_config(ckpt_root, ckpt, entries, config=config, preset=preset)
        if model_config is None:
            raise ZerotrainError(f"no model config for {tag_dir} (no config.json beside the checkpoint, no "
                                 f"zerotrain.json): pass --config CONFIG_JSON or --preset NAME to write an HF "
                                 f"directory, or write a .pth / .safetensors file")
        check_against_config(entries, model_config, where)
        tokenizer = tokenizer_source(ckpt_root, ckpt)
        if tokenizer is None:
            notes.append("no tokenizer found beside the checkpoint; copy one into the directory")
        generation_dir = ckpt_root if (ckpt_root / "generation_config.json").is_file() else ckpt_root.parent
        extras = lambda d: write_extras(d, model_config, plan.target, entries, generation_dir, tokenizer)  # noqa: E731
    total = plan.write(entries, aliases, extras)
    params = sum(e.numel for e in entries)
    return Written(plan.path, len(entries), params, total, notes)
