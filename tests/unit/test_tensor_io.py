"""engine.offline.pth_io and safetensors_io: the streaming .pth and .safetensors writers (against torch.save and
safetensors' own reader), the safetensors reader, and the locator of tensor data in torch.save files."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import weakref
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from common.errors import ZerotrainError
from engine.offline import pth_io
from engine.offline.pth_io import load_located, write_pth
from engine.offline.safetensors_io import (
    SAFETENSORS_CODES,
    SAFETENSORS_DTYPES,
    safetensors_entries,
    write_safetensors,
)
from engine.offline.tensors import Entry
from tests.helpers import ROOT, peak_rss_child


def sources() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "fp32": torch.randn(7, 5, generator=g),
        "bf16": torch.randn(3, 4, generator=g).to(torch.bfloat16),
        "fp16": torch.randn(6, generator=g).to(torch.float16),
        "int64": torch.arange(-3, 9),
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 4),
        "transposed": torch.randn(4, 6, generator=g).t(),  # non-contiguous source
        "strided": torch.randn(10, generator=g)[::3],
        "bool": torch.tensor([True, False, True]),
    }


def entries_of(tensors: dict[str, torch.Tensor], fill_into: bool = False) -> list[Entry]:
    """Entries that hand out the given tensors (or copy them into the scratch buffer offered)."""
    def maker(t: torch.Tensor):
        return lambda into=None: into.copy_(t) if fill_into and into is not None else t
    return [Entry(name, tuple(t.shape), t.dtype, maker(t)) for name, t in tensors.items()]


def reference(tensors: dict[str, torch.Tensor], aliases: dict[str, str], path: Path,
              target: torch.dtype | None = None) -> None:
    """What torch.save writes for the real state dict (contiguous tensors, in the output dtypes)."""
    state = {n: (t.to(target) if target is not None and t.is_floating_point() else t).contiguous()
             for n, t in tensors.items()}
    state.update({a: state[n] for a, n in aliases.items() if n in state})
    torch.save(state, path)


def write(tmp_path: Path, tensors: dict[str, torch.Tensor], aliases: dict[str, str] | None = None,
          target: torch.dtype | None = None, name: str = "model.pth", fill_into: bool = False) -> Path:
    path = tmp_path / "ours" / name
    path.parent.mkdir(exist_ok=True)
    write_pth(entries_of(tensors, fill_into), aliases or {}, path, target)
    return path


@pytest.mark.parametrize("fill_into", [False, True])
def test_pth_round_trip_equals_torch_save(tmp_path, fill_into):
    tensors = sources()
    aliases = {"tied": "fp32", "tied_bf16": "bf16", "dangling": "no_such_tensor"}
    ours = write(tmp_path, tensors, aliases, fill_into=fill_into)
    ref = tmp_path / "ref" / "model.pth"
    ref.parent.mkdir()
    reference(tensors, aliases, ref)

    got, want = torch.load(ours, weights_only=True), torch.load(ref, weights_only=True)
    assert list(got) == list(want) == list(tensors) + ["tied", "tied_bf16"]
    for name, t in want.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape and torch.equal(got[name], t), name
    for alias, name in (("tied", "fp32"), ("tied_bf16", "bf16")):
        assert got[alias].untyped_storage().data_ptr() == got[name].untyped_storage().data_ptr()
    assert got["scalar"].dim() == 0 and got["empty"].shape == (0, 4)


def test_pth_is_torch_saves_file_but_for_its_serialization_id(tmp_path):
    """Same records at the same offsets with the same bytes and CRC-32s as torch.save's own file;
    only .data/serialization_id differs (torch derives it from the CRCs, which it wrote as 0)."""
    tensors = sources()
    ours = write(tmp_path, tensors, {"tied": "fp32"})
    ref = tmp_path / "ref" / "model.pth"
    ref.parent.mkdir()
    reference(tensors, {"tied": "fp32"}, ref)
    with zipfile.ZipFile(ours) as a, zipfile.ZipFile(ref) as b:
        infos_a, infos_b = a.infolist(), b.infolist()
        assert [i.filename for i in infos_a] == [i.filename for i in infos_b]
        for ia, ib in zip(infos_a, infos_b):
            assert (ia.header_offset, ia.file_size) == (ib.header_offset, ib.file_size), ia.filename
            if not ia.filename.endswith(".data/serialization_id"):
                assert ia.CRC == ib.CRC and a.read(ia) == b.read(ib), ia.filename
    assert ours.stat().st_size == ref.stat().st_size


def test_pth_casts_floating_point_to_the_target_dtype(tmp_path):
    tensors = sources()
    ours = write(tmp_path, tensors, {"tied": "fp32"}, target=torch.bfloat16)
    ref = tmp_path / "ref.pth"
    reference(tensors, {"tied": "fp32"}, ref, target=torch.bfloat16)
    got, want = torch.load(ours, weights_only=True), torch.load(ref, weights_only=True)
    assert got["fp32"].dtype == torch.bfloat16 and got["int64"].dtype == torch.int64
    assert all(got[n].dtype == t.dtype and torch.equal(got[n], t) for n, t in want.items())


def test_pth_loads_mapped_and_with_torchs_computed_offsets(tmp_path):
    """torch.load(mmap=True) may compute record offsets from miniz's layout instead of reading
    each header; the file has torch's own layout, so both ways find the same data."""
    from torch.utils.serialization import config

    tensors = sources()
    ours = write(tmp_path, tensors, {"tied": "fp32"})
    saved = config.load.calculate_storage_offsets
    try:
        for calculate in (False, True):
            config.load.calculate_storage_offsets = calculate
            got = torch.load(ours, weights_only=True, mmap=True)
            assert all(torch.equal(got[n], t) for n, t in tensors.items())
    finally:
        config.load.calculate_storage_offsets = saved


