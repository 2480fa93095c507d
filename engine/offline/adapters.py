"""`zerotrain extract-adapter`: the LoRA adapter of a DeepSpeed checkpoint, in PEFT format, straight
from the shards; `zerotrain merge-adapter`: a PEFT adapter folded into its base model.

Both stream as consolidate does (engine.offline.model_files' readers and writers): one tensor in
memory at a time, written under a temporary name and put in place once complete.
"""

from __future__ import annotations

from pathlib import Path

import torch

from common.errors import ZerotrainError
from common.publish import check_apart
from engine.checkpoint.run_dir import (
    ADAPTER,
    FINAL,
    has_tokenizer,
    resolve,
    resolve_tag,
)
from engine.config.precision import output_dtype
from engine.offline.consolidate import exported_entries
from engine.offline.ds_weights import load_checkpoint
from engine.offline.hf_dir import (
    check_against_config,
    load_config_json,
    tokenizer_source,
    write_extras,
    write_tokenizer,
)
from engine.offline.model_files import (
    Written,
    model_entries,
    plan_output,
    refuse_existing,
    staged,
    state_dict_entries,
)
from engine.offline.peft_names import (
    fold_lora,
    lora_module,
    lora_name_in_model,
    peft_adapter,
    read_adapter_config,
    strip_peft,
)
from engine.offline.safetensors_io import write_safetensors
from engine.offline.tensors import Entry


def extract_adapter(ckpt_dir: str, out_dir: str, *, tag: str | None = None, lora_alpha: float | None = None,
                    adapter_config: str | None = None, dtype: str = "fp32", trust_pickle: bool = False,
                    overwrite: bool = False) -> Written:
    """Write the LoRA adapter of a checkpoint in PEFT format (adapter_model.safetensors + adapter_config.json),
    with the tokenizer the run trained it with (merge-adapter takes it from there: the run's may
    extend the base model's vocabulary)."""
    out = Path(out_dir)
    target = output_dtype(dtype)
    refuse_existing(out, overwrite)
    tag_dir = resolve_tag(ckpt_dir, tag)
    check_apart(out, [("the checkpoint directory", tag_dir.parent)])
    ckpt = load_checkpoint(tag_dir, trust_pickle=trust_pickle)
    if not ckpt.info.is_lora:
        raise ZerotrainError(f"{tag_dir} holds no LoRA weights (no lora_A keys); nothing to extract")
    settings = read_adapter_config(tag_dir, ckpt.sidecar, lora_alpha=lora_alpha, adapter_config=adapter_config)
    if settings is None:
        raise ZerotrainError(f"the lora_alpha of {tag_dir} is unknown (no zerotrain.json or adapter_config.json "
                             f"beside it): pass --lora-alpha A or --adapter-config FILE")
    # The model's adapter alone: a PPO run's actor's, named as in a plain causal LM.
    entries, _, notes = exported_entries(ckpt)
    adapter_entries, peft_config = peft_adapter(entries, settings)

    from peft import LoraConfig

    known = set(LoraConfig.__dataclass_fields__)
    tokenizer = tokenizer_source(tag_dir.parent, ckpt)
    check_apart(out, [("the tokenizer", tokenizer)], inside_ok=True)
    with staged(out, overwrite, is_dir=True) as tmp:
        total = write_safetensors(adapter_entries, tmp / "adapter_model.safetensors", target)
        LoraConfig(**{k: v for k, v in peft_config.items() if k in known}).save_pretrained(str(tmp))
        if tokenizer is not None:
            write_tokenizer(tmp, tokenizer)
    params = sum(e.numel for e in adapter_entries)
    notes += [f"lora_alpha from {settings.source}"] + ([f"tokenizer from {tokenizer}"] if tokenizer else [])
    return Written(out, len(adapter_entries), params, total, notes)


