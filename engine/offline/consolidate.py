"""`zerotrain consolidate`: a DeepSpeed checkpoint -> one `.pth`, one `.safetensors`, or an HF model
directory (weights, config.json, generation_config.json, tokenizer), a LoRA adapter folded in.

Everything streams: a tensor is read from the shards (engine.offline.ds_weights), converted and
written (engine.offline.model_files) before the next is read, so memory holds one tensor, never the
model. Output goes to a temporary name next to OUTPUT and is renamed into place once complete; on
any error nothing is left behind.

Tied weights: a `.pth` keeps both names over one storage (it loads strictly into the model,
`lm_head.weight` included); `.safetensors` files and HF directories leave the tied copy out, as
`save_pretrained` does.
"""

from __future__ import annotations

from dataclasses import replace

from common.errors import ZerotrainError
from common.publish import check_apart
from engine.checkpoint.run_dir import resolve_tag
from engine.offline.ds_weights import Checkpoint, load_checkpoint
from engine.offline.hf_dir import (
    check_against_config,
    find_model_config,
    tokenizer_source,
    write_extras,
)
from engine.offline.model_files import Written, plan_output
from engine.offline.peft_names import fold_lora, read_adapter_config
from engine.offline.tensors import Entry, source_entries


def checkpoint_entries(ckpt: Checkpoint, *, keep_lora_keys: bool = False, lora_alpha: float | None = None,
                       adapter_config: str | None = None) -> tuple[list[Entry], dict[str, str], list[str]]:
    """The weights of a loaded checkpoint tag (fp32 masters where it has them), its tied names, and
    notes for the user. A LoRA checkpoint's adapter is folded into the base weights, with the alpha
    from `read_adapter_config`, unless `keep_lora_keys`."""
    tag_dir = ckpt.info.path
    entries, aliases, left_out = exported_entries(ckpt)
    notes = list(ckpt.notes) + left_out
    if ckpt.info.is_lora and not keep_lora_keys:
        settings = read_adapter_config(tag_dir, ckpt.sidecar, lora_alpha=lora_alpha, adapter_config=adapter_config)
        if settings is None:
            raise ZerotrainError(f"{tag_dir} is a LoRA checkpoint and its lora_alpha is unknown (no zerotrain.json "
                                 f"or adapter_config.json beside it): pass --lora-alpha A or --adapter-config FILE "
                                 f"to fold the adapter into the weights, or --keep-lora-keys to keep the raw keys")
        entries, aliases = fold_lora(entries, aliases, settings)
        notes.append(f"LoRA folded into the base weights (alpha from {settings.source})")
    return entries, aliases, notes


def exported_entries(ckpt: Checkpoint) -> tuple[list[Entry], dict[str, str], list[str]]:
    """The model's tensors of a loaded checkpoint tag, named as in the model, its tied names and
    a note on what was left out: the submodule its sidecar names as the model
    (engine.objectives.base.Stage.exported: PPO's actor) alone, else all of them."""
    entries, aliases = source_entries(ckpt.tensors), dict(ckpt.aliases)
    notes = []
    exported = ckpt.sidecar.exported if ckpt.sidecar is not None else ""
    if exported:
        entries, aliases, others = submodule_entries(entries, aliases, exported)
        notes.append(f"the model is the checkpoint's {exported} (its {ckpt.sidecar.kind} run trained "
                     f"{', '.join(others)} beside it, left out)")
    return entries, aliases, notes


def submodule_entries(entries: list[Entry], aliases: dict[str, str], prefix: str
                      ) -> tuple[list[Entry], dict[str, str], list[str]]:
    """The entries and tied names under `prefix` (a submodule's name), named as in that submodule,
    and the other submodules' names."""
    start = prefix + "."
    if not any(e.name.startswith(start) for e in entries):
        raise ZerotrainError(f"the checkpoint's sidecar says its model is {prefix}, but it holds no {start}* weights")
    kept = [replace(e, name=e.name[len(start):]) for e in entries if e.name.startswith(start)]
    tied = {k[len(start):]: v[len(start):] for k, v in aliases.items() if k.startswith(start) and v.startswith(start)}
    others = sorted({e.name.split(".")[0] for e in entries if not e.name.startswith(start)})
    return kept, tied, others


def consolidate(ckpt_dir: str, output: str, *, tag: str | None = None, dtype: str = "fp32",
                max_shard_size: str | int = "5GB", keep_lora_keys: bool = False, lora_alpha: float | None = None,
                adapter_config: str | None = None, config: str | None = None, preset: str | None = None,
                trust_pickle: bool = False, overwrite: bool = False) -> Written:
    """Write the weights of one checkpoint tag as OUTPUT (.pth, .safetensors or an HF directory)."""
    plan = plan_output(output, dtype, max_shard_size, overwrite)
    tag_dir = resolve_tag(ckpt_dir, tag)
    ckpt_root = tag_dir.parent
    check_apart(plan.path, [("the checkpoint directory", ckpt_root)])
    ckpt = load_checkpoint(tag_dir, trust_pickle=trust_pickle)
    entries, aliases, notes = checkpoint_entries(ckpt, keep_lora_keys=keep_lora_keys, lora_alpha=lora_alpha,
                                                 adapter_config=adapter_config)
    extras = None
    if plan.kind == "dir":
        if keep_lora_keys and ckpt.info.is_lora:
            raise ZerotrainError("--keep-lora-keys keeps PEFT's key names, which an HF model directory cannot hold; "
                                 "write a .pth or .safetensors file instead")
        model_config, where = find_model_config(ckpt_root, ckpt, entries, config=config, preset=preset)
        if model_config is None:
            raise ZerotrainError(f"no model config for {tag_dir} (no config.json beside the checkpoint, no "
                                 f"zerotrain.json): pass --config CONFIG_JSON or --preset NAME to write an HF "
                                 f"directory, or write a .pth / .safetensors file")
        check_against_config(entries, model_config, where)
        tokenizer = tokenizer_source(ckpt_root, ckpt)
        check_apart(plan.path, [("the tokenizer", tokenizer), ("the model config", config)], inside_ok=True)
        if tokenizer is None:
            notes.append("no tokenizer found beside the checkpoint; copy one into the directory")
        generation_dir = ckpt_root if (ckpt_root / "generation_config.json").is_file() else ckpt_root.parent
        extras = lambda d: write_extras(d, model_config, plan.target, entries, generation_dir, tokenizer)  # noqa: E731
    total = plan.write(entries, aliases, extras)
    params = sum(e.numel for e in entries)
    return Written(plan.path, len(entries), params, total, notes)
