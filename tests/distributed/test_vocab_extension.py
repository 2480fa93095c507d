"""Training with an extended tokenizer (zerotrain extend-tokenizer), 1 process, debug preset: the base
model's embeddings are resized before DeepSpeed (ZeRO-3 included) with the old rows kept; a LoRA
run trains the resized matrices in full and extract-adapter / merge-adapter carry them; a tokenizer
that does not keep the model's ids is refused before training."""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import SAMPLES, cli_flags, launcher_env, run_launcher

pytestmark = pytest.mark.distributed

ADD_VOCAB = 200
LR = 1e-4


def poems(count: int, skip: int) -> list[str]:
    with open(SAMPLES / "tang_poems_5k.jsonl", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in islice(f, skip, skip + count)]


@pytest.fixture(scope="module")
def chinese(tmp_path_factory) -> Path:
    """Poems the session tokenizer never saw, as pretraining documents."""
    path = tmp_path_factory.mktemp("chinese") / "poems.jsonl"
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in poems(300, skip=2000)))
    return path


@pytest.fixture(scope="module")
def extended(tokenizer_dir, chinese, tmp_path_factory) -> Path:
    from engine.data.text import read_documents
    from model.tokenizer import extend_tokenizer

    out = tmp_path_factory.mktemp("extended") / "tokenizer"
    extend_tokenizer(str(tokenizer_dir), read_documents(chinese), ADD_VOCAB, str(out))
    return out


def run_args(base_model_dir, tokenizer, data, out, **overrides) -> list[str]:
    values = {"init-from": base_model_dir, "tokenizer": tokenizer, "data": data, "output-dir": out, "seq-len": 32,
              "micro-batch-size": 2, "max-steps": 3, "warmup-steps": 1, "lr": LR, "log-interval": 1,
              "eval-interval": 100, "save-interval": 3, "zero-stage": 3, "precision": "fp32", "seed": 1}
    return cli_flags(values, **overrides)


def test_continued_pretraining_resizes_embeddings(base_model_dir, tokenizer, extended, chinese, tmp_path):
    from engine.config.parse import parse_config
    from engine.objectives.causal_lm import PRETRAIN
    from engine.training.build import build_model
    from engine.training.plan import plan_run
    from model.tokenizer import load_tokenizer, tokenizer_fingerprint

    size = len(load_tokenizer(str(extended)))
    assert len(tokenizer) < size <= len(tokenizer) + ADD_VOCAB
    base = load_file(base_model_dir / "model.safetensors")["model.embed_tokens.weight"]
    args = run_args(base_model_dir, extended, chinese, tmp_path / "run")

    # step 0: the model the run builds (before deepspeed.initialize) has the base's rows first
    cfg = parse_config(args)
    start = build_model(cfg, plan_run(cfg, PRETRAIN, 1)).module
    assert start.get_input_embeddings().weight.shape == (size, base.shape[1])
    assert torch.equal(start.get_input_embeddings().weight[:len(tokenizer)], base)
    assert start.get_output_embeddings().weight is start.get_input_embeddings().weight  # still tied
    assert start.config.vocab_size == size

    proc = run_launcher("pretrain.py", args, nproc=1, launcher="python", env=launcher_env(tmp_path / "cache"))
    assert f"resized embeddings {len(tokenizer)} -> {size} for tokenizer {extended}" in proc.stdout
    final = tmp_path / "run" / "final"
    assert json.loads((final / "config.json").read_text())["vocab_size"] == size
    assert tokenizer_fingerprint(load_tokenizer(str(final))) == tokenizer_fingerprint(load_tokenizer(str(extended)))
    trained = load_file(final / "model.safetensors")["model.embed_tokens.weight"]
    assert trained.shape == (size, base.shape[1])
    # ZeRO-3 partitioned the resized model: 3 Adam steps of lr 1e-4 move an old row by ~3e-4, a row
    # out of place would be off by the init scale (0.02)
    assert (trained[:len(tokenizer)] - base).abs().max() < 2e-3
    assert not torch.equal(trained[:len(tokenizer)], base)


def test_lora_adapter_carries_the_resized_embeddings(base_model_dir, tokenizer, extended, chinese, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from engine.apps.cli import main
    from model.tokenizer import load_tokenizer, tokenizer_fingerprint

    size = len(load_tokenizer(str(extended)))
    run = tmp_path / "lora"
    run_launcher("pretrain.py", run_args(base_model_dir, extended, chinese, run, max_steps=2, save_interval=2,
                                         lora_r=4, lora_modules_to_save="embed_tokens,lm_head", lr=1e-3),
                 nproc=1, launcher="python", env=launcher_env(tmp_path / "cache"))
    assert main(["extract-adapter", str(run / "checkpoints"), str(tmp_path / "adapter")]) == 0
    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert adapter["base_model.model.model.embed_tokens.weight"].shape[0] == size
    assert adapter["base_model.model.lm_head.weight"].shape[0] == size
    for merged, from_adapter in ((tmp_path / "merged", tmp_path / "adapter"), (tmp_path / "merged_run", run)):
        assert main(["merge-adapter", str(base_model_dir), str(from_adapter), str(merged)]) == 0
        assert f"vocabulary grown {len(tokenizer)} -> {size} rows" in capsys.readouterr().out
        model = AutoModelForCausalLM.from_pretrained(merged)
        assert model.config.vocab_size == size and model.get_output_embeddings().weight.shape[0] == size
        assert tokenizer_fingerprint(load_tokenizer(str(merged))) == tokenizer_fingerprint(load_tokenizer(str(extended)))

    # the merged model computes what PEFT's own loading of the adapter onto the resized base does
    base = AutoModelForCausalLM.from_pretrained(base_model_dir)
    base.resize_token_embeddings(size)
    peft = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.randint(0, size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, peft(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    assert main(["generate", "--model", str(tmp_path / "merged"), "--prompt", "春眠不覺曉", "--no-chat",
                 "--max-new-tokens", "4"]) == 0

    # unmerged: the base grown to the adapter's tokenizer, then the adapter, as PEFT's own loading above
    from engine.apps.generate import load_for_inference

    unmerged, tok = load_for_inference(base_model_dir, tmp_path / "adapter")
    assert len(tok) == size
    with torch.no_grad():
        torch.testing.assert_close(unmerged(input_ids=ids).logits, peft(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_non_prefix_tokenizer_refused(base_model_dir, tokenizer, chinese, tmp_path):
    from model.tokenizer import train_tokenizer

    other = tmp_path / "other"
    train_tokenizer(poems(300, skip=0), vocab_size=len(tokenizer) + 100, output_dir=str(other), show_progress=False)
    proc = run_launcher("pretrain.py", run_args(base_model_dir, other, chinese, tmp_path / "run"), nproc=1,
                        launcher="python", env=launcher_env(tmp_path / "cache"), check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"has {len(tokenizer)} token embeddings but tokenizer {other} has {len(tokenizer) + 100} tokens" in proc.stderr
    assert "does not keep the ids of the model's own tokenizer" in proc.stderr
    assert "zerotrain extend-tokenizer" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists() and "loss" not in proc.stdout
