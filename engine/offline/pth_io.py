"""Tensor files read and written one tensor at a time, with public torch / safetensors API only.

Writing: an `Entry` says a tensor's name, shape and dtype and how to make it; the writers make
one entry at a time and write it before making the next.
- `write_pth`: a `torch.save`-format state dict. `torch.save` itself writes the file under
  `torch.serialization.skip_data()` (the pickle, the records, holes where the bytes go), from
  placeholder tensors that are never touched and so take address space but no memory; each
  tensor is then made and written into its hole, and its CRC-32 set in the ZIP structures.
- `write_safetensors`, `write_hf_dir`: one `.safetensors` file written from the shapes (header
  first, then the tensors in order); save_pretrained's shards and index.
- `write_output`: any of the three, to a temporary name put in place once complete.

Reading: `safetensors_entries` reads through `safetensors.safe_open`; a `torch.save` file is loaded
with `mmap=True` (`load_located`), which maps the file instead of reading tensor data, and a
`StorageLocator` says where each tensor lies in it, so that a `TensorSource` reads the bytes it
needs with plain file reads. `state_dict_entries` / `model_entries` read state-dict files and
model directories either way.

Memory holds one tensor (plus two scratch buffers sized for the largest), never the model.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import struct
import zipfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Sequence

import torch

from common.errors import ZerotrainError
from common.jsonio import read_json_object
from common.publish import publishing
from model.state_dict import strip_wrappers

# The one table between safetensors' dtype codes and torch dtypes, for the writer and the reader.
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
SAFETENSORS_CODES: dict[torch.dtype, str] = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}


# --------------------------------------------------------------------------------------------
# Tensors to write


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


def out_dtype(dtype: torch.dtype, target: torch.dtype | None) -> torch.dtype:
    """The dtype a tensor is written in: `target` for floating-point tensors, else its own."""
    return target if target is not None and dtype.is_floating_point else dtype


class Scratch:
    """Two buffers sized for the largest tensor, one to read into and one to convert into, reused
    for every tensor. (A fresh allocation per tensor fragments the heap, and RSS creeps up.)"""

    def __init__(self, entries: list[Entry], target: torch.dtype | None) -> None:
        casts = [e for e in entries if out_dtype(e.dtype, target) != e.dtype]
        self.read = torch.empty(max((e.numel * e.dtype.itemsize for e in entries), default=0), dtype=torch.uint8)
        self.cast = torch.empty(max((e.numel * target.itemsize for e in casts), default=0), dtype=torch.uint8)

    @staticmethod
    def view(buf: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        return buf[:math.prod(shape) * dtype.itemsize].view(dtype).view(shape)


def materialize(entry: Entry, target: torch.dtype | None, scratch: Scratch) -> torch.Tensor:
    """The entry's tensor in its output dtype, contiguous, in the scratch buffers where it can be;
    valid until the next call."""
    t = entry.produce(scratch.view(scratch.read, entry.dtype, entry.shape))
    if tuple(t.shape) != entry.shape:
        raise ZerotrainError(f"internal error: {entry.name} came out {tuple(t.shape)}, expected {entry.shape}")
    dtype = out_dtype(t.dtype, target)
    if dtype != t.dtype:
        out = scratch.view(scratch.cast, dtype, entry.shape) if dtype == target and entry.dtype == t.dtype \
            else torch.empty(entry.shape, dtype=dtype)
        t = out.copy_(t)
    return t.contiguous()


def as_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


# --------------------------------------------------------------------------------------------
# Tensors read by byte range


@dataclass(frozen=True)
class Piece:
    """`numel` elements stored contiguously at byte `offset` of `path`."""

    path: str
    offset: int
    numel: int


@dataclass
class TensorSource:
    """One tensor of a file or of several (a checkpoint's rank slices): its pieces, concatenated
    in order, viewed as `shape`."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    pieces: tuple[Piece, ...]
    origin: str = "module"
    """fp32 master, module (weights in the training dtype), frozen or buffer."""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def read(self, into: torch.Tensor | None = None) -> torch.Tensor:
        """Read the tensor from disk (plain reads, no mmap), into `into` (contiguous, this dtype and
        shape) when given."""
        if into is None:
            into = torch.empty(self.shape, dtype=self.dtype)
        elif into.dtype != self.dtype or tuple(into.shape) != self.shape or not into.is_contiguous():
            raise ValueError(f"read into a {into.dtype} {tuple(into.shape)} buffer, need {self.dtype} {self.shape}")
        out = into.reshape(-1)
        buf = memoryview(out.view(torch.uint8).numpy())
        itemsize = out.element_size()
        pos = 0
        for piece in self.pieces:
            size = piece.numel * itemsize
            with open(piece.path, "rb", buffering=0) as f:
                f.seek(piece.offset)
                got = 0
                while got < size:
                    n = f.readinto(buf[pos + got:pos + size])
                    if not n:
                        raise ZerotrainError(f"{piece.path} ends at byte {piece.offset + got}, inside a tensor "
                                             f"({size} bytes from {piece.offset}): the file is truncated")
                    got += n
            pos += size
        if pos != len(buf):
            raise ZerotrainError(f"internal error: pieces of {pos} bytes for a tensor of {len(buf)} bytes")
        return into


def source_entries(tensors: dict[str, TensorSource]) -> list[Entry]:
    """Entries that read each tensor from its source when written."""
    return [Entry(name, src.shape, src.dtype, src.read) for name, src in tensors.items()]


# --------------------------------------------------------------------------------------------
# safetensors


def write_safetensors(entries: list[Entry], path: Path, target: torch.dtype | None,
                      metadata: dict[str, str] | None = None) -> int:
    """Write one safetensors file, tensor by tensor (the header is known from the shapes); returns
    the bytes of tensor data.

    safetensors' own writers (`save_file`, `serialize_file`) need every tensor in memory at once,
    so the format is written here: an 8-byte header length, the JSON header, then the data."""
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for e in entries:
        dtype = out_dtype(e.dtype, target)
        if dtype not in SAFETENSORS_CODES:
            raise ZerotrainError(f"{e.name}: dtype {dtype} cannot be stored in safetensors")
        nbytes = e.numel * dtype.itemsize
        header[e.name] = {"dtype": SAFETENSORS_CODES[dtype], "shape": list(e.shape),
                          "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keeps the data 8-byte aligned, as safetensors does
    scratch = Scratch(entries, target)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for e in entries:
            f.write(as_bytes(materialize(e, target, scratch)))
    return offset


def _safe_open(path: Path) -> Any:
    from safetensors import safe_open

    try:
        # pread reads only the asked tensor's bytes into its own buffer (safetensors >= 0.8) ...
        return safe_open(str(path), framework="pt", backend="pread")
    except TypeError:
        # ... where older versions map the file; the pages read stay in RSS until it is closed.
        return safe_open(str(path), framework="pt")


def safetensors_entries(path: str | os.PathLike) -> list[Entry]:
    """The tensors of a `.safetensors` file, in file order, each read on its own when produced.

    The file is opened again for every tensor, so that with an mmap backend what was read is
    unmapped before the next one; `produce` ignores `into` (safetensors allocates the tensor)."""
    path = Path(path)
    try:
        with _safe_open(path) as f:
            names = f.offset_keys() if hasattr(f, "offset_keys") else f.keys()
            specs = [(name, f.get_slice(name)) for name in names]
            specs = [(name, tuple(s.get_shape()), s.get_dtype()) for name, s in specs]
    except Exception as e:  # safetensors raises SafetensorError, OSError, ...
        raise ZerotrainError(f"{path} is not a readable safetensors file, or it is truncated ({e})") from None
    entries = []
    for name, shape, code in specs:
        if code not in SAFETENSORS_DTYPES:
            raise ZerotrainError(f"{path}: tensor {name} has dtype {code}, which zerotrain does not read")
        entries.append(Entry(name, shape, SAFETENSORS_DTYPES[code], _safetensors_reader(path, name)))
    return entries


def _safetensors_reader(path: Path, name: str) -> Callable[[torch.Tensor | None], torch.Tensor]:
    def produce(into: torch.Tensor | None = None) -> torch.Tensor:
        try:
            with _safe_open(path) as f:
                return f.get_tensor(name)
        except Exception as e:  # the file changed or broke since it was listed
            raise ZerotrainError(f"cannot read tensor {name} from {path} ({e})") from None

    return produce


# --------------------------------------------------------------------------------------------
# torch.save files: unpickling, and where their tensors lie


def torch_load(path: str | os.PathLike, *, map_location: Any = "cpu", mmap: bool = True, trust_pickle: bool = False,
               safe_globals: Sequence[Any] = (), kind: str = "state-dict files") -> Any:
    """`torch.load` with `weights_only=True`, allowing `safe_globals` beside tensors and containers.

    A refused class, a truncated or corrupt file: ZerotrainError naming the file (`kind` says what
    such files are, for the message). With `trust_pickle` the file is unpickled without
    restrictions (it can run arbitrary code).
    """
    path = Path(path)
    if not path.is_file():
        raise ZerotrainError(f"{path} does not exist")
    try:
        if trust_pickle:
            return torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        refused = _refused_globals(path, safe_globals)
        if not refused:
            raise ZerotrainError(f"{path} is corrupt: cannot unpickle it ({_first_line(e)})") from None
        allowed = ", ".join(c.__name__ for c in safe_globals) or "tensors and containers only"
        raise ZerotrainError(
            f"{path} pickles {', '.join(refused)}, which is not among the classes zerotrain unpickles "
            f"from {kind} ({allowed}); unpickling other classes can run arbitrary code. "
            f"Pass --trust-pickle only if you trust where this file came from.") from None
    except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
        raise ZerotrainError(f"{path} is truncated or corrupt: {_first_line(e)}") from None


def _refused_globals(path: Path, safe_globals: Sequence[Any]) -> list[str]:
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # a file too broken to disassemble: report it as corrupt instead
        return []


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@dataclass(frozen=True)
class Record:
    """A tensor-data record of a torch.save ZIP file: its member name, and its data's byte range."""

    name: str
    offset: int
    nbytes: int


_DATA_RECORD = re.compile(r"(^|/)data/\d+$")
_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # ZIP local file header (30 bytes)


def _data_records(path: Path) -> list[Record]:
    """The tensor-data records of a torch.save file, from its ZIP directory and local headers."""
    records = []
    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
        for info in z.infolist():
            if not _DATA_RECORD.search(info.filename):
                continue
            if info.compress_type != zipfile.ZIP_STORED:
                raise ZerotrainError(f"{path}: record {info.filename} is compressed (not a torch.save file?)")
            f.seek(info.header_offset)
            header = f.read(_LOCAL_HEADER.size)
            if len(header) < _LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
                raise ZerotrainError(f"{path}: bad ZIP record header for {info.filename} (corrupt file)")
            *_, name_len, extra_len = _LOCAL_HEADER.unpack(header)
            records.append(Record(info.filename, info.header_offset + _LOCAL_HEADER.size + name_len + extra_len,
                                  info.file_size))
    return records


class StorageLocator:
    """Where each storage of a torch.save (ZIP) file lies in the file, with public API only.

    Pass `map_location` to `torch.load(path, mmap=True, map_location=...)`: torch calls it once per
    storage, and with mmap=True each storage is a view of one mapping of the whole file, so
    pointer differences between storages are byte-offset differences in the file. Storages and
    data records, both sorted, must pair up with equal sizes and one constant shift; that shift
    (taken from the first record's offset, read from its ZIP header) turns a tensor's data
    pointer into its byte offset. No tensor data is read: the mapping is never touched.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._storages: dict[int, int] = {}  # data_ptr -> nbytes, of the storages loaded
        self._records: dict[int, Record] | None = None  # data_ptr -> its record, once resolved
        self._shift = 0

    def map_location(self, storage: torch.UntypedStorage, location: str) -> torch.UntypedStorage:
        """The `map_location` callable for torch.load: notes the storage, keeps it on the CPU."""
        if storage.nbytes():
            self._storages[storage.data_ptr()] = storage.nbytes()
        self._records = None
        return storage

    def _resolve(self) -> dict[int, Record]:
        if self._records is not None:
            return self._records
        records = sorted((r for r in _data_records(self.path) if r.nbytes), key=lambda r: r.offset)
        storages = sorted(self._storages.items())
        if len(records) != len(storages):
            raise ZerotrainError(f"{self.path}: {len(storages)} storages loaded for {len(records)} data records "
                                 f"(load it with mmap=True and this locator's map_location)")
        shift = records[0].offset - storages[0][0] if records else 0
        for (ptr, nbytes), record in zip(storages, records):
            if ptr + shift != record.offset or nbytes != record.nbytes:
                raise ZerotrainError(f"{self.path}: the storages loaded do not map onto its data records as one "
                                     f"file mapping (load it with mmap=True and this locator's map_location)")
        self._shift = shift
        self._records = {ptr: record for (ptr, _), record in zip(storages, records)}
        return self._records

    def record(self, t: torch.Tensor) -> Record:
        """The data record of the storage under `t` (a tensor loaded with this locator)."""
        storage = t.untyped_storage()
        record = self._resolve().get(storage.data_ptr()) if storage.nbytes() else None
        if record is None:
            raise ZerotrainError(f"{self.path}: a tensor of shape {tuple(t.shape)} was not loaded from this file "
                                 f"with this locator, or has no data")
        return record

    def offset(self, t: torch.Tensor) -> int:
        """Byte offset in the file of `t`'s first element; what follows is laid out as `t`'s
        strides say (contiguous tensors: `t.numel() * t.element_size()` bytes). The tensor must
        lie inside its ZIP record, which a corrupt file's pickle may not say."""
        record = self.record(t)
        offset = t.data_ptr() + self._shift
        span = (1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))) * t.element_size() if t.numel() else 0
        if not record.offset <= offset <= offset + span <= record.offset + record.nbytes:
            raise ZerotrainError(f"{self.path}: tensor data at bytes {offset}..{offset + span} lies outside its "
                                 f"record {record.name} (corrupt file)")
        return offset

    def piece(self, t: Any, start: int = 0, numel: int | None = None) -> Piece:
        """Elements [start, start + numel) (default: to the end) of the contiguous tensor `t`."""
        if not isinstance(t, torch.Tensor):
            raise ZerotrainError(f"{self.path}: expected a tensor, found {type(t).__name__}")
        numel = t.numel() - start if numel is None else numel
        if not t.is_contiguous():
            raise ZerotrainError(f"{self.path}: a non-contiguous tensor of shape {tuple(t.shape)} is not supported")
        if start < 0 or start + numel > t.numel():
            raise ZerotrainError(f"{self.path}: elements {start}..{start + numel} asked of a tensor of "
                                 f"{t.numel()} (layout not understood)")
        return Piece(str(self.path), self.offset(t) + start * t.element_size(), numel)

    def source(self, t: Any, origin: str = "module") -> TensorSource:
        """All of the contiguous tensor `t`, to read when needed."""
        if not isinstance(t, torch.Tensor):
            raise ZerotrainError(f"{self.path}: expected a tensor, found {type(t).__name__}")
        return TensorSource(tuple(t.shape), t.dtype, (self.piece(t),) if t.numel() else (), origin)


