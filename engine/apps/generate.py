"""Using a trained model: load it (plus a LoRA adapter) for inference, generate and chat.

What a MODEL argument names is decided here (resolve_model, over engine.checkpoint.run_dir's
`resolve`) and the weights are built as --init-from builds them (engine.training.init_from).

Generation is transformers' own `model.generate`; `zerotrain eval` (engine.apps.evaluate) and
`zerotrain serve` (engine.apps.serve) load models through load_for_inference too.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
import yaml

from common.errors import ZerotrainError
from engine.checkpoint.run_dir import CONFIG, FINAL, Resolved, RunDir, adapter_only, has_tokenizer, resolve
from engine.distributed import local_device
from engine.training.init_from import MODEL_KINDS, resolve_init_from

Messages = list[dict[str, str]]


# --------------------------------------------------------------------------- loading

@dataclass(frozen=True)
class ModelSource:
    """What the MODEL argument of generate / chat / eval / serve (and --adapter) stand for."""

    base: Resolved
    """The weights: an HF directory, a .pth/.safetensors state dict, or a DeepSpeed checkpoint (tag)."""
    adapter: Path | None = None
    """A PEFT adapter put on top."""
    tokenizer: Path | None = None
    """Where the tokenizer lies: the adapter's (or its run's), else the model's."""
    run_config: Any = None
    """A LoRA run's Config: its base is built as that run built it (preset, grown embeddings)."""


def resolve_model(model: str | Path, adapter: str | Path | None = None) -> ModelSource:
    """What `model` and `adapter` name. `model`: an HF model directory, a .pth/.safetensors state dict,
    a run directory (its final/; a LoRA run's base model from its config.yaml's init_from with
    final/adapter/ on top; a run with no final/ yet, its latest checkpoint), a DeepSpeed checkpoint
    directory or one tag folder. `adapter`: a PEFT adapter directory or a LoRA run directory."""
    path = Path(model)
    run = RunDir(path)
    if path.is_dir() and adapter_only(run):
        if adapter is not None:
            raise ZerotrainError(f"{path} is a LoRA run: it brings its own adapter ({run.final_adapter}); drop "
                                 f"--adapter, or pass the base model with --adapter {adapter}")
        return _lora_run(run)
    lora_final = path.name == FINAL and path.is_dir() and adapter_only(RunDir(path.parent))
    if (path / "adapter_config.json").is_file() or lora_final:
        where = f"the run directory ({path.parent})" if lora_final else "the run directory"
        raise ZerotrainError(f"{path} is a LoRA adapter, not a model: pass {where}, or the base model with "
                             f"--adapter {path}, or run `zerotrain merge-adapter BASE {path} OUTPUT` for a merged "
                             "model")
    base = resolve(path, MODEL_KINDS, "MODEL")
    if adapter is None:
        return ModelSource(base, tokenizer=base.tokenizer)
    found = resolve(adapter, ("adapter",), "--adapter")
    return ModelSource(base, found.path, found.tokenizer or base.tokenizer)


def _lora_run(run: RunDir) -> ModelSource:
    from engine.stages import load_config

    fix = f"or pass the base model with --adapter {run.root}"
    if not run.config.is_file():
        raise ZerotrainError(f"LoRA run {run.root} has no {CONFIG} to name its base model; {fix}")
    cfg = load_config(yaml.safe_load(run.config.read_text()), source=str(run.config))
    init_from = cfg.model.init_from
    if not init_from:
        raise ZerotrainError(f"LoRA run {run.root} was trained on a random init ({run.config} has no init_from), "
                             f"so it has no base model to load; {fix}")
    if not Path(init_from).exists():
        relative = "" if Path(init_from).is_absolute() else (
            ", read from the current directory: run this from where the run was launched")
        raise ZerotrainError(f"the base model of LoRA run {run.root}, {init_from} ({run.config}: init_from), does "
                             f"not exist{relative}; {fix}")
    base = resolve_init_from(init_from, f"{run.config}: init_from")
    tokenizer = next((t for t in (run.final, run.tokenizer) if has_tokenizer(t)), base.tokenizer)
    return ModelSource(base, run.final_adapter, tokenizer, cfg)


