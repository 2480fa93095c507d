"""Consolidated weights == the gathered live weights (fp32 masters exactly), for every ZeRO stage,
fp32 and bf16, tied GPT-2, frozen parameters and LoRA; == DeepSpeed's zero_to_fp32 for stages 1-3;
adapters == PeftModel.save_pretrained; and clear errors, with nothing written, for bad inputs.

The checkpoints come from one 2-rank torchrun job (conftest.ds_checkpoints)."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.apps.cli import main as zerotrain
from tests.helpers import load_module

pytestmark = pytest.mark.distributed

make_checkpoints = load_module("tests/distributed/make_checkpoints.py")
CASES = make_checkpoints.CASES
LORA_CASES = [c for c, s in CASES.items() if s.get("lora")]
PLAIN_CASES = [c for c in CASES if c not in LORA_CASES]
FOLDABLE_CASES = [c for c in LORA_CASES if not CASES[c].get("exclude_frozen")]


def run(*args, expect: int = 0, capsys=None) -> str:
    rc = zerotrain([str(a) for a in args])
    err = capsys.readouterr().err if capsys else ""
    assert rc == expect, f"zerotrain {' '.join(map(str, args))} exited {rc}: {err}"
    return err


def live(manifest: dict, tag: str = "global_step2") -> dict:
    return torch.load(manifest["live"][tag], weights_only=True)


def expected_fp32(state: dict) -> dict[str, torch.Tensor]:
    """fp32 master where the optimizer has one, else the live parameter upcast (frozen ones)."""
    return {n: state["masters"].get(n, p).float() for n, p in state["params"].items()}


def assert_equal_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want), (sorted(set(got) ^ set(want)))[:6]
    bad = [k for k in want if got[k].dtype != want[k].dtype or not torch.equal(got[k], want[k])]
    assert not bad, f"{len(bad)} tensors differ, first {bad[:4]}"


def vocab_of(manifest: dict, state: dict) -> int:
    return next(p.shape[0] for n, p in state["params"].items() if n.endswith(("embed_tokens.weight", "wte.weight")))


# --------------------------------------------------------------------------------------------
# Equality with the live weights


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.smoke) if c == "z3-fp32" else c for c in CASES])
def test_pth_equals_live_fp32_masters(case, ds_checkpoints, tmp_path, capsys):
    manifest = ds_checkpoints[case]
    out = tmp_path / "model.pth"
    run("consolidate", manifest["ckpt_dir"], out, *(["--keep-lora-keys"] if case in LORA_CASES else []),
        capsys=capsys)
    state = live(manifest)
    got = torch.load(out, weights_only=True)
    if CASES[case].get("exclude_frozen"):  # only the trainable weights were saved
        assert_equal_weights(got, state["masters"])
        return
    for alias, target in state["tied"].items():
        assert torch.equal(got.pop(alias), got[target]), alias
    assert_equal_weights(got, expected_fp32(state))
    if case not in LORA_CASES:
        # Loads strictly into the model, lm_head.weight included.
        model = make_checkpoints.build_model(CASES[case], vocab_of(manifest, state))
        model.load_state_dict(torch.load(out, weights_only=True), strict=True)


@pytest.mark.parametrize("case", [c for c in PLAIN_CASES if CASES[c]["precision"] == "bf16"])
def test_bf16_output_equals_live_bf16_weights(case, ds_checkpoints, tmp_path, capsys):
    """fp32 master cast to bf16 == the bf16 weight DeepSpeed trained with."""
    manifest = ds_checkpoints[case]
    out = tmp_path / "model.safetensors"
    run("consolidate", manifest["ckpt_dir"], out, "--dtype", "bf16", capsys=capsys)
    state = live(manifest)
    got = load_file(out)
    assert not set(state["tied"]) & set(got), "safetensors leaves tied copies out"
    assert_equal_weights(got, {n: p.to(torch.bfloat16) for n, p in state["params"].items()})


# zero_to_fp32 cannot read BF16_Optimizer checkpoints ("not a zero checkpoint"); consolidate can.
@pytest.mark.parametrize("case", [c for c in CASES if CASES[c]["stage"] >= 1 and c != "z1-bf16-fp32acc"])
def test_equals_deepspeed_zero_to_fp32(case, ds_checkpoints, tmp_path, capsys):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    manifest = ds_checkpoints[case]
    out = tmp_path / "model.pth"
    run("consolidate", manifest["ckpt_dir"], out, "--keep-lora-keys", capsys=capsys)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        reference = get_fp32_state_dict_from_zero_checkpoint(manifest["ckpt_dir"])
    got = torch.load(out, weights_only=True)
    # zero_to_fp32 leaves out frozen parameters at stage 1 (they are only in the module weights).
    assert set(reference) <= set(got)
    bad = [k for k, v in reference.items() if not torch.equal(got[k], v.float())]
    assert not bad, bad[:4]


def test_older_tag(ds_checkpoints, tmp_path, capsys):
    manifest = ds_checkpoints["z3-fp32"]
    run("consolidate", manifest["ckpt_dir"], tmp_path / "step1.pth", "--tag", "global_step1", capsys=capsys)
    run("consolidate", manifest["ckpt_dir"], tmp_path / "latest.pth", capsys=capsys)
    step1 = torch.load(tmp_path / "step1.pth", weights_only=True)
    state1 = live(manifest, "global_step1")
    step1.pop("lm_head.weight")
    assert_equal_weights(step1, expected_fp32(state1))
    latest = torch.load(tmp_path / "latest.pth", weights_only=True)
    assert not torch.equal(latest["model.layers.0.mlp.up_proj.weight"], step1["model.layers.0.mlp.up_proj.weight"])


def test_zero2_layout_without_slice_mappings(ds_checkpoints, tmp_path, capsys):
    """Older DeepSpeed wrote no param_slice_mappings: the fp32 groups are then cut by param_shapes
    and the alignment paddings (the padded GPT-2 shapes exercise those)."""
    manifest = ds_checkpoints["z2-fp32"]
    ckpt = tmp_path / "ckpt"
    shutil.copytree(manifest["ckpt_dir"], ckpt)
    for f in (ckpt / "global_step2").glob("*optim_states.pt"):
        sd = torch.load(f, weights_only=False)
        del sd["optimizer_state_dict"]["param_slice_mappings"]
        torch.save(sd, f)
    run("consolidate", ckpt, tmp_path / "model.pth", capsys=capsys)
    got = torch.load(tmp_path / "model.pth", weights_only=True)
    state = live(manifest)
    for alias in state["tied"]:
        got.pop(alias)
    assert_equal_weights(got, expected_fp32(state))


# --------------------------------------------------------------------------------------------
# HF directories


def test_hf_dir_from_zerotrain_run(ds_checkpoints, tmp_path, capsys):
    """Config from the tag's zerotrain.json, tokenizer from the run dir; loads with from_pretrained."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    manifest = ds_checkpoints["z2-bf16"]
    out = tmp_path / "hf"
    run("consolidate", manifest["ckpt_dir"], out, capsys=capsys)
    written = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= written
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    assert model.lm_head.weight is model.model.embed_tokens.weight
    state = live(manifest)
    assert_equal_weights(dict(model.named_parameters()), expected_fp32(state))
    assert len(AutoTokenizer.from_pretrained(out)) == model.config.vocab_size


