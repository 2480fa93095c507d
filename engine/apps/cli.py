"""The `zerotrain` command: one subcommand per tool, listed by group in its --help (build_commands).

    zerotrain train-tokenizer --input FILE... --vocab-size 6400 --output DIR
    zerotrain extend-tokenizer --base TOKENIZER --input FILE... --add-vocab N --output DIR
    zerotrain prepare --kind pretrain|sft|pref|prompt --input FILE... --tokenizer DIR --output DIR [--columns K=FIELD,...] [--num-proc N]
    zerotrain teacher-logits --top-k K [launcher/distill.py's flags]
    zerotrain consolidate CKPT_DIR OUTPUT [--tag global_stepN] [--dtype fp32|bf16|fp16] [--max-shard-size 5GB]
    zerotrain extract-adapter CKPT_DIR OUT_DIR [--tag global_stepN] [--lora-alpha A | --adapter-config FILE]
    zerotrain merge-adapter BASE ADAPTER OUTPUT
    zerotrain inspect CKPT_DIR
    zerotrain generate MODEL [--adapter DIR] --prompt TEXT... [--no-chat] [--temperature T]
    zerotrain chat MODEL [--adapter DIR] [--system TEXT]
    zerotrain eval MODEL [--adapter DIR] --data FILE... [--kind auto|pretrain|sft] [--json]
    zerotrain serve MODEL [--adapter DIR] [--host 127.0.0.1] [--port 8000] [--model-name NAME]
    zerotrain plot RUN_DIR... [--out FILE.png]
    zerotrain env [--output-dir DIR] [--json]
    zerotrain preflight --hostfile H [--output-dir DIR] [--master-addr A] [--master-port P] [--ssh-port N]

MODEL is anything engine.apps.generate.resolve_model takes (an HF directory, a state dict, a run
directory, LoRA runs included, a checkpoint); `--model MODEL` is the older spelling. Training
itself runs through the launchers (launcher/*.py) under python, torchrun, deepspeed or sbatch.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

from common.errors import ZerotrainError


def cmd_train_tokenizer(args: argparse.Namespace) -> None:
    from engine.data.files import ReadStats
    from engine.data.text import read_documents
    from model.tokenizer import train_tokenizer

    stats = ReadStats()
    texts = (doc for path in args.input for doc in read_documents(path, args.skip_bad_lines, stats))
    tokenizer = train_tokenizer(texts, args.vocab_size, args.output, min_frequency=args.min_frequency)
    print(f"tokenizer with {len(tokenizer)} tokens written to {args.output}"
          + (f" ({stats.bad_lines} bad lines skipped)" if stats.bad_lines else ""))


def cmd_extend_tokenizer(args: argparse.Namespace) -> None:
    from engine.data.files import ReadStats
    from engine.data.text import read_documents
    from model.tokenizer import extend_tokenizer

    stats = ReadStats()
    texts = (doc for path in args.input for doc in read_documents(path, args.skip_bad_lines, stats))
    done = extend_tokenizer(args.base, texts, args.add_vocab, args.output)
    print(f"tokenizer with {len(done.tokenizer)} tokens ({done.base_size} of {args.base} + {done.added} new) "
          f"written to {args.output}" + (f" ({stats.bad_lines} bad lines skipped)" if stats.bad_lines else ""))
    print(f"tokens per character of the input: {done.tokens_before / done.characters:.3f} before, "
          f"{done.tokens_after / done.characters:.3f} after")


def cmd_prepare(args: argparse.Namespace) -> None:
    from engine.data.prepare import prepare
    from model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    meta = prepare(args.kind, args.input, tokenizer, args.output, seq_len=args.seq_len,
                   val_fraction=args.val_fraction, skip_bad_lines=args.skip_bad_lines, columns=args.columns,
                   num_proc=args.num_proc)
    splits = ", ".join(f"{name}: {json.dumps(counts)}" for name, counts in meta["splits"].items())
    skipped = {k: v for k, v in meta["stats"].items() if v}
    print(f"{args.kind} data in {args.output} ({meta['dtype']}) {splits}" + (f"; skipped {skipped}" if skipped else ""))


def _report(written, what: str) -> None:
    from engine.offline.inspect import human_count

    print(f"{what} {written.output}: {written.tensors} tensors, {human_count(written.params)} parameters, "
          f"{human_count(written.bytes, 'B')}")
    for note in written.notes:
        print(f"  note: {note}")


def cmd_consolidate(args: argparse.Namespace) -> None:
    from engine.offline.consolidate import consolidate

    written = consolidate(args.ckpt_dir, args.output, tag=args.tag, dtype=args.dtype,
                          max_shard_size=args.max_shard_size, keep_lora_keys=args.keep_lora_keys,
                          lora_alpha=args.lora_alpha, adapter_config=args.adapter_config, config=args.model_config,
                          preset=args.preset, trust_pickle=args.trust_pickle, overwrite=args.overwrite)
    _report(written, "wrote")


def cmd_extract_adapter(args: argparse.Namespace) -> None:
    from engine.offline.adapters import extract_adapter

    written = extract_adapter(args.ckpt_dir, args.out_dir, tag=args.tag, lora_alpha=args.lora_alpha,
                              adapter_config=args.adapter_config, dtype=args.dtype, trust_pickle=args.trust_pickle,
                              overwrite=args.overwrite)
    _report(written, "adapter")


def cmd_merge_adapter(args: argparse.Namespace) -> None:
    from engine.offline.adapters import merge_adapter

    written = merge_adapter(args.base, args.adapter, args.output, dtype=args.dtype, max_shard_size=args.max_shard_size,
                            trust_pickle=args.trust_pickle, overwrite=args.overwrite)
    _report(written, "merged model")


def cmd_inspect(args: argparse.Namespace) -> None:
    import dataclasses

    from engine.offline.inspect import format_inspect, inspect

    latest, infos = inspect(args.ckpt_dir, trust_pickle=args.trust_pickle)
    if args.json:
        records = [{**dataclasses.asdict(i), "path": str(i.path)} for i in infos]
        print(json.dumps({"latest": latest, "tags": records}, indent=2))
    else:
        print(format_inspect(args.ckpt_dir, latest, infos))


def cmd_preflight(args: argparse.Namespace) -> None:
    from engine.apps.preflight import format_report, preflight

    report = preflight(args.hostfile, output_dir=args.output_dir, master_addr=args.master_addr,
                       master_port=args.master_port, ssh_port=args.ssh_port, timeout=args.timeout,
                       python=args.python)
    print(format_report(report, args.hostfile), flush=True)
    if report.failed:
        raise ZerotrainError(f"{len(report.failed)} check{'s' * (len(report.failed) != 1)} failed on "
                             f"{args.hostfile}; fix them before launching")


def _load_for_inference(args: argparse.Namespace):
    from transformers.utils import logging

    from engine.apps.generate import load_for_inference

    logging.disable_progress_bar()  # "Loading weights" bars would interleave with the output
    return load_for_inference(_model(args), args.adapter, args.tokenizer, preset=args.preset)


def _sampling(args: argparse.Namespace) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                top_k=args.top_k, seed=args.seed, repetition_penalty=args.repetition_penalty)


def cmd_generate(args: argparse.Namespace) -> None:
    from engine.apps.generate import generate

    model, tokenizer = _load_for_inference(args)
    completions = generate(model, tokenizer, args.prompt, chat=args.chat, **_sampling(args))
    for i, (prompt, completion) in enumerate(zip(args.prompt, completions), 1):
        print(f"### prompt {i}\n{prompt}\n### completion {i}\n{completion}\n")


def cmd_chat(args: argparse.Namespace) -> None:
    from engine.apps.generate import chat

    model, tokenizer = _load_for_inference(args)
    chat(model, tokenizer, system=args.system, **_sampling(args))


def cmd_eval(args: argparse.Namespace) -> None:
    from engine.apps.evaluate import eval_kind, evaluate

    kind = eval_kind(args.data, args.kind, args.columns)  # before the model is loaded
    model, tokenizer = _load_for_inference(args)
    result = evaluate(model, tokenizer, args.data, kind=kind, seq_len=args.seq_len, batch_size=args.batch_size,
                      max_batches=args.max_batches, show_progress=not args.json, columns=args.columns)
    if args.json:
        print(json.dumps(result))
        return
    print(f"{'model':<10} {_model(args)}" + (f" + adapter {args.adapter}" if args.adapter else ""))
    print(f"{'data':<10} {' '.join(args.data)} ({result['kind']}, {result['sequences']} sequences)")
    print(f"{'tokens':<10} {result['tokens']}")
    print(f"{'loss':<10} {result['loss']:.4f}")
    print(f"{'perplexity':<10} {result['perplexity']:.2f}")
    if result["skipped"]:
        print(f"{'skipped':<10} {result['skipped']}")


def cmd_serve(args: argparse.Namespace) -> None:
    from transformers.utils import logging

    from engine.apps.serve import serve

    logging.disable_progress_bar()  # "Loading weights" bars would interleave with the server's log
    serve(_model(args), adapter=args.adapter, tokenizer=args.tokenizer, preset=args.preset, host=args.host,
          port=args.port, model_name=args.model_name)


def cmd_plot(args: argparse.Namespace) -> None:
    from pathlib import Path

    from engine.apps.plot import plot_runs

    out = args.out or (Path(args.run_dirs[0]) / "curves.png" if len(args.run_dirs) == 1 else Path("curves.png"))
    runs = plot_runs(args.run_dirs, out, title=args.title)
    print(f"wrote {out}: " + ", ".join(f"{r.label} ({r.steps} steps)" for r in runs))


def cmd_env(args: argparse.Namespace) -> None:
    from engine.apps.env_report import collect, format_report

    report = collect(args.output_dir)
    print(json.dumps(report, indent=2) if args.json else format_report(report))


def cmd_teacher_logits(args: argparse.Namespace) -> None:
    from engine.apps.teacher_logits import main as teacher_logits

    if args.top_k < 1:
        raise ZerotrainError(f"--top-k {args.top_k}: keep at least one log-prob per token")
    teacher_logits(args.flags, args.top_k)


DEFAULT = " (default: %(default)s)"  # argparse fills in the flag's default, so the help never drifts from it


def _inference_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", metavar="MODEL",
                   help="an HF model directory; a .pth/.safetensors state dict (config.json beside it, or --preset); "
                        "a zerotrain run directory (its final/; a LoRA run: the base model its config.yaml's "
                        "init_from names, with final/adapter/ on top; no final/ yet: its latest checkpoint); a "
                        "DeepSpeed checkpoint directory or one global_stepN/ folder (gathered in memory)")
    p.add_argument("--model", dest="model_option", metavar="MODEL", help="the same as MODEL (an older spelling)")
    p.add_argument("--adapter", metavar="DIR",
                   help="PEFT LoRA adapter to put on top of the model: an adapter directory, or a LoRA run directory "
                        "(its final/adapter/)")
    p.add_argument("--tokenizer", metavar="DIR",
                   help="tokenizer (default: the adapter's, or its run's, when there is one, else the model's)")
    p.add_argument("--preset", help="preset that shapes a state dict with no config.json beside it, or a checkpoint "
                                    "that carries no config (default: none)")


def _model(args: argparse.Namespace) -> str:
    """MODEL, given as the first argument or as --model (not both, unless they agree)."""
    given = [m for m in (args.model, args.model_option) if m is not None]
    if not given:
        raise ZerotrainError(f"name the model: zerotrain {args.command} MODEL ... (an HF model directory, a "
                             ".pth/.safetensors file, a run directory or a checkpoint)")
    if len(set(given)) > 1:
        raise ZerotrainError(f"two models given, {given[0]} and --model {given[1]}: pass one")
    return given[0]


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="tokens to generate at most" + DEFAULT)
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0: greedy; above 0: sampling" + DEFAULT)
    p.add_argument("--top-p", type=float, default=0.9, metavar="P", help="sampling: nucleus probability mass" + DEFAULT)
    p.add_argument("--top-k", type=int, default=0, metavar="K",
                   help="sampling: keep the k likeliest tokens, 0: off" + DEFAULT)
    p.add_argument("--seed", type=int, default=0, metavar="S", help="sampling seed" + DEFAULT)
    p.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R",
                   help="above 1 discourages repeats" + DEFAULT)


def _checkpoint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt_dir", metavar="CKPT_DIR",
                   help="DeepSpeed checkpoint directory (holding 'latest' and global_stepN/), one tag folder, "
                        "or a zerotrain run directory (its checkpoints/)")
    p.add_argument("--tag", help="checkpoint tag to read, e.g. global_step1000 (default: the one 'latest' names)")
    _trust_pickle_arg(p, "the DeepSpeed allowlist")


def _trust_pickle_arg(p: argparse.ArgumentParser, allowlist: str) -> None:
    p.add_argument("--trust-pickle", action="store_true",
                   help=f"unpickle classes outside {allowlist} (can run code: trusted files only)")


def _lora_args(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--lora-alpha", type=float, metavar="A",
                       help="LoRA alpha of a checkpoint whose run config is not beside it")
    group.add_argument("--adapter-config", metavar="FILE", help="PEFT adapter_config.json giving alpha and the rest")


Add = Callable[..., argparse.ArgumentParser]


def _data_commands(add: Add) -> None:
    from engine.data.kinds import KINDS
    p = add("train-tokenizer", "train a byte-level BPE tokenizer (HF format) on text files",
            "Train a byte-level BPE tokenizer with zerotrain's special tokens and chat template on the documents "
            "of the input files, and write it in HF format (tokenizer.json and its config) to --output; "
            "launchers and prepare take that directory as --tokenizer.")
    p.add_argument("--input", nargs="+", required=True, metavar="FILE", help=".txt, .jsonl ({'text'}) or .parquet")
    p.add_argument("--vocab-size", type=int, default=6400, metavar="N",
                   help="tokens in the vocabulary, special tokens included" + DEFAULT)
    p.add_argument("--min-frequency", type=int, default=2, metavar="N",
                   help="least number of times a pair must occur to be merged" + DEFAULT)
    p.add_argument("--output", required=True, metavar="DIR")
    p.add_argument("--skip-bad-lines", action="store_true", help="skip malformed lines and report the count")
    p.set_defaults(func=cmd_train_tokenizer)

    p = add("extend-tokenizer", "append new text's tokens to a tokenizer, every existing id kept",
            "Train a tokenizer of the base's kind with --add-vocab pieces on the input and append those the base "
            "lacks after its own (up to --add-vocab new tokens): a byte-level BPE directory gets the new merges, a "
            "sentencepiece .model the new pieces. Models trained with the base continue with --tokenizer DIR.")
    p.add_argument("--base", required=True, metavar="TOKENIZER",
                   help="byte-level BPE tokenizer directory or sentencepiece .model file")
    p.add_argument("--input", nargs="+", required=True, metavar="FILE", help=".txt, .jsonl ({'text'}) or .parquet")
    p.add_argument("--add-vocab", type=int, required=True, metavar="N", help="new tokens to learn (at most)")
    p.add_argument("--output", required=True, metavar="DIR")
    p.add_argument("--skip-bad-lines", action="store_true", help="skip malformed lines and report the count")
    p.set_defaults(func=cmd_extend_tokenizer)

    p = add("prepare", "tokenize pretraining text, SFT conversations, preference pairs or RL prompts",
            "Tokenize raw files once into token files (memmap / arrow) that the launchers read with --data DIR, "
            "split into train and val. SFT and preference data carry their loss masks from here on.")
    p.add_argument("--kind", choices=tuple(KINDS), required=True,
                   help="pref: chosen/rejected pairs for launcher/dpo.py (two sequences a pair); prompt: RL prompts "
                        "and their columns for launcher/grpo.py")
    p.add_argument("--input", nargs="+", required=True, metavar="FILE")
    p.add_argument("--tokenizer", required=True, metavar="DIR", help="HF tokenizer dir or sentencepiece .model")
    p.add_argument("--output", required=True, metavar="DIR")
    p.add_argument("--seq-len", type=int, default=512, metavar="N",
                   help="SFT and pref: truncate each sequence to this many tokens" + DEFAULT)
    p.add_argument("--val-fraction", type=float, default=0.01, metavar="F",
                   help="share of the documents (pretrain) or examples held out as the val split that "
                        "validation (--eval-interval) scores; 0: no val split" + DEFAULT)
    p.add_argument("--skip-bad-lines", action="store_true", help="skip malformed lines and report the count")
    p.add_argument("--columns", default="", metavar="KEY=FIELD,...",
                   help="sft and pref: read every file through this field mapping instead of detecting its shape, "
                        "e.g. prompt=question,response=answer or messages=dialog,role=speaker,content=text,"
                        "user=human,assistant=bot or chosen=good,rejected=bad,prompt=question (default: detected)")
    p.add_argument("--num-proc", type=int, default=1, metavar="N",
                   help="sft: processes that encode conversations, 0: every core; the output is the same" + DEFAULT)
    p.set_defaults(func=cmd_prepare)

    p = add("teacher-logits", "store a distillation teacher's top-k log-probs beside the prepared data",
            "Run the teacher of a distill run once over its data and store, for every trained token, its top-k "
            "log-probs and the rest of its probability mass beside the prepared data (PREPARED/teacher/KEY/). "
            "Takes the flags of launcher/distill.py (--teacher, --data, --preset, --kd-temperature, --precision, "
            "--config ...); a distill run with the same flags and --teacher-top-k K then trains with no teacher "
            "loaded. Runs under torchrun too, the ranks sharing the examples.")
    p.add_argument("--top-k", type=int, default=64, metavar="K", help="log-probs kept per token" + DEFAULT)
    p.set_defaults(func=cmd_teacher_logits)


def _checkpoint_commands(add: Add) -> None:
    from engine.config.precision import DTYPES
    p = add("consolidate", "DeepSpeed checkpoint (any ZeRO stage) -> one .pth / .safetensors or an HF model dir",
            "Gather the sharded weights of a DeepSpeed checkpoint (fp32 masters where they exist) into OUTPUT: "
            "NAME.pth (torch state dict), NAME.safetensors, or any other name for an HF model directory. Streams "
            "one tensor at a time.")
    _checkpoint_args(p)
    p.add_argument("output", metavar="OUTPUT", help="NAME.pth, NAME.safetensors or an HF directory")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32",
                   help="dtype of the floating-point weights written" + DEFAULT)
    p.add_argument("--max-shard-size", default="5GB", metavar="SIZE", help="HF directory shard size" + DEFAULT)
    p.add_argument("--keep-lora-keys", action="store_true",
                   help="keep PEFT's LoRA keys instead of folding the adapter into the base weights")
    _lora_args(p)
    model = p.add_mutually_exclusive_group()
    model.add_argument("--config", dest="model_config", metavar="CONFIG_JSON",
                       help="model config.json for an HF directory output, when the run's is not beside the checkpoint")
    model.add_argument("--preset", help="model preset for an HF directory output, instead of --config")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.set_defaults(func=cmd_consolidate)

    p = add("extract-adapter", "LoRA adapter of a DeepSpeed checkpoint -> PEFT adapter dir",
            "Write adapter_model.safetensors and adapter_config.json (PEFT format) straight from the checkpoint "
            "shards; rank and target modules come from the shards, alpha and the rest from the run's saved config "
            "or the flags.")
    _checkpoint_args(p)
    p.add_argument("out_dir", metavar="OUT_DIR")
    _lora_args(p)
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32",
                   help="dtype of the adapter weights (fp32: the masters)" + DEFAULT)
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.set_defaults(func=cmd_extract_adapter)

    p = add("merge-adapter", "fold a PEFT LoRA adapter into its base model, tensor by tensor",
            "BASE: an HF model dir, a .pth/.safetensors file or a run dir (its final/); ADAPTER: a PEFT adapter "
            "dir or a LoRA run dir (its final/adapter/); OUTPUT: NAME.pth, NAME.safetensors or an HF directory.")
    p.add_argument("base", metavar="BASE")
    p.add_argument("adapter", metavar="ADAPTER")
    p.add_argument("output", metavar="OUTPUT")
    p.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                   help="dtype of the weights written (auto: the base model's)" + DEFAULT)
    p.add_argument("--max-shard-size", default="5GB", metavar="SIZE", help="HF directory shard size" + DEFAULT)
    _trust_pickle_arg(p, "the allowlist in .pth/.bin inputs")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.set_defaults(func=cmd_merge_adapter)

    p = add("inspect", "stage, world size, dtype, size and completeness of each checkpoint tag",
            "For every global_stepN/ of a DeepSpeed checkpoint directory (or a run directory's checkpoints/): "
            "its ZeRO stage, the world size it was saved on, its dtype, step, size on disk, and whether every "
            "rank's files are there; the tag 'latest' names is marked. Reads only the files' headers.")
    p.add_argument("ckpt_dir", metavar="CKPT_DIR")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _trust_pickle_arg(p, "the DeepSpeed allowlist")
    p.set_defaults(func=cmd_inspect)


def _inference_commands(add: Add) -> None:
    from engine.data.kinds import KINDS
    p = add("generate", "complete prompts with a model (and a LoRA adapter)",
            "Each prompt is completed on its own; with --chat (the default) it is sent as a user message through "
            "the chat template and the reply stops at <|im_end|>. Put MODEL first: --prompt takes every word "
            "after it.")
    _inference_args(p)
    p.add_argument("--prompt", nargs="+", action="extend", required=True, metavar="TEXT",
                   help="prompts to complete, each one argument (quote it); --prompt may be repeated")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                   help="wrap each prompt as a chat user message; --no-chat for raw text completion with a "
                        "pretrained-only model (default: on)")
    _sampling_args(p)
    p.set_defaults(func=cmd_generate)

    p = add("chat", "interactive multi-turn chat, replies streamed",
            "Reads one message a line from stdin (a terminal or a pipe); /reset clears the history, /exit or end "
            "of input quits.")
    _inference_args(p)
    p.add_argument("--system", metavar="TEXT", help="system message at the start of every conversation")
    _sampling_args(p)
    p.set_defaults(func=cmd_chat)

    p = add("eval", "loss and perplexity of a model on data files",
            "Pretraining text in fixed --seq-len windows (every next token counted), or SFT conversations with "
            "training's masking (assistant tokens only). Loss = total NLL / counted tokens; perplexity = "
            "exp(loss). Put MODEL first: --data takes every word after it.")
    _inference_args(p)
    p.add_argument("--data", nargs="+", required=True, metavar="FILE", help=".txt/.jsonl/.parquet text or SFT .json/.jsonl")
    scored = tuple(name for name, kind in KINDS.items() if kind.language_modeling)
    p.add_argument("--kind", choices=("auto", *scored), default="auto",
                   help="auto: sft for .json and for .jsonl/.parquet of conversations, else pretrain "
                        "(preference pairs are refused)" + DEFAULT)
    p.add_argument("--seq-len", type=int, default=512, metavar="N",
                   help="window length (pretrain), truncation length (SFT)" + DEFAULT)
    p.add_argument("--batch-size", type=int, default=8, metavar="N", help="sequences scored at once" + DEFAULT)
    p.add_argument("--max-batches", type=int, metavar="N", help="stop after N batches (default: all the data)")
    p.add_argument("--columns", default="", metavar="KEY=FIELD,...",
                   help="where the conversations' parts are, as training's --columns (default: detected)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=cmd_eval)

    p = add("serve", "an OpenAI-compatible HTTP server for a model",
            "Serves GET /v1/models, POST /v1/chat/completions and POST /v1/completions (streaming too) for the "
            "OpenAI client or curl; one generation at a time, n=1. Stops cleanly on SIGTERM or Ctrl-C.")
    _inference_args(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (127.0.0.1: this machine only)" + DEFAULT)
    p.add_argument("--port", type=int, default=8000, help="port to listen on" + DEFAULT)
    p.add_argument("--model-name", metavar="NAME",
                   help="the model's id in the API (default: the name of MODEL's directory or file)")
    p.set_defaults(func=cmd_serve)


def _runs_commands(add: Add) -> None:
    p = add("plot", "loss, val loss, lr and tokens/s of runs in one PNG",
            "Four panels against the step (training loss, validation loss, learning rate, tokens/s) from each "
            "run's metrics.jsonl, one line per run labelled by its directory name.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (each holds metrics.jsonl)")
    p.add_argument("--out", metavar="FILE.png",
                   help="image to write (default: RUN_DIR/curves.png for one run, ./curves.png for several)")
    p.add_argument("--title", help="figure title (default: the run names)")
    p.set_defaults(func=cmd_plot)

    p = add("env", "versions, accelerators, build tools and free disk: attach its output to a bug report",
            "Python and library versions (torch with its CUDA/NCCL builds, deepspeed, transformers, peft, trl, "
            "datasets, tokenizers, safetensors), the accelerator DeepSpeed picks and the devices torch sees, "
            "whether DeepSpeed can JIT-build its ops (ninja, a C++ compiler, CUDA_HOME), and the free disk of the "
            "data cache and of --output-dir.")
    p.add_argument("--output-dir", default=".", metavar="DIR",
                   help="where runs will be written, for its free disk (default: the current directory)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=cmd_env)

    p = add("preflight", "check the hosts of a hostfile before a multi-node launch",
            "For every host of a DeepSpeed hostfile: ssh without a password (BatchMode), the same Python path and "
            "python/torch/deepspeed/zerotrain versions, this working directory present, the output directory "
            "shared, the master port free and the master address resolvable, accelerators against slots. Prints "
            "a table; exits non-zero if any check fails.")
    p.add_argument("--hostfile", required=True, metavar="FILE", help="DeepSpeed hostfile ('HOSTNAME slots=N' a line)")
    p.add_argument("--output-dir", metavar="DIR",
                   help="run directory every host must share (checked with a marker file; created if missing)")
    p.add_argument("--master-addr", metavar="ADDR", help="rendezvous address (default: the first host)")
    p.add_argument("--master-port", type=int, default=29500, metavar="PORT",
                   help="rendezvous port, checked free on the first host" + DEFAULT)
    p.add_argument("--ssh-port", type=int, metavar="N", help="ssh port, as deepspeed's --ssh_port (default: ssh's)")
    p.add_argument("--timeout", type=float, default=10.0, metavar="S", help="ssh connect timeout, seconds" + DEFAULT)
    p.add_argument("--python", metavar="PATH",
                   help="interpreter on every host (default: this one, as deepspeed's launch command uses)")
    p.set_defaults(func=cmd_preflight)


GROUPS = (("data and tokenizers", _data_commands), ("checkpoints", _checkpoint_commands),
          ("using a model", _inference_commands), ("runs and clusters", _runs_commands))
DOCS = "docs/README.md"


def build_commands() -> tuple[argparse.ArgumentParser, dict[str, dict[str, argparse.ArgumentParser]]]:
    """The `zerotrain` parser, and its subcommands' parsers by group ({group: {name: parser}}), the
    listing its --help shows (argparse has no subcommand groups of its own)."""
    from engine.stages import all_stages

    parser = argparse.ArgumentParser(
        prog="zerotrain", allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="zerotrain's tools around training: data and tokenizers, checkpoints, using a model, runs and "
                    "clusters. Training itself runs through the launchers (below).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups: dict[str, dict[str, argparse.ArgumentParser]] = {}
    lines = ["commands (zerotrain COMMAND --help for each one's flags):"]
    for title, add_group in GROUPS:
        groups[title] = {}
        lines.append(f"  {title}:")

        def add(name: str, summary: str, description: str) -> argparse.ArgumentParser:
            # no help= here: the grouped listing in the epilog replaces argparse's flat one
            groups[title][name] = sub.add_parser(name, description=description, allow_abbrev=False)
            lines.append(f"    {name:<18}{summary}")
            return groups[title][name]

        add_group(add)
    lines.append("\ntraining runs through the launchers, under python, torchrun, deepspeed or sbatch "
                 "(each takes --help):")
    lines += [f"  {stage.launcher:<22}{stage.summary}" for stage in all_stages().values()]
    lines.append(f"\nthe manual: {DOCS}")
    parser.epilog = "\n".join(lines)
    return parser, groups


def main(argv: list[str] | None = None) -> int:
    parser, _ = build_commands()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "teacher-logits":  # it passes the distill launcher's flags on
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.flags = rest
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except ZerotrainError as e:
        print(f"zerotrain {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