def resolve_model_dir(path: str | Path) -> Path:
    """An HF model directory: `path` itself, or `path/final` for a zerotrain run directory."""
    return resolve(path, ("hf",), "model directory").path


def load_for_inference(model: str | Path, adapter: str | Path | None = None, tokenizer: str | Path | None = None,
                       *, preset: str | None = None) -> tuple[torch.nn.Module, Any]:
    """(model in eval mode on the GPU if there is one, else the CPU; tokenizer).

    `model` and `adapter` are what resolve_model takes; a DeepSpeed checkpoint is gathered in
    memory, tensor by tensor (as --init-from reads one; `zerotrain consolidate` writes it once for
    faster loads). `preset` shapes a state dict without a config.json beside it, or a checkpoint
    without a config. The tokenizer comes from `tokenizer`, else from the adapter directory (or its
    run) when it holds one, else from the model. An adapter trained with an extended tokenizer (its
    embeddings in modules_to_save) gets a base whose embeddings are first grown to the tokenizer,
    as training grew them.
    """
    from engine.training.init_from import build_base_model, load_source, run_context
    from model.tokenizer import id_changes, load_tokenizer

    source = resolve_model(model, adapter)
    tokenizer = tokenizer or source.tokenizer
    if tokenizer is None:
        raise ZerotrainError(f"--tokenizer is required ({source.base.path} has none beside it): the tokenizer "
                             "the model was trained with")
    tok = load_tokenizer(str(tokenizer))
    base = source.base
    if base.kind == "deepspeed":
        print(f"[zerotrain] gathering checkpoint {base.tag or 'latest'} of {base.path} in memory; "
              f"`zerotrain consolidate {base.path} OUT_DIR` writes it once for faster loads", file=sys.stderr)
    if source.run_config is not None:  # a LoRA run: its base as the run built it
        net = build_base_model(source.run_config, base, tok, run_context(source.run_config))
    else:
        if base.kind == "state_dict" and not preset and not (base.path.parent / "config.json").is_file():
            raise ZerotrainError(f"MODEL {base.path} is a state dict with no config.json beside it: pass --preset "
                                 "(the preset it was trained with), or put its config.json beside it")
        own = load_tokenizer(str(base.tokenizer)) if base.tokenizer and Path(base.tokenizer) != Path(tokenizer) else tok
        net = load_source(base, preset=preset, vocab_size=len(own) if preset else None, what="MODEL")
        if len(tok) > net.config.vocab_size:
            if source.adapter is None or base.tokenizer is None or id_changes(own, tok):
                raise ZerotrainError(f"the tokenizer has {len(tok)} tokens but model {base.path} only "
                                     f"{net.config.vocab_size}; pass the tokenizer it was trained with (--tokenizer)")
            net.resize_token_embeddings(len(tok))  # the adapter's saved embeddings fill the new rows
    if source.adapter is not None:
        net = _load_adapter(net, source.adapter, base.path)
    net.to(local_device()).eval()
    return net, tok


def _load_adapter(model: torch.nn.Module, adapter: Path, model_dir: Path) -> torch.nn.Module:
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(adapter))
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ZerotrainError(f"cannot put adapter {adapter} on model {model_dir}: {first_line}; "
                             "is the adapter for this base model?") from e


def context_length(model: torch.nn.Module) -> int | None:
    """The most positions the model was built for (None when its config does not say)."""
    config = model.config
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


# --------------------------------------------------------------------------- generation

def generation_config(tokenizer, *, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 0.9,
                      top_k: int = 0, repetition_penalty: float = 1.0):
    """Greedy decoding at temperature 0, else sampling; stops at the tokenizer's eos (<|im_end|>)."""
    from transformers import GenerationConfig

    for flag, value, ok in [("--max-new-tokens", max_new_tokens, max_new_tokens >= 1),
                            ("--temperature", temperature, temperature >= 0),
                            ("--top-p", top_p, 0 < top_p <= 1),
                            ("--top-k", top_k, top_k >= 0),
                            ("--repetition-penalty", repetition_penalty, repetition_penalty > 0)]:
        if not ok:
            raise ZerotrainError(f"{flag} {value} is out of range (max-new-tokens >= 1, temperature >= 0, "
                                 "0 < top-p <= 1, top-k >= 0 (0: off), repetition-penalty > 0)")
    # When sampling, every knob is set: unset ones would be filled from the model's
    # generation_config.json and then transformers' defaults (top_k=50), so the flags would not
    # mean what they say. Greedy decoding reads none of them.
    sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k) if temperature > 0 else {}
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=bool(sampling), **sampling,
                            repetition_penalty=repetition_penalty, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)