@pytest.mark.slow
def test_pth_writer_warns_nothing(tmp_path):
    """Neither a Python warning nor torch's C++ one ('write_record(): Passing Storage by data
    pointer is deprecated'), which goes to stderr once per process: hence a fresh process."""
    script = textwrap.dedent(f"""
        import sys, warnings, torch
        sys.path.insert(0, {str(ROOT)!r})
        from pathlib import Path
        from engine.offline.pth_io import write_pth
        from engine.offline.tensors import Entry
        entries = [Entry("w", (3, 2), torch.float32, lambda into=None: torch.ones(3, 2)),
                   Entry("i", (4,), torch.int64, lambda into=None: torch.arange(4))]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            write_pth(entries, {{"tied": "w"}}, Path(sys.argv[1]), torch.float16)
            torch.load(sys.argv[1], weights_only=True)
        print([str(w.message) for w in caught])
    """)
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path / "m.pth")], capture_output=True, text=True,
                         check=True)
    assert run.stdout.strip() == "[]" and "arning" not in run.stderr and "deprecated" not in run.stderr, \
        run.stdout + run.stderr


@pytest.mark.slow
def test_pth_passes_zip_integrity_checks(tmp_path):
    path = write(tmp_path, sources(), {"tied": "fp32"})
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None
        assert all(i.CRC for i in z.infolist() if i.file_size)  # a CRC of 0 would be the skeleton's
    run = subprocess.run([sys.executable, "-m", "zipfile", "-t", str(path)], capture_output=True, text=True)
    assert run.returncode == 0 and "corrupt" not in run.stdout + run.stderr, run.stdout + run.stderr


def test_pth_writer_holds_one_produced_tensor_at_a_time(tmp_path):
    """When a tensor is asked for, every tensor produced before it is gone already."""
    alive: list[weakref.ref] = []
    peak = 0

    def maker(i: int):
        def produce(into=None):
            nonlocal peak
            peak = max(peak, sum(r() is not None for r in alive))
            t = torch.full((64, 64), float(i))  # a fresh tensor each time, never the scratch buffer
            alive.append(weakref.ref(t))
            return t
        return produce

    entries = [Entry(f"w{i}", (64, 64), torch.float32, maker(i)) for i in range(20)]
    write_pth(entries, {}, tmp_path / "m.pth", torch.bfloat16)
    assert len(alive) == 20 and peak == 0
    got = torch.load(tmp_path / "m.pth", weights_only=True)
    assert all(torch.equal(got[f"w{i}"], torch.full((64, 64), float(i), dtype=torch.bfloat16)) for i in range(20))


@pytest.mark.slow
def test_pth_peak_memory_is_one_tensor_not_the_model(tmp_path):
    """A child writes a 256 MB model of 4 MB tensors: its peak RSS grows by a few tensors, where
    torch.save of the whole state dict (the control, so the measurement can fail) grows by the model."""
    ours, naive = peak_rss_child(f"""
        import sys, torch
        sys.path.insert(0, {str(ROOT)!r})
        from pathlib import Path
        from engine.offline.pth_io import write_pth
        from engine.offline.tensors import Entry

        def maker(i):
            return lambda into=None: (into if into is not None else torch.empty(1024, 1024)).fill_(i)

        entries = [Entry(f"t{{i}}", (1024, 1024), torch.float32, maker(i)) for i in range(64)]
        start = phase_start()
        write_pth(entries, {{}}, Path(sys.argv[1]) / "ours.pth", None)
        ours = peak_growth(start)
        start = phase_start()
        torch.save({{e.name: e.produce(None) for e in entries}}, Path(sys.argv[1]) / "naive.pth")
        print(ours, peak_growth(start))
    """, str(tmp_path))
    assert naive > 200, (ours, naive)
    assert ours < 40, (ours, naive)


