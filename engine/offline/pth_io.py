"""`torch.save` files, tensor by tensor, with public torch API only.

Reading: a file is unpickled with `weights_only=True` (`torch_load`, with an allowlist of classes)
and loaded with `mmap=True` (`load_located`), which maps the file instead of reading tensor data;
a `StorageLocator` says where each tensor lies in it, so that a `TensorSource` reads the bytes it
needs with plain file reads.

Writing: `write_pth` lets `torch.save` itself write the file under
`torch.serialization.skip_data()` (the pickle, the records, holes where the bytes go), from
placeholder tensors that are never touched and so take address space but no memory; each tensor
is then made and written into its hole, and its CRC-32 set in the ZIP structures.
"""

from __future__ import annotations

import os
import pickle
import re
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Sequence

import torch

from common.errors import ZerotrainError
from engine.offline.tensors import (
    Entry,
    Piece,
    Scratch,
    TensorSource,
    as_bytes,
    materialize,
    out_dtype,
)

# --------------------------------------------------------------------------------------------
# Reading: unpickling, and where the tensors lie


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
# Writing


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
