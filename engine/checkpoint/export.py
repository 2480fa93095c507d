"""Getting the trained weights out of the live DeepSpeed engine: the gathered state dict, the PEFT
adapter of a LoRA run, and final/ (HF format with the tokenizer). Every function here is a
collective (ZeRO-3's partitions are gathered); rank 0 writes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from common.publish import publishing
from engine.checkpoint.run_dir import ADAPTER, RunDir
from engine.distributed import on_rank0
from engine.training.lora import merged_model, save_adapter


def full_state_dict(engine, *, zero3: bool, precision: str, only_trainable: bool = False, exported: str = ""
                    ) -> dict[str, torch.Tensor] | None:
    """The model's weights on rank 0 (fp32 master weights where mixed precision keeps them), None
    elsewhere. `only_trainable` takes just what the optimizer updates (LoRA matrices and
    modules_to_save) and no buffers; `exported` (engine.objectives.base.Stage.exported) names the
    submodule that is the model (only its weights are gathered, named as in it)."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module.get_submodule(exported)  # "" is the module itself
    params = {n: p for n, p in module.named_parameters() if p.requires_grad or not only_trainable}
    out = {}
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None, enabled=zero3):
        for name, p in params.items():
            full = safe_get_full_fp32_param(p) if precision != "fp32" and p.requires_grad else None
            out[name] = (full if full is not None else p.data).detach().float().cpu().clone()
        if not only_trainable:
            for name, b in module.named_buffers():
                out[name] = b.detach().cpu().clone()
    return out if dist.get_rank() == 0 else None


def write_adapter(engine, out_dir: Path | None, *, zero3: bool, precision: str, exported: str = "") -> None:
    """The PEFT adapter of the model (the `exported` submodule, which LoRA wraps), gathered
    (complete under every ZeRO stage), into `out_dir` on rank 0."""
    state = full_state_dict(engine, zero3=zero3, precision=precision, only_trainable=True, exported=exported)
    if state is not None:
        save_adapter(engine.module.get_submodule(exported), state, out_dir)


def export_final(engine, run: RunDir, tokenizer, model_config: Any, *, lora: bool, merge_lora: bool, zero3: bool,
                 precision: str, exported: str = "") -> Path:
    """final/: the model in HF format with the tokenizer (the `exported` submodule alone, when the
    stage names one, and LoRA wraps it alone); LoRA runs write final/adapter/ and, with
    --merge-lora-at-end, the merged model. Built under a temporary name, then put in place of an
    older final/ in one step."""
    import torch.distributed as dist

    # Gather on every rank first; then rank 0 writes while the others wait for its result.
    model_state = (full_state_dict(engine, zero3=zero3, precision=precision, exported=exported)
                   if not lora or merge_lora else None)
    adapter_state = (full_state_dict(engine, zero3=zero3, precision=precision, only_trainable=True, exported=exported)
                     if lora else None)
    model_module = engine.module.get_submodule(exported)

    def write() -> None:
        with publishing(run.final, directory=True) as tmp:
            if adapter_state is not None:
                save_adapter(model_module, adapter_state, tmp / ADAPTER)
            if model_state is not None:
                model = merged_model(model_module, model_state) if lora else plain_model(model_config, model_state)
                model.save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))

    on_rank0(write, dist.get_rank(), f"writing {run.final}")
    return run.final


def model_class(model_config: Any) -> type:
    """The Auto class of a trained model's config: a reward model's sequence classification, else
    a causal LM."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    names = model_config.architectures or []
    return (AutoModelForSequenceClassification if any(n.endswith("ForSequenceClassification") for n in names)
            else AutoModelForCausalLM)


def plain_model(model_config: Any, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A transformers model holding `state`, built without allocating random weights first."""
    with torch.device("meta"):
        model = model_class(model_config).from_config(model_config)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    return model