def test_hf_dir_from_hf_trainer_layout_sharded(ds_checkpoints, tmp_path, capsys):
    """checkpoint-N/ with config.json and tokenizer beside global_stepN/; small shards + index."""
    from transformers import AutoModelForCausalLM

    manifest = ds_checkpoints["gpt2-z3"]
    out = tmp_path / "hf"
    run("consolidate", manifest["ckpt_dir"], out, "--max-shard-size", "40KB", capsys=capsys)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == set(shards)
    assert all(p.stat().st_size <= 40_000 + 4096 for p in out.glob("model-*.safetensors")
               if len(load_file(p)) > 1)
    assert "lm_head.weight" not in index["weight_map"]
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    state = live(manifest)
    assert_equal_weights(dict(model.named_parameters()), expected_fp32(state))
    assert (out / "tokenizer.json").is_file()


def test_hf_dir_for_foreign_checkpoint_needs_a_config(ds_checkpoints, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    manifest = ds_checkpoints["z3-fp32"]
    err = run("consolidate", manifest["ckpt_dir"], tmp_path / "hf", expect=2, capsys=capsys)
    assert "--config" in err and "--preset" in err and not (tmp_path / "hf").exists()
    err = run("consolidate", manifest["ckpt_dir"], tmp_path / "hf", "--preset", "tiny", expect=2, capsys=capsys)
    assert "does not match the model config" in err
    run("consolidate", manifest["ckpt_dir"], tmp_path / "hf", "--preset", "debug", capsys=capsys)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert_equal_weights(dict(model.named_parameters()), expected_fp32(live(manifest)))


# --------------------------------------------------------------------------------------------
# LoRA


def peft_model_from_live(manifest: dict, state: dict):
    """A CPU PeftModel holding the live weights (fp32 masters for the trainable ones)."""
    from peft import LoraConfig, get_peft_model

    spec = CASES[manifest["case"]]
    base = make_checkpoints.build_model({**spec, "lora": False}, vocab_of(manifest, state))
    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", **make_checkpoints.LORA))
    weights = expected_fp32(state)
    model.load_state_dict({**weights, **{a: weights[t] for a, t in state["tied"].items()}}, strict=True)
    return model


def plain_base_from_live(manifest: dict, state: dict):
    """The model without LoRA, holding the live base weights (the original lm_head, not the trained copy)."""
    plain = make_checkpoints.build_model({**CASES[manifest["case"]], "lora": False}, vocab_of(manifest, state))
    weights = expected_fp32(state)
    plain_state = {}
    for name in plain.state_dict():
        peft_name = "base_model.model." + name
        candidates = [peft_name, peft_name.replace(".weight", ".base_layer.weight"),
                      peft_name.replace("lm_head.", "lm_head.original_module.")]
        source = next(c for c in candidates if c in weights or c in state["tied"])
        plain_state[name] = weights[state["tied"].get(source, source)]
    plain.load_state_dict(plain_state, strict=True)
    return plain


@pytest.mark.parametrize("case", FOLDABLE_CASES)
def test_lora_folded_equals_peft_merge(case, ds_checkpoints, tmp_path, capsys):
    manifest = ds_checkpoints[case]
    out = tmp_path / "merged.safetensors"
    alpha = [] if CASES[case].get("layout") == "zerotrain" else ["--lora-alpha", make_checkpoints.LORA["lora_alpha"]]
    if alpha:
        err = run("consolidate", manifest["ckpt_dir"], out, expect=2, capsys=capsys)
        assert "--lora-alpha" in err and not out.exists()
    run("consolidate", manifest["ckpt_dir"], out, *alpha, capsys=capsys)
    got = load_file(out)
    merged = peft_model_from_live(manifest, live(manifest)).merge_and_unload()
    want = merged.state_dict()
    # modules_to_save on a tied lm_head: the trained copy is not the embedding any more.
    assert set(got) == set(want)
    bad = [k for k in want if not torch.allclose(got[k], want[k], rtol=0, atol=1e-6)]
    assert not bad, bad[:4]
    assert not torch.equal(got["lm_head.weight"], got["model.embed_tokens.weight"])


@pytest.mark.parametrize("case", LORA_CASES)
def test_extracted_adapter_equals_peft_save_pretrained(case, ds_checkpoints, tmp_path, capsys):
    from peft import PeftModel

    manifest = ds_checkpoints[case]
    spec = CASES[case]
    out = tmp_path / "adapter"
    # alpha from zerotrain.json, from HF Trainer's adapter_config.json beside the shards, or the flag
    flags = [] if spec.get("layout") else ["--lora-alpha", make_checkpoints.LORA["lora_alpha"]]
    dtype = ["--dtype", "bf16"] if spec["precision"] == "bf16" else []
    run("extract-adapter", manifest["ckpt_dir"], out, *flags, *dtype, capsys=capsys)
    reference = Path(manifest["live"]["global_step2"]).parent / "peft_global_step2"
    got, want = load_file(out / "adapter_model.safetensors"), load_file(reference / "adapter_model.safetensors")
    assert_equal_weights(got, want)
    got_cfg = json.loads((out / "adapter_config.json").read_text())
    want_cfg = json.loads((reference / "adapter_config.json").read_text())
    for key in ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "modules_to_save", "fan_in_fan_out",
                "use_rslora", "bias", "rank_pattern", "alpha_pattern"):
        assert got_cfg[key] == want_cfg[key], key
    assert sorted(got_cfg["target_modules"]) == sorted(want_cfg["target_modules"])

    state = live(manifest)
    if spec.get("exclude_frozen"):
        return  # no base weights in this checkpoint to build the model from
    loaded = PeftModel.from_pretrained(plain_base_from_live(manifest, state), out)
    x = torch.randint(0, 256, (1, 8))
    expected = peft_model_from_live(manifest, state)
    if spec["precision"] == "fp32":
        torch.testing.assert_close(loaded(input_ids=x).logits, expected(input_ids=x).logits, rtol=0, atol=0)