def merge_adapter(base: str, adapter: str, output: str, *, dtype: str = "auto", max_shard_size: str | int = "5GB",
                  trust_pickle: bool = False, overwrite: bool = False) -> Written:
    """Fold a PEFT LoRA adapter into a base model (HF dir or .pth/.safetensors), tensor by tensor."""
    plan = plan_output(output, dtype, max_shard_size, overwrite)
    # run directories stand for what their final/ holds: RUN/final (base), RUN/final/adapter
    base_path = resolve(base, ("hf", "weights", "state_dict"), "BASE").path
    adapter_path = resolve(adapter, ("adapter",), "ADAPTER").path
    check_apart(plan.path, [("the base model", base_path), ("the adapter", adapter_path)])
    base_entries, base_aliases = model_entries(base_path, trust_pickle=trust_pickle)
    config_file = adapter_path / "adapter_config.json"
    settings = read_adapter_config(None, None, adapter_config=str(config_file))
    if settings.config.get("peft_type", "LORA") != "LORA" or settings.config.get("use_dora"):
        raise ZerotrainError(f"{config_file}: only plain LoRA adapters can be merged (peft_type "
                             f"{settings.config.get('peft_type')}, use_dora {settings.config.get('use_dora')})")
    weights = next((adapter_path / n for n in ("adapter_model.safetensors", "adapter_model.bin")
                    if (adapter_path / n).is_file()), None)
    if weights is None:
        raise ZerotrainError(f"{adapter_path} has no adapter_model.safetensors or adapter_model.bin")
    adapter_entries, _ = state_dict_entries(weights, trust_pickle=trust_pickle)

    merged: dict[str, Entry] = {e.name: e for e in base_entries}
    lora: list[Entry] = []
    replaced = 0
    grown: dict[str, tuple[int, int]] = {}  # embeddings trained over an extended vocabulary: rows before, after
    for e in adapter_entries:
        name = strip_peft(e.name)
        if (lora_name := lora_name_in_model(name)) is not None:
            lora.append(Entry(lora_name, e.shape, e.dtype, e.produce))
            continue
        if name in merged and merged[name].shape != e.shape:
            before = merged[name].shape
            if len(e.shape) != 2 or before[1:] != e.shape[1:] or before[0] > e.shape[0]:
                raise ZerotrainError(f"adapter tensor {e.name} has shape {e.shape}, the base's {before}")
            grown[name] = (before[0], e.shape[0])
        merged[name] = Entry(name, e.shape, e.dtype, e.produce)  # modules_to_save: the trained copy wins
        base_aliases.pop(name, None)
        replaced += 1
    if not lora and not replaced:
        raise ZerotrainError(f"{weights} holds no LoRA weights")
    if len(set(grown.values())) > 1:
        raise ZerotrainError("the adapter's embeddings grow to different sizes: "
                             + ", ".join(f"{n} {a} -> {b}" for n, (a, b) in grown.items()))
    missing = [e.name for e in lora if lora_module(e.name) + ".weight" not in merged]
    if missing:
        raise ZerotrainError(f"the adapter targets {lora_module(missing[0])}, which the base "
                             f"model {base_path} does not have; is it the adapter's base model?")
    entries, aliases = fold_lora(list(merged.values()) + lora, base_aliases, settings)
    if plan.target is None:  # keep each base tensor's dtype: folded weights go back to their base's
        base_dtypes = {e.name: e.dtype for e in base_entries}
        entries = [_cast_to(e, base_dtypes.get(e.name)) for e in entries]
    extras = None
    if plan.kind == "dir":
        config_dir = base_path if base_path.is_dir() else base_path.parent
        if not (config_dir / "config.json").is_file():
            raise ZerotrainError(f"no config.json beside {base_path}: an HF directory output needs one; "
                                 f"write a .pth or .safetensors file instead")
        model_config = load_config_json(config_dir / "config.json")
        trained_with = _adapter_tokenizer(adapter_path)
        if grown:
            old_rows, model_config.vocab_size = next(iter(grown.values()))  # all alike, checked above
            if trained_with is None:
                raise ZerotrainError(f"the adapter's {', '.join(grown)} have {model_config.vocab_size} rows, the base "
                                     f"model's {old_rows}: it was trained with an extended tokenizer, which is not "
                                     f"in {adapter_path}; copy that tokenizer's files there")
        check_against_config(entries, model_config, str(config_dir / "config.json"))
        tokenizer = trained_with or tokenizer_source(config_dir, None)
        check_apart(plan.path, [("the model config", config_dir / "config.json"), ("the tokenizer", tokenizer)],
                    inside_ok=True)
        extras = lambda d: write_extras(d, model_config, plan.target, entries, config_dir, tokenizer)  # noqa: E731
    total = plan.write(entries, aliases, extras)
    notes = [f"{len(lora) // 2} LoRA pairs folded, {replaced} modules_to_save tensors replaced"]
    notes += [f"vocabulary grown {a} -> {b} rows ({', '.join(grown)})" for a, b in set(grown.values())]
    return Written(plan.path, len(entries), sum(e.numel for e in entries), total, notes)


def _adapter_tokenizer(adapter: Path) -> Path | None:
    """The tokenizer an adapter was trained with: in its directory (extract-adapter writes it there),
    or beside it in a run's final/."""
    if has_tokenizer(adapter):
        return adapter
    if (adapter.parent.name, adapter.name) == (FINAL, ADAPTER) and has_tokenizer(adapter.parent):
        return adapter.parent
    return None


def _cast_to(e: Entry, dtype: torch.dtype | None) -> Entry:
    if dtype is None or dtype == e.dtype or not e.dtype.is_floating_point:
        return e
    return Entry(e.name, e.shape, dtype, lambda into=None: e.produce(None).to(dtype))
