"""LoRA while training, through peft: wrapping the model with the run's settings, recording them
for checkpoints, and writing a live model's adapter (PEFT format) or merged weights from
gathered tensors. (Reading adapters out of checkpoint shards offline: engine.offline.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from common.errors import ZerotrainError
from common.publish import publishing
from engine.config.tree import Config


def lora_target_modules(model: torch.nn.Module) -> list[str]:
    """Every linear projection of the architecture (Linear, or GPT-2's Conv1D), lm_head excepted."""
    from transformers.pytorch_utils import Conv1D

    output = model.get_output_embeddings()
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if isinstance(module, (torch.nn.Linear, Conv1D)) and module is not output}
    return sorted(names)


def wrap_lora(cfg: Config, model: torch.nn.Module, base_path: str | None, exported: str = "") -> torch.nn.Module:
    """get_peft_model with the run's LoRA settings (base weights frozen) on `model`'s `exported`
    submodule (engine.objectives.base.Stage.exported; all of it when ""), the rest of `model` as
    it was: the adapter is then the exported model's alone, for its base model as it is."""
    if exported:
        parent, _, name = exported.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, name, wrap_lora(cfg, owner.get_submodule(name), base_path))
        return model
    import peft

    lora = cfg.lora
    targets = lora.lora_target_modules or lora_target_modules(model)
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    for name in list(lora.lora_target_modules) + list(lora.lora_modules_to_save):
        if name not in present:
            raise ZerotrainError(f"LoRA module '{name}' is not in this model; its modules include "
                                 + ", ".join(sorted(n for n in present if n)[:20]))
    peft_config = peft.LoraConfig(r=lora.lora_r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
                                  target_modules=targets, modules_to_save=lora.lora_modules_to_save or None,
                                  task_type="CAUSAL_LM", base_model_name_or_path=base_path)
    return _peft_model(model, peft_config)


def _peft_model(model: torch.nn.Module, peft_config) -> torch.nn.Module:
    """get_peft_model without its tied-embeddings warning: tied embed_tokens/lm_head in
    modules_to_save are trained as separate copies on purpose and exported untied (merged_model,
    consolidate), where peft's ensure_weight_tying would train one copy for both."""
    import warnings

    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Model has `tie_word_embeddings=True`", category=UserWarning)
        return get_peft_model(model, peft_config)


def adapter_config(model: torch.nn.Module) -> dict[str, Any] | None:
    """A LoRA-wrapped model's PEFT adapter config, as checkpoints record it (zerotrain.json's `lora`)
    and the offline tools read it back (engine.offline.peft_names.read_adapter_config); None for a
    model without LoRA."""
    peft_config = getattr(model, "peft_config", {}).get("default")
    if peft_config is None:
        return None
    return {"r": peft_config.r, "lora_alpha": peft_config.lora_alpha, "lora_dropout": peft_config.lora_dropout,
            "target_modules": sorted(peft_config.target_modules),
            "modules_to_save": sorted(peft_config.modules_to_save or []),
            "base_model_name_or_path": peft_config.base_model_name_or_path}


def save_adapter(peft_model, state_dict: dict[str, torch.Tensor], out_dir: Path) -> None:
    """A complete PEFT adapter (adapter_model.safetensors + adapter_config.json) from gathered
    weights, so ZeRO-3's partitioned parameters never give an empty file; temporary name, then rename."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    adapter = get_peft_model_state_dict(peft_model, state_dict=state_dict, save_embedding_layers=False)
    if not adapter:
        raise ZerotrainError("the LoRA adapter came out empty; this is a bug, please report it")
    with publishing(out_dir, directory=True) as tmp:
        save_file({k: v.contiguous() for k, v in adapter.items()}, str(tmp / "adapter_model.safetensors"),
                  metadata={"format": "pt"})
        peft_model.peft_config["default"].save_pretrained(str(tmp))


def merged_model(peft_model, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A plain transformers model with the LoRA update folded in, built on the CPU from gathered weights."""
    from transformers import AutoModelForCausalLM

    base_config = peft_model.get_base_model().config
    with torch.device("meta"):
        skeleton = _peft_model(AutoModelForCausalLM.from_config(base_config), peft_model.peft_config["default"])
    skeleton.load_state_dict(state_dict, strict=False, assign=True)
    base = skeleton.get_base_model()
    head = getattr(base.get_output_embeddings(), "weight", None)
    if head is not None and head.is_meta:
        # A tied lm_head is not in the state dict (one tensor with embed_tokens, named once) and
        # assign=True replaced embed_tokens' tensor alone: tie the head to it again. (With lm_head
        # in modules_to_save the head is peft's trained copy, loaded; the meta original it wraps
        # is dropped by the merge.)
        base.get_output_embeddings().weight = base.get_input_embeddings().weight
    model = skeleton.merge_and_unload()
    # modules_to_save trains embed_tokens and lm_head as separate copies: keep them untied.
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    if model.config.tie_word_embeddings and embed is not head:
        model.config.tie_word_embeddings = False
    return model
