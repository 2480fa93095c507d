"""engine.offline.ds_layout and ds_weights, and the writers and readers of engine.offline, on small synthetic
checkpoints laid out as DeepSpeed lays them (the real ones are in tests/distributed/test_consolidate.py): the
pickle allowlist, tags, ZeRO-2/3 partitions for odd world sizes, streaming writers, LoRA folding."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from common.errors import ZerotrainError
from engine.checkpoint.run_dir import list_tags, resolve_tag
from engine.offline.ds_layout import deepspeed_globals, describe, safe_load
from engine.offline.ds_weights import load_checkpoint
from engine.offline.model_files import (
    parse_size,
    state_dict_entries,
    write_hf_dir,
    write_output,
)
from engine.offline.peft_names import AdapterConfig, fold_lora
from engine.offline.pth_io import write_pth
from engine.offline.safetensors_io import write_safetensors
from engine.offline.tensors import Entry
from tests.helpers import ROOT, peak_rss_child, save_zero3, weights


def save_zero2(tag: Path, params: dict[str, torch.Tensor], world: int) -> None:
    """What DeepSpeed ZeRO-2 writes: one flat group padded to a multiple of 2 x world, cut in equal
    partitions, the last saved without its padding; the module weights in the training dtype."""
    tag.mkdir(parents=True)
    flat = torch.cat([t.flatten() for t in params.values()])
    align = 2 * world
    padding = -flat.numel() % align
    flat = torch.cat([flat, torch.zeros(padding)])
    part = flat.numel() // world
    for r in range(world):
        piece = flat[r * part:(r + 1) * part]
        if r == world - 1:
            piece = piece[:part - padding]
        torch.save({"optimizer_state_dict": {"zero_stage": 2, "partition_count": [world],
                                             "single_partition_of_fp32_groups": [piece.clone()]}},
                   tag / f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
    module = {n: t.to(torch.bfloat16) for n, t in params.items()}
    module["lm_head.weight"] = module["embed.weight"]
    torch.save({"module": module, "buffer_names": [], "param_shapes": [{n: t.shape for n, t in params.items()}],
                "shared_params": {"lm_head.weight": "embed.weight"}, "global_steps": 5, "dp_world_size": world},
               tag / "mp_rank_00_model_states.pt")


def save_zero0_fp16(tag: Path, params: dict[str, torch.Tensor], flat: bool) -> None:
    """What DeepSpeed ZeRO-0 fp16 writes: the fp16 module, and FP16_Optimizer's unnamed fp32 masters
    per parameter group (here matrices, then vectors, as a weight-decay split makes them)."""
    tag.mkdir(parents=True)
    groups = [[t for t in params.values() if t.dim() > 1], [t for t in params.values() if t.dim() == 1]]
    optimizer = ({"fp32_groups_flat": [torch.cat([t.flatten() for t in g]) for g in groups]} if flat
                 else {"fp32_groups": [[t.clone() for t in g] for g in groups]})
    torch.save({"module": {n: t.half() for n, t in params.items()}, "buffer_names": [], "optimizer": optimizer,
                "param_shapes": None, "global_steps": 5, "dp_world_size": 2}, tag / "mp_rank_00_model_states.pt")


def make_dir(tmp_path: Path, stage: int, world: int, **kw) -> Path:
    ckpt = tmp_path / "ckpt"
    (save_zero3 if stage == 3 else save_zero2)(ckpt / "global_step5", weights(), world, **kw)
    (ckpt / "latest").write_text("global_step5")
    return ckpt


# --------------------------------------------------------------------------------------------


def test_safe_load_allows_deepspeed_classes_only(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    ok = tmp_path / "ok.pt"
    torch.save({"scaler": LossScaler(1.0), "stage": ZeroStageEnum.weights, "frag": fragment_address(numel=3, start=1),
                "t": torch.arange(3)}, ok)
    assert {c.__name__ for c in deepspeed_globals()} >= {"LossScaler", "ZeroStageEnum", "fragment_address"}
    loaded = safe_load(ok)
    assert loaded["stage"] == ZeroStageEnum.weights and loaded["frag"].start == 1

    bad = tmp_path / "bad.pt"
    torch.save({"args": argparse.Namespace(lr=1.0)}, bad)
    with pytest.raises(ZerotrainError, match=r"bad\.pt pickles argparse\.Namespace.*--trust-pickle"):
        safe_load(bad)
    assert safe_load(bad, trust_pickle=True)["args"].lr == 1.0


def test_safe_load_names_a_truncated_or_missing_file(tmp_path):
    f = tmp_path / "x.pt"
    torch.save({"t": torch.zeros(1000)}, f)
    f.write_bytes(f.read_bytes()[:2000])
    with pytest.raises(ZerotrainError, match=r"x\.pt is truncated or corrupt"):
        safe_load(f)
    with pytest.raises(ZerotrainError, match="does not exist"):
        safe_load(tmp_path / "nope.pt")


def test_tags_sorted_by_step_and_resolved(tmp_path):
    ckpt = tmp_path / "ckpt"
    for step in (10, 2, 9):
        (ckpt / f"global_step{step}").mkdir(parents=True)
        (ckpt / f"global_step{step}" / "mp_rank_00_model_states.pt").write_bytes(b"")
    (ckpt / "not_a_tag").mkdir()
    (ckpt / "global_step9_universal" / "zero").mkdir(parents=True)  # ds_to_universal output
    (ckpt / "global_step9_universal" / "mp_rank_00_model_states.pt").write_bytes(b"")
    assert list_tags(ckpt) == ["global_step2", "global_step9", "global_step10"]
    assert "universal checkpoint" in describe(ckpt / "global_step9_universal").problems[0]
    with pytest.raises(ZerotrainError, match="no 'latest' file; pass --tag"):
        resolve_tag(ckpt)
    (ckpt / "latest").write_text("global_step10\n")
    assert resolve_tag(ckpt) == ckpt / "global_step10"
    assert resolve_tag(ckpt, "global_step2") == ckpt / "global_step2"
    assert resolve_tag(ckpt / "global_step9") == ckpt / "global_step9"
    with pytest.raises(ZerotrainError, match="no checkpoint tag 'global_step3'.*global_step2, global_step9"):
        resolve_tag(ckpt, "global_step3")
    (ckpt / "latest").write_text("global_step11")
    with pytest.raises(ZerotrainError, match="names 'global_step11', which does not exist"):
        resolve_tag(ckpt)
    with pytest.raises(ZerotrainError, match="does not exist"):
        resolve_tag(tmp_path / "missing")
    with pytest.raises(ZerotrainError, match="holds no DeepSpeed checkpoint"):
        resolve_tag(tmp_path / "ckpt" / "not_a_tag")


@pytest.mark.parametrize("world", [1, 3])
def test_zero3_partitions_any_world_size(tmp_path, world):
    ckpt = make_dir(tmp_path, 3, world, frozen=("norm.weight",))
    info = describe(resolve_tag(ckpt))
    assert (info.zero_stage, info.world_size, info.complete, info.step, info.num_params) == \
        (3, world, True, 5, sum(t.numel() for t in weights().values()))
    loaded = load_checkpoint(resolve_tag(ckpt))
    assert loaded.aliases == {"lm_head.weight": "embed.weight"}
    for name, t in weights().items():
        src = loaded.tensors[name]
        assert src.origin == ("frozen" if name == "norm.weight" else "fp32 master")
        assert torch.equal(src.read(), t), name


@pytest.mark.slow
def test_reading_a_checkpoint_reads_no_optimizer_moments(tmp_path):
    """A child loads a ZeRO-3 tag whose Adam moments take 512 MB and reads every weight: its peak RSS
    grows by a few MB, where loading the optimizer file (the control) grows by the moments."""
    ckpt = make_dir(tmp_path, 3, 1)
    optim = ckpt / "global_step5" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    state = torch.load(optim, weights_only=True)
    state["optimizer_state_dict"]["state"] = {0: {"exp_avg": torch.ones(2 ** 26), "exp_avg_sq": torch.ones(2 ** 26)}}
    torch.save(state, optim)
    del state
    loaded, control = peak_rss_child(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from engine.offline.ds_layout import deepspeed_globals, safe_load
        from engine.offline.ds_weights import load_checkpoint
        from engine.checkpoint.run_dir import resolve_tag
        deepspeed_globals()  # imports deepspeed before the phase measured
        start = phase_start()
        ckpt = load_checkpoint(resolve_tag(sys.argv[1]))
        weights = {{name: src.read() for name, src in ckpt.tensors.items()}}
        loaded = peak_growth(start)
        start = phase_start()
        safe_load(sys.argv[2], mmap=False)
        print(loaded, peak_growth(start))
    """, str(ckpt), str(optim))
    assert control > 400, (loaded, control)
    assert loaded < 20, (loaded, control)