def load_located(path: str | os.PathLike, *, trust_pickle: bool = False, safe_globals: Sequence[Any] = (),
                 kind: str = "state-dict files") -> tuple[Any, StorageLocator]:
    """`torch_load` a torch.save file mapped (no tensor data read), and a locator of its tensors.

    Tensors stay on the CPU whatever device they were saved from; touching their data pages it
    in from the file, so read it with plain file reads at `locator.offset(t)` instead. The file
    stays mapped while any of its tensors is alive."""
    locator = StorageLocator(path)
    obj = torch_load(path, map_location=locator.map_location, mmap=True, trust_pickle=trust_pickle,
                     safe_globals=safe_globals, kind=kind)
    return obj, locator


def tied_names(state: dict[str, Any]) -> dict[str, str]:
    """Entries of a loaded state dict that share another's data (same storage, offset, shape and
    dtype) -> the first such name."""
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in state.items():
        if not isinstance(t, torch.Tensor) or t.numel() == 0:
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
    return aliases


# --------------------------------------------------------------------------------------------
# State-dict files and model directories


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
# torch.save format


_CENTRAL_HEADER = 46  # bytes of a ZIP central directory header before its name, extra field and comment
_CRC_AT = 16  # byte of the CRC-32 field in a central directory header (14 in a local header)


