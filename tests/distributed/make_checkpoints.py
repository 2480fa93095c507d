"""Train tiny models for 2 steps under DeepSpeed on 2 CPU ranks, save checkpoints, and dump the
live weights next to them, for the consolidation tests. Run with

    torchrun --nproc_per_node 2 tests/distributed/make_checkpoints.py OUT_DIR TOKENIZER_DIR [CASE...]

Several ZeRO configurations run one after another in one process, so the start-up is paid once.
It is a plain `deepspeed.initialize` script, so its checkpoints stand for "any DeepSpeed program";
the `zerotrain` and `hf_trainer` layouts add what those tools write beside the shards.

For each case OUT_DIR/CASE/manifest.json names the checkpoint dir and, per tag, a live_<tag>.pt:
    params   {name: tensor}  every parameter, gathered (ZeRO-3), in the training dtype
    masters  {name: tensor}  fp32 master of every trainable parameter
    tied     {alias: name}   parameters that are one tensor
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param
from transformers import AutoModelForCausalLM, GPT2Config

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from engine.checkpoint.sidecar import Sidecar  # noqa: E402
from engine.config.tree import Config
from model.presets import preset_config  # noqa: E402

LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])

CASES: dict[str, dict] = {
    "z0-fp32": dict(arch="llama", stage=0, precision="fp32"),
    "z0-bf16": dict(arch="llama", stage=0, precision="bf16", freeze=["model.norm.weight"]),
    "z1-fp32": dict(arch="llama", stage=1, precision="fp32"),
    "z1-bf16": dict(arch="llama", stage=1, precision="bf16", freeze=["model.norm.weight"]),
    # bf16 weights with fp32 gradient accumulation at stage 1: DeepSpeed's BF16_Optimizer.
    "z1-bf16-fp32acc": dict(arch="gpt2", stage=1, precision="bf16", grad_accum_dtype="fp32"),
    "z2-fp32": dict(arch="gpt2", stage=2, precision="fp32"),
    "z2-bf16": dict(arch="llama", stage=2, precision="bf16", layout="zerotrain"),
    "z3-fp32": dict(arch="llama", stage=3, precision="fp32", save_steps=(1, 2)),
    "z3-bf16": dict(arch="llama", stage=3, precision="bf16", freeze=["model.norm.weight"]),
    "gpt2-z3": dict(arch="gpt2", stage=3, precision="fp32", layout="hf_trainer"),
    "lora-z2": dict(arch="llama", stage=2, precision="bf16", lora=True),
    "lora-z3": dict(arch="llama", stage=3, precision="fp32", lora=True, layout="zerotrain"),
    # HF Trainer with a PeftModel: frozen weights left out of the shards, the adapter beside them.
    "lora-hf": dict(arch="llama", stage=3, precision="bf16", lora=True, layout="hf_trainer", exclude_frozen=True),
}


def build_model(spec: dict, vocab_size: int) -> torch.nn.Module:
    if spec["arch"] == "gpt2":
        # Odd widths, so ZeRO has to pad its partitions.
        config = GPT2Config(vocab_size=vocab_size, n_positions=64, n_embd=33, n_layer=2, n_head=3, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True, bos_token_id=None,
                            eos_token_id=None)
    else:
        config = preset_config("debug", vocab_size=vocab_size)
    model = AutoModelForCausalLM.from_config(config)
    for name, p in model.named_parameters():
        if name in spec.get("freeze", ()):
            p.requires_grad_(False)
    if spec.get("lora"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA))
    return model


def ds_config(spec: dict) -> dict:
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 10 ** 9,
              "zero_optimization": {"stage": spec["stage"]}, "bf16": {"enabled": spec["precision"] == "bf16"}}
    if spec.get("grad_accum_dtype"):
        config["data_types"] = {"grad_accum_dtype": spec["grad_accum_dtype"]}
    return config


def live_state(engine, model: torch.nn.Module, stage: int) -> dict:
    """Every parameter gathered, plus the optimizer's fp32 masters (collective: all ranks call it)."""
    named = list(model.named_parameters(remove_duplicate=False))
    first: dict[int, str] = {}
    tied = {}
    for name, p in named:
        if id(p) in first:
            tied[name] = first[id(p)]
        else:
            first[id(p)] = name
    params = {}
    if stage == 3:
        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
            params = {n: p.detach().clone() for n, p in named if n not in tied}
    else:
        params = {n: p.detach().clone() for n, p in named if n not in tied}
    masters = {}
    if stage == 0:
        opt = engine.optimizer
        if hasattr(opt, "fp32_groups") and hasattr(opt, "fp16_groups"):
            names = {id(p): n for n, p in named if n not in tied}
            for lp_group, hp_group in zip(opt.fp16_groups, opt.fp32_groups):
                for lp, hp in zip(lp_group, hp_group):
                    masters[names[id(lp)]] = hp.detach().clone()
        else:
            masters = {n: p.detach().clone() for n, p in named if p.requires_grad and n not in tied}
    else:
        for n, p in named:
            if p.requires_grad and n not in tied:
                masters[n] = safe_get_full_fp32_param(p).detach().clone()
    return {"params": params, "masters": masters, "tied": tied}


