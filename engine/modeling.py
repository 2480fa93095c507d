"""The model a run trains: from a preset or any earlier output (--init-from), optionally LoRA-wrapped.

--init-from takes an HF model directory, a .pth/.safetensors state dict (shaped like --preset),
a run directory (its final/, else its checkpoints/), or a DeepSpeed checkpoint directory (any
ZeRO stage); engine.run_dir.resolve says which. The tokenizer comes with the source unless
--tokenizer names one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from common.errors import ZerotrainError
from common.publish import publishing
from engine.config import Config
from engine.run_dir import Resolved, resolve, resolve_tag


def resolve_init_from(init_from: str) -> Resolved | None:
    """What --init-from names (None: a fresh model from the preset), failing early with a clear message."""
    if not init_from:
        return None
    return resolve(init_from, ("hf", "state_dict", "deepspeed"), "--init-from")


def tokenizer_path(cfg: Config, source: Resolved | None) -> str:
    if cfg.model.tokenizer:
        return cfg.model.tokenizer
    if source is not None and source.tokenizer is not None:
        return str(source.tokenizer)
    if source is None:  # from scratch: the tokenizer zerotrain ships, as MiniMind ships its own
        from model.tokenizer import DEFAULT_TOKENIZER

        return str(DEFAULT_TOKENIZER)
    # A model without its tokenizer: guessing one could silently mis-map every id.
    raise ZerotrainError(f"--tokenizer is required ({source.path} has none): the HF tokenizer directory or "
                         "sentencepiece .model the model was trained with")


def lora_target_modules(model: torch.nn.Module) -> list[str]:
    """Every linear projection of the architecture (Linear, or GPT-2's Conv1D), lm_head excepted."""
    from transformers.pytorch_utils import Conv1D

    output = model.get_output_embeddings()
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if isinstance(module, (torch.nn.Linear, Conv1D)) and module is not output}
    return sorted(names)


def build_base_model(cfg: Config, source: Resolved | None, tokenizer: Any, context: int) -> torch.nn.Module:
    """The (not yet LoRA-wrapped) model: random from the preset, or loaded from the source, its
    embeddings resized when `tokenizer` extends the source's own (fit_vocabulary)."""
    from model.build import build_model
    from model.tokenizer import load_tokenizer

    attn = cfg.model.attn_implementation
    if source is None:
        return build_model(cfg.model.preset, vocab_size=len(tokenizer), max_seq_len=context, attn_implementation=attn)
    if source.kind == "state_dict":
        # shaped by the tokenizer it was trained with (the one beside it), which --tokenizer may extend
        own = load_tokenizer(str(source.tokenizer)) if cfg.model.tokenizer and source.tokenizer else tokenizer
        model = build_model(str(source.path), preset=cfg.model.preset, vocab_size=len(own), max_seq_len=context,
                            attn_implementation=attn)
    elif source.kind == "hf":
        model = build_model(str(source.path), attn_implementation=attn)
    else:
        model = _model_from_checkpoint(cfg, source)
    return fit_vocabulary(model, tokenizer, source)


def fit_vocabulary(model: torch.nn.Module, tokenizer: Any, source: Resolved) -> torch.nn.Module:
    """`model` with room for every token of `tokenizer`: unchanged when it has an embedding row for
    each; grown with transformers' resize_token_embeddings (input and output embeddings, new rows
    initialised as it does by default) when `tokenizer` extends the source's own tokenizer, keeping
    each of its tokens' ids (zerotrain extend-tokenizer); any other tokenizer is refused.

    Called on the whole model on every rank, before deepspeed.initialize (ZeRO-3 included), with the
    same seed everywhere, so every rank holds the same new rows when DeepSpeed partitions them."""
    from engine.distributed import world
    from engine.trainer import log_on_rank0
    from model.tokenizer import id_changes, load_tokenizer

    rows, size, name = model.get_input_embeddings().weight.shape[0], len(tokenizer), tokenizer.name_or_path
    if rows >= size:
        return model
    problem = f"--init-from {source.path} has {rows} token embeddings but tokenizer {name} has {size} tokens"
    own = load_tokenizer(str(source.tokenizer)) if source.tokenizer is not None else None
    if own is None:
        raise ZerotrainError(f"{problem}, and no tokenizer of its own beside it to check that {name} extends it: "
                             "use the tokenizer that model was trained with, or put it beside the model")
    changed = id_changes(own, tokenizer)
    if changed:
        raise ZerotrainError(f"{problem} and does not keep the ids of the model's own tokenizer {source.tokenizer} "
                             f"({len(changed)} of its {len(own)} tokens differ: {', '.join(changed[:3])}): use the "
                             "tokenizer that model was trained with, or one made from it with `zerotrain "
                             "extend-tokenizer`")
    model.resize_token_embeddings(size)
    log_on_rank0(world().rank, f"resized embeddings {rows} -> {size} for tokenizer {name}")
    return model


def _model_from_checkpoint(cfg: Config, source: Resolved) -> torch.nn.Module:
    """The weights of a DeepSpeed checkpoint tag (fp32 masters, a LoRA adapter folded in) in a model
    built from the config consolidate would write beside them, read one tensor at a time."""
    from engine.offline.consolidate import checkpoint_entries
    from engine.offline.ds_weights import load_checkpoint
    from engine.offline.hf_dir import find_model_config, untie_trained_head
    from model.build import build_from_config
    from model.state_dict import check_state_dict, copy_into

    tag_dir = resolve_tag(source.path, source.tag)
    ckpt = load_checkpoint(tag_dir)
    entries, _, _ = checkpoint_entries(ckpt)
    # --preset gives the shape when a foreign checkpoint carries no config of its own
    config, where = find_model_config(tag_dir.parent, ckpt, entries, default_preset=cfg.model.preset)
    if config is None:
        raise ZerotrainError(f"--init-from {tag_dir}: no model config beside the checkpoint (no config.json, no "
                             f"zerotrain.json); pass the --preset it was trained with")
    untie_trained_head(config, entries)
    model = build_from_config(config, where, dtype=torch.float32, attn_implementation=cfg.model.attn_implementation)
    check_state_dict({e.name: e.shape for e in entries}, model, source=f"--init-from checkpoint {tag_dir}",
                     target=f"the model config from {where}", noun="checkpoint",
                     advice="Pass the --preset it was trained with (a checkpoint without config.json or "
                            "zerotrain.json takes its shape from --preset).")
    copy_into(model, ((e.name, e.produce(None)) for e in entries))
    return model


def wrap_lora(cfg: Config, model: torch.nn.Module, base_path: str | None) -> torch.nn.Module:
    """get_peft_model with the run's LoRA settings (base weights frozen)."""
    from peft import LoraConfig as PeftLoraConfig

    lora = cfg.lora
    targets = lora.lora_target_modules or lora_target_modules(model)
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    for name in list(lora.lora_target_modules) + list(lora.lora_modules_to_save):
        if name not in present:
            raise ZerotrainError(f"LoRA module '{name}' is not in this model; its modules include "
                                 + ", ".join(sorted(n for n in present if n)[:20]))
    peft_config = PeftLoraConfig(r=lora.lora_r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
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


def lora_record(model: torch.nn.Module) -> dict[str, Any] | None:
    """The LoRA settings as recorded in checkpoints (zerotrain.json) and read back by the tools."""
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
    model = skeleton.merge_and_unload()
    # modules_to_save trains embed_tokens and lm_head as separate copies: keep them untied.
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    if model.config.tie_word_embeddings and embed is not head:
        model.config.tie_word_embeddings = False
    return model