def test_pth_alias_named_like_an_entry_stands_for_its_target(tmp_path):
    """As in the state dict torch.save would get: the alias replaces the entry of that name."""
    tensors = {"a": torch.ones(3), "b": torch.zeros(3), "c": torch.full((3,), 2.0)}
    ours = write(tmp_path, tensors, {"b": "c"})
    ref = tmp_path / "ref.pth"
    reference(tensors, {"b": "c"}, ref)
    got, want = torch.load(ours, weights_only=True), torch.load(ref, weights_only=True)
    assert list(got) == list(want) and all(torch.equal(got[n], want[n]) for n in want)
    assert got["b"].untyped_storage().data_ptr() == got["c"].untyped_storage().data_ptr()


def test_pth_refuses_a_tensor_of_the_wrong_shape(tmp_path):
    entries = [Entry("w", (2, 3), torch.float32, lambda into=None: torch.zeros(3, 2))]
    with pytest.raises(ZerotrainError, match="came out"):
        write_pth(entries, {}, tmp_path / "m.pth", None)


# --------------------------------------------------------------------------------------------
# safetensors


def test_dtype_table_is_one_table_both_ways_and_agrees_with_safetensors(tmp_path):
    assert {SAFETENSORS_DTYPES[c]: c for c in SAFETENSORS_DTYPES} == SAFETENSORS_CODES
    assert len(SAFETENSORS_CODES) == len(SAFETENSORS_DTYPES)
    tensors = {str(dtype): torch.zeros(2, dtype=dtype) for dtype in SAFETENSORS_CODES}
    save_file(tensors, tmp_path / "all.safetensors")  # the codes safetensors itself writes
    read = {e.name: e.dtype for e in safetensors_entries(tmp_path / "all.safetensors")}
    assert read == {name: t.dtype for name, t in tensors.items()}
    ours = tmp_path / "ours.safetensors"
    write_safetensors(entries_of(tensors), ours, None)
    theirs = load_file(ours)
    assert all(theirs[n].dtype == t.dtype and torch.equal(theirs[n], t) for n, t in tensors.items())


def test_safetensors_written_and_read_tensor_by_tensor(tmp_path):
    tensors = {n: t for n, t in sources().items()}
    path = tmp_path / "m.safetensors"
    total = write_safetensors(entries_of(tensors), path, None, {"format": "pt", "note": "x"})
    assert total == sum(t.numel() * t.element_size() for t in tensors.values())
    theirs = load_file(path)  # safetensors' own reader
    assert set(theirs) == set(tensors) and all(torch.equal(theirs[n], t) for n, t in tensors.items())
    entries = safetensors_entries(path)
    assert [e.name for e in entries] == list(tensors)  # file order
    for e in entries:
        t = e.produce(None)
        assert (e.shape, e.dtype) == (tuple(tensors[e.name].shape), tensors[e.name].dtype)
        assert t.dtype == e.dtype and tuple(t.shape) == e.shape and torch.equal(t, tensors[e.name]), e.name


def test_safetensors_reader_reads_files_safetensors_wrote(tmp_path):
    tensors = {"a": torch.randn(3, 2).to(torch.float16), "b": torch.arange(4, dtype=torch.int32)}
    save_file(tensors, tmp_path / "m.safetensors")
    entries = {e.name: e for e in safetensors_entries(tmp_path / "m.safetensors")}
    assert all(torch.equal(entries[n].produce(None), t) for n, t in tensors.items())
    # and through the .pth writer, which takes the same entries
    write_pth(list(entries.values()), {}, tmp_path / "m.pth", torch.float32)
    got = torch.load(tmp_path / "m.pth", weights_only=True)
    assert got["a"].dtype == torch.float32 and torch.equal(got["a"], tensors["a"].float())