def run_case(name: str, spec: dict, out: Path, tokenizer_dir: Path) -> None:
    rank = dist.get_rank()
    case_dir = out / name
    layout = spec.get("layout", "plain")
    vocab = 256
    if layout != "plain":
        from model.tokenizer import load_tokenizer

        vocab = len(load_tokenizer(str(tokenizer_dir)))
    if layout == "zerotrain":
        run_dir = case_dir / "run"
        ckpt_dir = run_dir / "checkpoints"
    elif layout == "hf_trainer":
        ckpt_dir = case_dir / "checkpoint-2"
    else:
        ckpt_dir = case_dir / "ckpt"

    torch.manual_seed(1234)
    model = build_model(spec, vocab)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config(spec))
    gen = torch.Generator().manual_seed(99)
    manifest = {"case": name, "ckpt_dir": str(ckpt_dir), "live": {}}
    for step in range(1, max(spec.get("save_steps", (2,))) + 1):
        x = torch.randint(0, vocab, (2, 16), generator=gen)
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()
        if step in spec.get("save_steps", (2,)):
            tag = f"global_step{step}"
            engine.save_checkpoint(str(ckpt_dir), tag=tag, exclude_frozen_parameters=spec.get("exclude_frozen", False))
            state = live_state(engine, model, spec["stage"])
            if spec.get("lora") and spec["stage"] == 3:
                with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
                    if rank == 0:
                        model.save_pretrained(str(case_dir / f"peft_{tag}"))
            elif spec.get("lora") and rank == 0:
                model.save_pretrained(str(case_dir / f"peft_{tag}"))
            if rank == 0:
                torch.save(state, case_dir / f"live_{tag}.pt")
                manifest["live"][tag] = str(case_dir / f"live_{tag}.pt")
                if layout == "zerotrain":
                    write_zerotrain_files(run_dir, ckpt_dir / tag, spec, model, step, tokenizer_dir)
            dist.barrier()
    if rank == 0:
        if layout == "hf_trainer":
            if spec.get("lora"):
                for f in (case_dir / "peft_global_step2").iterdir():
                    shutil.copy2(f, ckpt_dir / f.name)
            model.config.save_pretrained(ckpt_dir)
            model.generation_config.save_pretrained(ckpt_dir)
            for f in tokenizer_dir.iterdir():
                shutil.copy2(f, ckpt_dir / f.name)
        (case_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    dist.barrier()


def write_zerotrain_files(run_dir: Path, tag_dir: Path, spec: dict, model, step: int, tokenizer_dir: Path) -> None:
    """What zerotrain's engine writes beside DeepSpeed's shards: config.yaml, tokenizer/, zerotrain.json."""
    if not (run_dir / "tokenizer").is_dir():
        shutil.copytree(tokenizer_dir, run_dir / "tokenizer")
    config = Config.from_dict({"tokenizer": str(run_dir / "tokenizer"), "output_dir": str(run_dir),
                               "zero_stage": spec["stage"], "precision": spec["precision"], "max_steps": 2,
                               "warmup_steps": 0})
    config.save(run_dir / "config.yaml")
    base = model.get_base_model() if spec.get("lora") else model
    Sidecar(step=step, tokens_seen=step * 64, kind="sft" if spec.get("lora") else "pretrain", zero_stage=spec["stage"],
            world_size=dist.get_world_size(), precision=spec["precision"], config=config.to_dict(),
            model_config=base.config.to_dict(), lora=dict(LORA) if spec.get("lora") else None).write(tag_dir)


def main() -> None:
    out, tokenizer_dir = Path(sys.argv[1]), Path(sys.argv[2])
    names = sys.argv[3:] or list(CASES)
    deepspeed.init_distributed("gloo")
    for name in names:
        run_case(name, CASES[name], out, tokenizer_dir)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