def _central_crc_positions(z: zipfile.ZipFile, f: IO[bytes]) -> dict[str, int]:
    """Member name -> file position of its CRC-32 in the ZIP central directory, which zipfile has
    read: it starts at `start_dir` and holds the members in `infolist()` order, each a fixed header
    then the name, extra field and comment."""
    positions, pos = {}, z.start_dir
    for info in z.infolist():
        f.seek(pos)
        if f.read(4) != b"PK\x01\x02":
            raise ZerotrainError(f"{f.name}: bad ZIP central directory entry at byte {pos}")
        positions[info.filename] = pos + _CRC_AT
        name = info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437")
        pos += _CENTRAL_HEADER + len(name) + len(info.extra) + len(info.comment)
    return positions


def _set_crc32(f: IO[bytes], info: zipfile.ZipInfo, record: Record, crc: int, central: int) -> None:
    """Put `crc` where ZIP readers look for it: the central directory, and the data descriptor
    after the data (bit 3 of the flags, which torch's writer sets) or else the local header."""
    if info.flag_bits & 0x08:
        f.seek(record.offset + record.nbytes)
        local = record.offset + record.nbytes + (4 if f.read(4) == b"PK\x07\x08" else 0)
    else:
        local = info.header_offset + 14
    for pos in (local, central):
        f.seek(pos)
        f.write(struct.pack("<L", crc))