def test_lora_without_base_weights(ds_checkpoints, tmp_path, capsys):
    """HF Trainer leaves the frozen base out of a PeftModel's shards: folding needs the base model."""
    manifest = ds_checkpoints["lora-hf"]
    err = run("consolidate", manifest["ckpt_dir"], tmp_path / "m.safetensors", expect=2, capsys=capsys)
    assert "extract-adapter" in err and "merge-adapter" in err
    assert_no_output(tmp_path / "m.safetensors")


def test_merge_adapter_equals_consolidated_fold(ds_checkpoints, tmp_path, capsys):
    """Base HF dir + extracted adapter, merged shard by shard == consolidate's folded output."""
    manifest = ds_checkpoints["lora-z3"]
    state = live(manifest)
    plain = plain_base_from_live(manifest, state)
    plain.save_pretrained(tmp_path / "base", max_shard_size="100KB")
    run("extract-adapter", manifest["ckpt_dir"], tmp_path / "adapter", capsys=capsys)
    run("merge-adapter", tmp_path / "base", tmp_path / "adapter", tmp_path / "merged", capsys=capsys)
    run("consolidate", manifest["ckpt_dir"], tmp_path / "folded.safetensors", capsys=capsys)
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.config.tie_word_embeddings is False
    folded = load_file(tmp_path / "folded.safetensors")
    assert_equal_weights(dict(merged.state_dict()), folded)

    # run directories: the base's RUN/final and the LoRA run's RUN/final/adapter
    shutil.copytree(tmp_path / "base", tmp_path / "pt-run" / "final")
    shutil.copytree(tmp_path / "adapter", tmp_path / "sft-run" / "final" / "adapter")
    run("merge-adapter", tmp_path / "pt-run", tmp_path / "sft-run", tmp_path / "merged.safetensors", capsys=capsys)
    assert_equal_weights(load_file(tmp_path / "merged.safetensors"), folded)