@pytest.mark.slow
def test_consolidate_prints_no_deprecation_warning_for_a_pth(tmp_path):
    """The whole command in a fresh process, since torch's C++ warnings (such as write_record()'s
    'Passing Storage by data pointer is deprecated') go to stderr once per process."""
    ckpt = make_dir(tmp_path, 3, 2)
    run = subprocess.run([sys.executable, "-m", "engine.apps.cli", "consolidate", str(ckpt), str(tmp_path / "m.pth")],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "deprecat" not in (run.stdout + run.stderr).lower(), run.stdout + run.stderr
    loaded = torch.load(tmp_path / "m.pth", weights_only=True)
    assert all(torch.equal(loaded[name], t) for name, t in weights().items())


def test_zero2_partitions_trimmed_last_rank(tmp_path):
    ckpt = make_dir(tmp_path, 2, 3)
    loaded = load_checkpoint(resolve_tag(ckpt))
    assert describe(resolve_tag(ckpt)).dtype == "bf16"
    for name, t in weights().items():
        assert loaded.tensors[name].origin == "fp32 master"
        assert torch.equal(loaded.tensors[name].read(), t), name


@pytest.mark.parametrize("flat", [True, False])
def test_zero0_fp16_masters_matched_to_names(tmp_path, flat):
    save_zero0_fp16(tmp_path / "t", weights(), flat)
    info = describe(tmp_path / "t")
    assert (info.zero_stage, info.world_size, info.dtype, info.complete) == (0, 2, "fp16", True)
    loaded = load_checkpoint(tmp_path / "t")
    assert not loaded.notes
    for name, t in weights().items():
        assert loaded.tensors[name].origin == "fp32 master" and torch.equal(loaded.tensors[name].read(), t)


def test_zero0_unmatched_masters_fall_back_to_module_weights(tmp_path):
    params = weights()
    save_zero0_fp16(tmp_path / "t", params, flat=True)
    sd = torch.load(tmp_path / "t" / "mp_rank_00_model_states.pt")
    sd["module"]["proj.weight"] += 1  # no longer the masters cast down
    torch.save(sd, tmp_path / "t" / "mp_rank_00_model_states.pt")
    loaded = load_checkpoint(tmp_path / "t")
    assert "could not be matched" in loaded.notes[0]
    assert loaded.tensors["proj.weight"].origin == "module"
    assert loaded.tensors["norm.weight"].origin == "fp32 master"


def test_describe_reports_missing_truncated_and_stale_files(tmp_path):
    ckpt = make_dir(tmp_path, 3, 3)
    tag = ckpt / "global_step5"
    (tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    f = tag / "zero_pp_rank_2_mp_rank_00_model_states.pt"
    f.write_bytes(f.read_bytes()[:-50])
    (tag / "zero_pp_rank_3_mp_rank_00_optim_states.pt").write_bytes(
        (tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").read_bytes())
    info = describe(tag)
    assert not info.complete
    text = "\n".join(info.problems)
    assert "rank 1: optimizer file zero_pp_rank_1_mp_rank_00_optim_states.pt is missing" in text
    assert "rank 2: model states file zero_pp_rank_2_mp_rank_00_model_states.pt is truncated" in text
    assert "rank 3: zero_pp_rank_3_mp_rank_00_optim_states.pt is there but the checkpoint was saved by 3 ranks" in text
    with pytest.raises(ZerotrainError, match="incomplete or inconsistent"):
        load_checkpoint(tag)


def test_unsupported_layouts_are_named(tmp_path):
    ckpt = make_dir(tmp_path, 2, 1)
    (ckpt / "global_step5" / "mp_rank_01_model_states.pt").write_bytes(b"")
    info = describe(ckpt / "global_step5")
    assert any("tensor-parallel" in p for p in info.problems)


# --------------------------------------------------------------------------------------------
# Writers


def entries_of(tensors: dict[str, torch.Tensor]) -> list[Entry]:
    return [Entry(n, tuple(t.shape), t.dtype, (lambda into=None, t=t: t)) for n, t in tensors.items()]


def test_pth_writer_shares_tied_storage_and_casts(tmp_path):
    tensors = weights() | {"steps": torch.tensor([3, 4], dtype=torch.int64)}
    write_pth(entries_of(tensors), {"lm_head.weight": "embed.weight"}, tmp_path / "m.pth", torch.bfloat16)
    loaded = torch.load(tmp_path / "m.pth", weights_only=True)
    assert loaded["lm_head.weight"].data_ptr() == loaded["embed.weight"].data_ptr()
    assert loaded["steps"].dtype == torch.int64 and torch.equal(loaded["steps"], tensors["steps"])
    for n, t in weights().items():
        assert loaded[n].dtype == torch.bfloat16 and torch.equal(loaded[n], t.to(torch.bfloat16))


def test_safetensors_and_sharded_dir_writers(tmp_path):
    tensors = weights()
    write_safetensors(entries_of(tensors), tmp_path / "m.safetensors", None)
    assert all(torch.equal(load_file(tmp_path / "m.safetensors")[n], t) for n, t in tensors.items())
    (tmp_path / "hf").mkdir()
    write_hf_dir(entries_of(tensors), tmp_path / "hf", torch.float16, max_shard_size=100)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in tensors.values())
    for name, shard in index["weight_map"].items():
        assert torch.equal(load_file(tmp_path / "hf" / shard)[name], tensors[name].half())
    entries, _ = state_dict_entries(tmp_path / "m.safetensors")
    sources = {e.name: e for e in entries}
    assert torch.equal(sources["proj.weight"].produce(None), tensors["proj.weight"])


def test_wrapper_prefixes_are_stripped():
    from model.state_dict import strip_wrappers

    assert strip_wrappers("module.module._orig_mod.model.layers.0._orig_mod.mlp.weight") == "model.layers.0.mlp.weight"
    assert strip_wrappers("base_model.model.lm_head.original_module.weight") == \
        "base_model.model.lm_head.original_module.weight"


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("300") == 300
    with pytest.raises(ZerotrainError, match="not a size"):
        parse_size("five gigs")


# --------------------------------------------------------------------------------------------
# LoRA folding


def test_fold_lora_linear_conv1d_embedding(tmp_path):
    g = torch.Generator().manual_seed(0)
    r, alpha = 2, 6.0
    linear, conv, emb = torch.randn(4, 3, generator=g), torch.randn(3, 5, generator=g), torch.randn(7, 3, generator=g)
    a1, b1 = torch.randn(r, 3, generator=g), torch.randn(4, r, generator=g)
    a2, b2 = torch.randn(r, 3, generator=g), torch.randn(5, r, generator=g)
    a3, b3 = torch.randn(r, 7, generator=g), torch.randn(3, r, generator=g)
    head, head_copy = torch.randn(7, 3, generator=g), torch.randn(7, 3, generator=g)
    p = "base_model.model."
    tensors = {
        p + "lin.base_layer.weight": linear, p + "lin.lora_A.default.weight": a1, p + "lin.lora_B.default.weight": b1,
        p + "c_attn.base_layer.weight": conv, p + "c_attn.lora_A.default.weight": a2,
        p + "c_attn.lora_B.default.weight": b2,
        p + "wte.base_layer.weight": emb, p + "wte.lora_embedding_A.default": a3,
        p + "wte.lora_embedding_B.default": b3,
        p + "head.original_module.weight": head, p + "head.modules_to_save.default.weight": head_copy,
    }
    out, aliases = fold_lora(entries_of(tensors), {}, AdapterConfig(lora_alpha=alpha))
    got = {e.name: e.produce() for e in out}
    scale = alpha / r
    assert set(got) == {"lin.weight", "c_attn.weight", "wte.weight", "head.weight"}
    torch.testing.assert_close(got["lin.weight"], linear + b1 @ a1 * scale)
    torch.testing.assert_close(got["c_attn.weight"], conv + (b2 @ a2).T * scale)
    torch.testing.assert_close(got["wte.weight"], emb + (b3 @ a3).T * scale)
    assert torch.equal(got["head.weight"], head_copy)

    rslora = AdapterConfig(lora_alpha=alpha, use_rslora=True, alpha_pattern={"lin": 1.0})
    out, _ = fold_lora(entries_of(tensors), {}, rslora)
    lin = next(e for e in out if e.name == "lin.weight").produce()
    torch.testing.assert_close(lin, linear + b1 @ a1 * (1.0 / math.sqrt(r)))


def test_fold_lora_refuses_dora_and_missing_base():
    t = torch.zeros(2, 2)
    dora = {"m.base_layer.weight": t, "m.lora_A.default.weight": t, "m.lora_B.default.weight": t,
            "m.lora_magnitude_vector.default.weight": torch.zeros(2)}
    with pytest.raises(ZerotrainError, match="--keep-lora-keys"):
        fold_lora(entries_of(dora), {}, AdapterConfig(lora_alpha=1))
    no_base = {"m.lora_A.default.weight": t, "m.lora_B.default.weight": t}
    with pytest.raises(ZerotrainError, match="exclude_frozen_parameters"):
        fold_lora(entries_of(no_base), {}, AdapterConfig(lora_alpha=1))


def test_state_dict_entries_of_a_pth_with_tied_weights(tmp_path):
    embed = torch.randn(4, 3)
    torch.save({"module.embed.weight": embed, "module.lm_head.weight": embed, "b": torch.ones(2)}, tmp_path / "m.pth")
    entries, aliases = state_dict_entries(tmp_path / "m.pth")
    sources = {e.name: e for e in entries}
    assert aliases == {"lm_head.weight": "embed.weight"} and set(sources) == {"embed.weight", "b"}
    assert torch.equal(sources["embed.weight"].produce(None), embed)
    save_file({"x": torch.ones(3)}, tmp_path / "x.safetensors")
    (tmp_path / "x.safetensors").write_bytes((tmp_path / "x.safetensors").read_bytes()[:-4])
    with pytest.raises(ZerotrainError, match="truncated"):
        state_dict_entries(tmp_path / "x.safetensors")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors", ""])
def test_error_while_writing_leaves_nothing(tmp_path, suffix):
    def broken(into=None):
        raise ZerotrainError("shard ends early")

    entries = entries_of(weights()) + [Entry("late.weight", (2,), torch.float32, broken)]
    out = tmp_path / f"model{suffix}"
    kind = {".pth": "pth", ".safetensors": "safetensors", "": "dir"}[suffix]
    with pytest.raises(ZerotrainError, match="shard ends early"):
        write_output(entries, {}, out, kind, None, 10**9, overwrite=False)
    assert list(tmp_path.iterdir()) == []