def write_pth(entries: list[Entry], aliases: dict[str, str], path: Path, target: torch.dtype | None) -> int:
    """Write a `torch.save`-format state dict (loads with torch.load(weights_only=True)) tensor by
    tensor; tied names share their target's storage. Returns the bytes of tensor data."""
    path = Path(path)
    # 1. torch.save writes the pickle and every record, but no tensor bytes (holes in the file).
    #    The placeholders are never written to, so their pages are never made resident.
    placeholders = {e.name: torch.empty(e.shape, dtype=out_dtype(e.dtype, target)) for e in entries}
    state = dict(placeholders)
    for alias, name in aliases.items():
        if name in placeholders:
            state[alias] = placeholders[name]
    with torch.serialization.skip_data():
        torch.save(state, path)
    # An alias that reuses an entry's name stands for its target instead (the entry is not saved).
    saved = {name for name, t in placeholders.items() if state[name] is t}
    del state, placeholders
    # 2. Where each entry's bytes go. The file is loaded back mapped, which reads no tensor data.
    loaded, locator = load_located(path)
    records = {e.name: locator.record(loaded[e.name]) if e.numel and e.name in saved else None for e in entries}
    del loaded, locator
    # 3. Fill the holes one tensor at a time, and give each record its CRC-32 (torch.save left 0).
    scratch = Scratch(entries, target)
    total = 0
    with zipfile.ZipFile(path) as z, open(path, "r+b") as f:
        infos = {info.filename: info for info in z.infolist()}
        central = _central_crc_positions(z, f)
        for e in entries:
            total += _fill(f, e, target, scratch, records[e.name], infos, central)
    return total


def _fill(f: IO[bytes], e: Entry, target: torch.dtype | None, scratch: Scratch, record: Record | None,
          infos: dict[str, zipfile.ZipInfo], central: dict[str, int]) -> int:
    """Write one entry's bytes into its record; a function of its own so that nothing of this
    tensor outlives the call."""
    data = as_bytes(materialize(e, target, scratch))
    if record is None:  # no elements, or an alias took its name: nothing to write
        return len(data)
    if len(data) != record.nbytes:
        raise ZerotrainError(f"internal error: {e.name} came out {len(data)} bytes, its record holds {record.nbytes}")
    f.seek(record.offset)
    f.write(data)
    _set_crc32(f, infos[record.name], record, zlib.crc32(data), central[record.name])
    return len(data)


# --------------------------------------------------------------------------------------------
# Outputs: a .pth, a .safetensors or an HF directory, put in place once complete


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


@contextmanager
def staged(output: Path, overwrite: bool, is_dir: bool) -> Iterator[Path]:
    """A temporary path beside `output`, put in place of `output` only if the body succeeds."""
    if output.exists() and not overwrite:
        raise ZerotrainError(f"{output} already exists; remove it, choose another path, or pass --overwrite")
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