# --------------------------------------------------------------------------------------------
# inspect and bad inputs


def test_inspect(ds_checkpoints, capsys):
    manifest = ds_checkpoints["z3-fp32"]
    run("inspect", manifest["ckpt_dir"], capsys=None)
    table = capsys.readouterr().out
    assert "latest: global_step2" in table and "global_step1" in table
    lora = ds_checkpoints["lora-z2"]
    run("inspect", lora["ckpt_dir"], "--json")
    report = json.loads(capsys.readouterr().out)
    info = report["tags"][0]
    assert (info["zero_stage"], info["world_size"], info["dtype"], info["is_lora"], info["complete"]) == \
        (2, 2, "bf16", True, True)
    assert info["num_params"] == sum(p.numel() for p in live(lora)["params"].values())


@pytest.fixture
def broken_copy(ds_checkpoints, tmp_path):
    """A fresh copy of the small ZeRO-3 checkpoint to damage."""
    def make(case: str = "z3-fp32") -> Path:
        dst = tmp_path / f"{case}-copy"
        shutil.copytree(ds_checkpoints[case]["ckpt_dir"], dst)
        return dst
    return make


def assert_no_output(path: Path) -> None:
    assert not path.exists()
    assert not [p for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.tmp")]


@pytest.mark.parametrize("damage, message", [
    ("truncate", "truncated or corrupt"),
    ("delete", "is missing"),
    ("extra_rank", "saved by 2 ranks"),
    ("latest_missing", "which does not exist"),
    ("wrong_tag", "available tags: global_step1, global_step2"),
    ("no_checkpoint", "does not exist"),
])
def test_bad_inputs_fail_clearly_and_write_nothing(damage, message, broken_copy, tmp_path, capsys):
    ckpt = broken_copy()
    tag = ckpt / "global_step2"
    extra = []
    if damage == "truncate":
        f = tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif damage == "delete":
        (tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    elif damage == "extra_rank":
        for kind in ("optim", "model"):
            shutil.copy(tag / f"zero_pp_rank_1_mp_rank_00_{kind}_states.pt", tag / f"zero_pp_rank_2_mp_rank_00_{kind}_states.pt")
    elif damage == "latest_missing":
        (ckpt / "latest").write_text("global_step7")
    elif damage == "wrong_tag":
        extra = ["--tag", "global_step9"]
    elif damage == "no_checkpoint":
        ckpt = tmp_path / "nowhere"
    for output in (tmp_path / "out.pth", tmp_path / "out.safetensors", tmp_path / "out_dir"):
        err = run("consolidate", ckpt, output, "--preset", "debug", *extra, expect=2, capsys=capsys)
        assert err.startswith("zerotrain consolidate: error:") and message in err, err
        assert_no_output(output)


def test_truncated_shard_named_in_inspect(broken_copy, capsys):
    ckpt = broken_copy()
    f = ckpt / "global_step2" / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    f.write_bytes(f.read_bytes()[:-100])
    run("inspect", ckpt)
    out = capsys.readouterr().out
    assert "NO" in out and "rank 0: model states file zero_pp_rank_0_mp_rank_00_model_states.pt is truncated" in out


def test_unsafe_pickle_refused_unless_trusted(broken_copy, tmp_path, capsys):
    """Megatron-style client state: an argparse.Namespace in the model states is not allowlisted."""
    ckpt = broken_copy("z2-fp32")
    f = ckpt / "global_step2" / "mp_rank_00_model_states.pt"
    sd = torch.load(f, weights_only=False)
    sd["args"] = argparse.Namespace(lr=0.1)
    torch.save(sd, f)
    err = run("consolidate", ckpt, tmp_path / "out.pth", expect=2, capsys=capsys)
    assert "argparse.Namespace" in err and "--trust-pickle" in err and str(f) in err
    assert_no_output(tmp_path / "out.pth")
    run("consolidate", ckpt, tmp_path / "out.pth", "--trust-pickle", capsys=capsys)
    assert (tmp_path / "out.pth").is_file()


def test_existing_output_needs_overwrite(ds_checkpoints, tmp_path, capsys):
    out = tmp_path / "model.pth"
    out.write_text("keep me")
    err = run("consolidate", ds_checkpoints["z1-fp32"]["ckpt_dir"], out, expect=2, capsys=capsys)
    assert "--overwrite" in err and out.read_text() == "keep me"
    run("consolidate", ds_checkpoints["z1-fp32"]["ckpt_dir"], out, "--overwrite", capsys=capsys)
    assert torch.load(out, weights_only=True)


def test_an_output_over_the_run_it_reads_is_refused_and_the_run_kept(ds_checkpoints, tmp_path, capsys):
    """`consolidate RUN/checkpoints RUN --overwrite` once replaced the run directory (checkpoints,
    metrics, config) with the model read out of it, and exited 0; the adapter tools likewise."""
    lora_run = shutil.copytree(Path(ds_checkpoints["lora-z3"]["ckpt_dir"]).parent, tmp_path / "run")
    before = sorted(str(p.relative_to(lora_run)) for p in lora_run.rglob("*"))
    ckpts = lora_run / "checkpoints"
    for args, relation in [(("consolidate", ckpts, lora_run, "--overwrite"), "contains the checkpoint directory"),
                           (("consolidate", lora_run, ckpts / "hf", "--overwrite"), "lies inside the checkpoint"),
                           (("extract-adapter", ckpts, ckpts, "--overwrite"), "is the checkpoint directory"),
                           (("extract-adapter", ckpts, lora_run / "tokenizer", "--overwrite"),
                            "is the tokenizer")]:
        assert relation in run(*args, expect=2, capsys=capsys)
    run("extract-adapter", ckpts, lora_run / "final" / "adapter", capsys=capsys)  # beside the checkpoints: fine
    (lora_run / "final" / "config.json").write_text("{}")
    for output in (lora_run, lora_run / "final", lora_run / "final" / "adapter" / "merged"):
        err = run("merge-adapter", lora_run, lora_run / "final" / "adapter", output, "--overwrite", expect=2,
                  capsys=capsys)
        assert "which it is made from" in err
    shutil.rmtree(lora_run / "final")
    assert sorted(str(p.relative_to(lora_run)) for p in lora_run.rglob("*")) == before
