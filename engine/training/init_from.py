"""The weights a run starts from: a preset's random init, or whatever --init-from names (an HF
model directory, a .pth/.safetensors state dict shaped like --preset, a run directory (its final/,
else its checkpoints/), a DeepSpeed checkpoint directory of any ZeRO stage; engine.checkpoint.run_dir
says which), with its embeddings grown to a tokenizer that extends its own. The tokenizer comes
with the source unless --tokenizer names one. Frozen models (a reference, a teacher) are built
the same way, and so are the models `zerotrain generate | chat | eval | serve` load (engine.apps.generate).
"""

from __future__ import annotations

from typing import Any

import torch

from common.errors import ZerotrainError
from engine.checkpoint.run_dir import Resolved, resolve, resolve_tag
from engine.config.tree import Config
from engine.distributed import log_on_rank0, world

MODEL_KINDS = ("hf", "state_dict", "deepspeed")
"""What can stand for a model's weights: an HF directory, a state dict, a DeepSpeed checkpoint (a run
directory stands for its final/, else its checkpoints/)."""


def resolve_init_from(init_from: str, what: str = "--init-from") -> Resolved | None:
    """What --init-from names (None: a fresh model from the preset), failing early with a clear
    message; `what` names the argument in it."""
    if not init_from:
        return None
    return resolve(init_from, MODEL_KINDS, what)


def run_context(cfg: Config) -> int:
    """The positions a run's model is built for when a preset shapes it: the preset's, or the
    run's --seq-len when longer (checks the preset's name)."""
    from model.presets import preset_config

    return max(preset_config(cfg.model.preset).max_position_embeddings, cfg.data.seq_len)


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


def build_base_model(cfg: Config, source: Resolved | None, tokenizer: Any, context: int) -> torch.nn.Module:
    """The (not yet LoRA-wrapped) model: random from the preset, or loaded from the source, its
    embeddings resized when `tokenizer` extends the source's own (fit_vocabulary)."""
    from model.build import build_model
    from model.tokenizer import load_tokenizer

    attn = cfg.model.attn_implementation
    if source is None:
        return build_model(cfg.model.preset, vocab_size=len(tokenizer), max_seq_len=context, attn_implementation=attn)
    own = tokenizer  # a state dict is shaped by the tokenizer it was trained with, which --tokenizer may extend
    if source.kind == "state_dict" and cfg.model.tokenizer and source.tokenizer:
        own = load_tokenizer(str(source.tokenizer))
    model = load_source(source, preset=cfg.model.preset, vocab_size=len(own), context=context, attn_implementation=attn)
    return fit_vocabulary(model, tokenizer, source)


def load_source(source: Resolved, *, preset: str | None, vocab_size: int | None = None, context: int | None = None,
                attn_implementation: str = "sdpa", what: str = "--init-from") -> torch.nn.Module:
    """The model a resolved source holds, in fp32: an HF directory's; a state dict's, shaped by
    `preset` (with `vocab_size`, `context`), else by the config.json beside it; a DeepSpeed
    checkpoint tag's, gathered in memory (engine.offline, as consolidate reads it), shaped by its
    own config, else by `preset`. `what` names the argument in errors."""
    from model.build import build_model

    if source.kind == "state_dict":
        return build_model(str(source.path), preset=preset, vocab_size=vocab_size, max_seq_len=context,
                           attn_implementation=attn_implementation)
    if source.kind == "hf":
        return build_model(str(source.path), attn_implementation=attn_implementation)
    return _model_from_checkpoint(source, preset, attn_implementation, what)


def fit_vocabulary(model: torch.nn.Module, tokenizer: Any, source: Resolved) -> torch.nn.Module:
    """`model` with room for every token of `tokenizer`: unchanged when it has an embedding row for
    each; grown with transformers' resize_token_embeddings (input and output embeddings, new rows
    initialised as it does by default) when `tokenizer` extends the source's own tokenizer, keeping
    each of its tokens' ids (zerotrain extend-tokenizer); any other tokenizer is refused.

    Called on the whole model on every rank, before deepspeed.initialize (ZeRO-3 included), with the
    same seed everywhere, so every rank holds the same new rows when DeepSpeed partitions them."""
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


def _model_from_checkpoint(source: Resolved, preset: str | None, attn_implementation: str,
                           what: str) -> torch.nn.Module:
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
    config, where = find_model_config(tag_dir.parent, ckpt, entries, default_preset=preset)
    if config is None:
        raise ZerotrainError(f"{what} {tag_dir}: no model config beside the checkpoint (no config.json, no "
                             f"zerotrain.json); pass the --preset it was trained with")
    untie_trained_head(config, entries)
    model = build_from_config(config, where, dtype=torch.float32, attn_implementation=attn_implementation)
    check_state_dict({e.name: e.shape for e in entries}, model, source=f"{what} checkpoint {tag_dir}",
                     target=f"the model config from {where}", noun="checkpoint",
                     advice="Pass the --preset it was trained with (a checkpoint without config.json or "
                            "zerotrain.json takes its shape from --preset).")
    copy_into(model, ((e.name, e.produce(None)) for e in entries))
    return model
