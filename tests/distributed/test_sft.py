"""SFT on 2 CPU ranks: LoRA under ZeRO-2/3 (complete adapters, frozen base, modules_to_save),
init from every kind of source, mixed pretrain/SFT data, token-level loss normalisation.

The 2-rank runs share one launch (`sft_runs`), the 1-rank runs from each source another; the
pretrained model is the session's (conftest's `pretrained_runs`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.data.loader import MixedDataset, ShardedSampler
from tests.helpers import SAMPLES, run_cases, selected_params, train_losses

pytestmark = pytest.mark.distributed
SHAREGPT = SAMPLES / "sharegpt_identity_500.json"


def sft_args(out, **overrides) -> list[str]:
    args = {"data": SHAREGPT, "output-dir": out, "seq-len": 64, "micro-batch-size": 2, "max-steps": 6,
            "warmup-steps": 1, "lr": 5e-3, "log-interval": 1, "eval-interval": 6, "eval-samples": 8,
            "save-interval": 3, "seed": 3, "pack": "false"}  # padded batches (SFT packs by default)
    args.update({k.replace("_", "-"): v for k, v in overrides.items()})
    return [x for k, v in args.items() for x in (f"--{k}", str(v))]


LORA_TESTS = ("test_adapter_loads_with_peft_and_matches_the_live_model", "test_adapter_is_complete_and_modules_to_save_trained",
              "test_frozen_base_weights_are_bit_identical")


@pytest.fixture(scope="module")
def sft_runs(request, base_model_dir, tokenizer_dir, tmp_path_factory) -> dict[str, Path]:
    """The module's 2-rank runs that this session's tests need, in one launch (tests/launch_cases.py):
    LoRA under ZeRO-2 and ZeRO-3, micro-batch 1 x accumulation 4 and 4 x 1, the mixed-data run."""
    out = tmp_path_factory.mktemp("sft_runs")
    cases = {}
    for stage in sorted({s for test in LORA_TESTS for s in selected_params(request, test, "lora_run")}):
        cases[f"lora{stage}"] = "sft", sft_args(
            out / f"lora{stage}", init_from=base_model_dir, zero_stage=stage, precision="fp32", lora_r=4, lora_alpha=8,
            lora_dropout=0.0, lora_modules_to_save="embed_tokens,lm_head", merge_lora_at_end="true")
    if selected_params(request, "test_sft_loss_is_normalised_over_tokens_not_micro_batches"):
        for micro, accum in ((1, 4), (4, 1)):
            cases[f"m{micro}a{accum}"] = "sft", sft_args(out / f"m{micro}a{accum}", init_from=base_model_dir,
                                                         micro_batch_size=micro, grad_accum=accum, max_steps=3,
                                                         save_interval=3, zero_stage=2, precision="fp32")
    if selected_params(request, "test_mixed_pretrain_and_sft_run"):
        cases["mixed"] = "pretrain", sft_args(out / "mixed", tokenizer=tokenizer_dir, max_steps=4, save_interval=4,
                                              zero_stage=2, data=f"pretrain:{SAMPLES / 'tinyshakespeare.txt'}:0.7") \
            + ["--data", f"sft:{SHAREGPT}:0.3"]
    if cases:
        run_cases(cases, out)
    return {name: out / name for name in cases}


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3"])
def lora_run(request, sft_runs):
    return sft_runs[f"lora{request.param}"]


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_adapter_loads_with_peft_and_matches_the_live_model(lora_run, base_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.randint(3, 500, (2, 12))
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model_dir),
                                             lora_run / "final" / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(lora_run / "final").eval()  # gathered from the live engine
    torch.testing.assert_close(logits(with_adapter, ids), logits(merged, ids), rtol=1e-4, atol=1e-4)
    base = AutoModelForCausalLM.from_pretrained(base_model_dir).eval()
    assert not torch.allclose(logits(base, ids), logits(merged, ids), atol=1e-3)
    # the adapter beside the last checkpoint is the final one
    final = load_file(lora_run / "final" / "adapter" / "adapter_model.safetensors")
    at_ckpt = load_file(lora_run / "checkpoints" / "global_step6" / "adapter" / "adapter_model.safetensors")
    assert final.keys() == at_ckpt.keys() and all(torch.equal(final[k], at_ckpt[k]) for k in final)


def test_adapter_is_complete_and_modules_to_save_trained(lora_run, base_model_dir):
    adapter = load_file(lora_run / "final" / "adapter" / "adapter_model.safetensors")
    base = load_file(base_model_dir / "model.safetensors")
    lora_a = [k for k in adapter if "lora_A" in k]
    assert len(lora_a) == 2 * 7 and all(adapter[k].numel() > 0 for k in adapter)  # 2 layers x 7 projections
    embed = adapter["base_model.model.model.embed_tokens.weight"]
    head = adapter["base_model.model.lm_head.weight"]
    assert embed.shape == base["model.embed_tokens.weight"].shape
    assert not torch.equal(embed, base["model.embed_tokens.weight"]) and not torch.equal(head, embed)
    config = json.loads((lora_run / "final" / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and sorted(config["modules_to_save"]) == ["embed_tokens", "lm_head"]
    sidecar = json.loads((lora_run / "checkpoints" / "global_step6" / "zerotrain.json").read_text())
    assert sidecar["lora"]["r"] == 4 and sidecar["config"]["lora"]["lora_r"] == 4


def test_frozen_base_weights_are_bit_identical(lora_run, base_model_dir, tmp_path):
    from engine.offline.consolidate import consolidate

    out = tmp_path / "raw.safetensors"
    consolidate(str(lora_run / "checkpoints"), str(out), keep_lora_keys=True)
    raw = load_file(out)
    base = load_file(base_model_dir / "model.safetensors")
    frozen = {k: v for k, v in raw.items() if ".base_layer." in k}
    assert len(frozen) == 14
    for key, value in frozen.items():
        name = key.replace("base_model.model.", "").replace(".base_layer", "")
        assert torch.equal(value, base[name]), key


@pytest.fixture(scope="module")
def pretrained(pretrained_runs, tmp_path_factory) -> dict[str, Path]:
    """The session's pretraining run (2 ranks, ZeRO-2) as every kind of source: its final/ (HF), a
    .pth of it, its DeepSpeed checkpoints, the run directory."""
    run = pretrained_runs[2]
    weights = load_file(run / "final" / "model.safetensors")
    pth = tmp_path_factory.mktemp("pth") / "weights.pth"
    torch.save({f"module.{k}": v for k, v in weights.items() if k != "lm_head.weight"}, pth)
    return {"hf": run / "final", "pth": pth, "deepspeed": run / "checkpoints", "run_dir": run}


def test_init_from_hf_dir_pth_and_deepspeed_checkpoint_agree(pretrained, tokenizer_dir, tmp_path):
    """One rank, each source in turn in one launch, and a start from scratch."""
    cases = {}
    for name, source in pretrained.items():
        extra = {"tokenizer": tokenizer_dir} if name == "pth" else {}
        cases[name] = "sft", sft_args(tmp_path / name, init_from=source, max_steps=2, save_interval=2, zero_stage=1,
                                      **extra)
    cases["scratch"] = "sft", sft_args(tmp_path / "scratch", tokenizer=tokenizer_dir, max_steps=2, save_interval=2,
                                       zero_stage=1)
    run_cases(cases, tmp_path, nproc=1)
    losses = {}
    for name in pretrained:
        losses[name] = train_losses(tmp_path / name)
        assert (tmp_path / name / "tokenizer" / "tokenizer.json").is_file()
    assert losses["hf"] == losses["pth"] == losses["deepspeed"] == losses["run_dir"]
    assert train_losses(tmp_path / "scratch")[1] > losses["hf"][1] + 0.05  # the pretrained start is better than random


def test_sft_loss_is_normalised_over_tokens_not_micro_batches(sft_runs):
    runs = {(micro, accum): sft_runs[f"m{micro}a{accum}"] for micro, accum in ((1, 4), (4, 1))}
    a, b = train_losses(runs[(1, 4)]), train_losses(runs[(4, 1)])
    assert all(a[s] == pytest.approx(b[s], rel=1e-5) for s in a)
    wa, wb = load_file(runs[(1, 4)] / "final" / "model.safetensors"), load_file(runs[(4, 1)] / "final" / "model.safetensors")
    # Padding changes float summation order; Adam magnifies that where its second moment is
    # tiny (rarely seen embedding rows), so weights agree to 1e-4 of lr-sized steps, not bits.
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-3, atol=1e-4)


def test_mixed_pretrain_and_sft_run(sft_runs):
    out = sft_runs["mixed"]
    losses = train_losses(out)
    assert sorted(losses) == [1, 2, 3, 4] and all(v is not None for v in losses.values())


def test_mixture_matches_its_weights():
    """2000 samples drawn through the sampler: the pretraining share is 0.7 within 0.035 (3.4 sigma)."""
    pretrain = [{"source": 0}] * 300
    sft = [{"source": 1}] * 40
    mixed = MixedDataset([pretrain, sft], [0.7, 0.3], seed=5, length=4000)
    sampler = ShardedSampler(len(mixed), 0, 1, seed=9)
    drawn = [mixed[i]["source"] for i in sampler.next_indices(2000)]
    assert abs(drawn.count(0) / 2000 - 0.7) < 0.035
    # every sft sample is used, cycling, rather than a few over and over
    assert len(set(mixed.index[mixed.source == 1].tolist())) == 40