def encode_prompt(tokenizer, prompt: str | Messages, device: torch.device | str = "cpu") -> torch.Tensor:
    """Token ids (1, n) of a raw text prompt, or of messages rendered with the chat template and
    the assistant's generation prompt (no extra special tokens: the template has its own)."""
    if not isinstance(prompt, str):
        prompt = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)


def _check_fits(model: torch.nn.Module, prompt_tokens: int, max_new_tokens: int) -> None:
    limit = context_length(model)
    if limit is not None and prompt_tokens + max_new_tokens > limit:
        raise ZerotrainError(f"the prompt ({prompt_tokens} tokens) plus --max-new-tokens {max_new_tokens} exceeds "
                             f"the model's context of {limit} tokens; shorten the prompt or lower --max-new-tokens")


@torch.no_grad()
def generate(model: torch.nn.Module, tokenizer, prompts: list[str], *, chat: bool = True, max_new_tokens: int = 128,
             temperature: float = 0.0, top_p: float = 0.9, top_k: int = 0, seed: int = 0,
             repetition_penalty: float = 1.0) -> list[str]:
    """One completion per prompt (special tokens removed). With `chat`, each prompt is a user message.

    Prompts run one at a time, each after seeding with `seed`: no padding to get wrong, and a
    prompt's completion does not depend on the prompts beside it.
    """
    from transformers import set_seed

    config = generation_config(tokenizer, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                               top_k=top_k, repetition_penalty=repetition_penalty)
    completions = []
    for prompt in prompts:
        ids = encode_prompt(tokenizer, [{"role": "user", "content": prompt}] if chat else prompt, model.device)
        _check_fits(model, ids.shape[1], max_new_tokens)
        set_seed(seed)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
        completions.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return completions


@torch.no_grad()
def chat(model: torch.nn.Module, tokenizer, *, system: str | None = None, stdin: IO[str] | None = None,
         max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 0.9, top_k: int = 0, seed: int = 0,
         repetition_penalty: float = 1.0) -> int:
    """A multi-turn chat over `stdin` (default sys.stdin) lines, each reply streamed to stdout;
    returns the number of replies.

    `/reset` clears the history, `/exit` or end of input quits. When the history no longer fits
    the model's context, the oldest turns are dropped (the system message is kept).
    """
    from transformers import TextStreamer, set_seed

    config = generation_config(tokenizer, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                               top_k=top_k, repetition_penalty=repetition_penalty)
    start: Messages = [{"role": "system", "content": system}] if system else []
    history, replies = list(start), 0
    stdin = stdin or sys.stdin
    interactive = stdin.isatty()
    set_seed(seed)
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = stdin.readline()
        text = line.strip()
        if not interactive and text:
            print(f"you> {text}")  # echo piped input, so the transcript reads as a conversation
        if not line or text == "/exit":
            break
        if text == "/reset":
            history = list(start)
            print("(history cleared)", flush=True)
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        try:
            ids = _fit_history(model, tokenizer, history, len(start), max_new_tokens)
        except ZerotrainError as e:  # one message too long: say so and let the user go on
            history.pop()
            print(f"zerotrain chat: {e}", file=sys.stderr, flush=True)
            continue
        print("assistant> ", end="", flush=True)
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config,
                             streamer=streamer)
        history.append({"role": "assistant",
                        "content": tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)})
        replies += 1
    return replies


def _fit_history(model: torch.nn.Module, tokenizer, history: Messages, keep: int, max_new_tokens: int) -> torch.Tensor:
    """The prompt ids of `history`, dropping the oldest turns after the first `keep` until it fits."""
    limit = context_length(model)
    ids = encode_prompt(tokenizer, history, model.device)
    while limit is not None and ids.shape[1] + max_new_tokens > limit and len(history) > keep + 1:
        del history[keep]
        ids = encode_prompt(tokenizer, history, model.device)
    _check_fits(model, ids.shape[1], max_new_tokens)
    return ids