def test_safetensors_errors(tmp_path):
    save_file({"c": torch.ones(2, dtype=torch.complex64)}, tmp_path / "c.safetensors")
    with pytest.raises(ZerotrainError, match="C64"):
        safetensors_entries(tmp_path / "c.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(ZerotrainError, match="not a readable safetensors file"):
        safetensors_entries(tmp_path / "bad.safetensors")
    with pytest.raises(ZerotrainError, match="cannot be stored"):
        write_safetensors(entries_of({"c": torch.ones(2, dtype=torch.complex64)}), tmp_path / "x.safetensors", None)


# --------------------------------------------------------------------------------------------
# Locating tensor data in torch.save files


def deepspeed_like(path: Path) -> dict:
    """Nested containers, views into one flat tensor (several tensors per storage, at offsets),
    tied tensors, mixed dtypes, an empty tensor: what DeepSpeed's files hold."""
    g = torch.Generator().manual_seed(1)
    flat = torch.randn(101, generator=g)
    weight = torch.randn(6, 5, generator=g).to(torch.bfloat16)
    state = {"module": {"w": weight, "w_tied": weight, "b": torch.arange(7), "empty": torch.empty(0)},
             "optimizer_state_dict": {"fp32_flat_groups": [flat[:40], flat[40:]],
                                      "state": {0: {"exp_avg": torch.randn(101, generator=g), "step": 3}}},
             "param_shapes": [{"w": torch.Size([6, 5])}], "scalars": (torch.tensor(1.5), 2.0)}
    torch.save(state, path)
    return state


def tensors_in(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in tensors_in(item)]
    return []


def test_locator_offsets_hold_each_tensors_bytes(tmp_path):
    path = tmp_path / "optim_states.pt"
    saved = tensors_in(deepspeed_like(path))
    state, locator = load_located(path)
    located = tensors_in(state)
    assert len(located) == len(saved)
    with open(path, "rb") as f:
        for t, want in zip(located, saved):
            if not t.numel():
                continue
            f.seek(locator.offset(t))
            raw = bytearray(f.read(t.numel() * t.element_size()))
            assert torch.equal(torch.frombuffer(raw, dtype=t.dtype).view(t.shape), want)
            record = locator.record(t)
            assert re.search(r"(^|/)data/\d+$", record.name)
            assert record.offset <= locator.offset(t) < record.offset + record.nbytes
    # views of one storage: one record, offsets apart by their storage offsets
    a, b = state["optimizer_state_dict"]["fp32_flat_groups"]
    assert locator.record(a) == locator.record(b) and locator.offset(b) - locator.offset(a) == 40 * 4


def test_locator_refuses_storages_not_mapped_from_the_file(tmp_path):
    path = tmp_path / "m.pt"
    deepspeed_like(path)
    locator = pth_io.StorageLocator(path)
    state = torch.load(path, weights_only=True, map_location=locator.map_location)  # no mmap: copies
    with pytest.raises(ZerotrainError, match="mmap=True"):
        locator.offset(state["module"]["w"])
    _, other = load_located(path)
    with pytest.raises(ZerotrainError, match="not loaded from this file"):
        other.offset(torch.ones(3))


@pytest.mark.slow
def test_locating_reads_no_tensor_data(tmp_path):
    """A child locates every tensor of a 256 MB file: its peak RSS does not grow with the file."""
    write_pth([Entry(f"t{i}", (1024, 1024), torch.float32,
                     lambda into=None, i=i: into.fill_(i)) for i in range(64)], {}, tmp_path / "m.pth", None)
    located, read = peak_rss_child(f"""
        import sys, torch
        sys.path.insert(0, {str(ROOT)!r})
        from engine.offline.pth_io import load_located
        start = phase_start()
        state, locator = load_located(sys.argv[1])
        offsets = [locator.offset(t) for t in state.values()]
        assert len(set(offsets)) == 64
        located = peak_growth(start)
        start = phase_start()
        total = sum(float(t.sum()) for t in state.values())  # the control: touching the data reads it
        print(located, peak_growth(start))
    """, str(tmp_path / "m.pth"))
    assert read > 200, (located, read)
    assert located < 20, (located, read)


def test_central_directory_crc_positions_of_a_plain_zip(tmp_path):
    """Where the CRC patcher finds the central directory CRCs, on a ZIP written by Python (a UTF-8
    name, unlike torch's)."""
    path = tmp_path / "plain.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("a/data/0", b"hello")
        z.writestr("a/émoji", b"world!")
    with open(path, "rb") as f, zipfile.ZipFile(path) as z:
        positions = pth_io._central_crc_positions(z, f)
        assert set(positions) == set(z.namelist())
        for info in z.infolist():
            f.seek(positions[info.filename])
            assert int.from_bytes(f.read(4), "little") == info.CRC
