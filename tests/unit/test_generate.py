"""generate / chat / eval: transformers' decoding, LoRA adapters on top, and a loss we can check by hand."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from common.errors import ZerotrainError
from engine.apps.cli import main
from engine.apps.evaluate import evaluate
from engine.apps.generate import generate, load_for_inference, resolve_model
from engine.data.chat import encode_chat
from engine.data.format import IGNORE_INDEX
from engine.data.kinds import detect_kind
from model.build import build_model

VENV_BIN = Path(sys.executable).parent
DOCS = ["First Citizen: Before we proceed any further, hear me speak.",
        "All: Speak, speak.",
        "First Citizen: You are all resolved rather to die than to famish?",
        "All: Resolved. resolved.",
        "First Citizen: First, you know Caius Marcius is chief enemy to the people."]
CONVERSATIONS = [
    {"conversations": [{"from": "human", "value": "Who are you?"}, {"from": "gpt", "value": "I am a small model."}]},
    {"system": "Be brief.", "conversations": [{"from": "human", "value": "Hello"}, {"from": "gpt", "value": "Hi."},
                                              {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "Goodbye!"}]},
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The debug model's matmuls are tiny: with several threads, their start-up costs more than the
    maths (20x slower token by token on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tokenizer, tmp_path_factory) -> Path:
    """A random `debug` model and its tokenizer, saved as an HF model directory."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("gen") / "model"
    build_model("debug", vocab_size=len(tokenizer)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load_for_inference(model_dir)


@pytest.fixture(scope="module")
def adapter_dir(model_dir, tmp_path_factory) -> Path:
    """A LoRA adapter whose B matrices are non-zero, so it changes what the model computes."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(build_model(str(model_dir)),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    out = tmp_path_factory.mktemp("gen") / "adapter"
    peft_model.save_pretrained(out)
    return out


def greedy_by_hand(model, ids: torch.Tensor, max_new_tokens: int, eos: int) -> list[int]:
    """Greedy decoding with a full forward per token: the reference for model.generate."""
    new = []
    for _ in range(max_new_tokens):
        with torch.no_grad():
            logits = model(input_ids=torch.cat([ids, torch.tensor([new], dtype=torch.long)], 1)).logits
        new.append(int(logits[0, -1].argmax()))
        if new[-1] == eos:
            break
    return new


# --------------------------------------------------------------------------- generate

def test_greedy_matches_argmax_by_hand_and_is_deterministic(loaded):
    model, tok = loaded
    prompts = ["Who are you?", "Tell me a story about the sea."]
    first = generate(model, tok, prompts, chat=True, max_new_tokens=12)
    assert first == generate(model, tok, prompts, chat=True, max_new_tokens=12, seed=123)  # greedy ignores seeds
    for prompt, completion in zip(prompts, first):
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        new = greedy_by_hand(model, ids, 12, tok.eos_token_id)
        assert len(new) == 12 or new[-1] == tok.eos_token_id
        assert completion == tok.decode(new, skip_special_tokens=True)


def test_raw_prompt_without_chat_template(loaded):
    model, tok = loaded
    [completion] = generate(model, tok, ["ROMEO:"], chat=False, max_new_tokens=5)
    new = greedy_by_hand(model, torch.tensor([tok("ROMEO:")["input_ids"]]), 5, tok.eos_token_id)
    assert completion == tok.decode(new, skip_special_tokens=True)


def test_sampling_is_reproducible_with_a_seed(loaded):
    model, tok = loaded
    kwargs = dict(chat=True, max_new_tokens=10, temperature=1.5, top_p=1.0)
    a = generate(model, tok, ["Hello", "Hello"], seed=7, **kwargs)
    assert a == generate(model, tok, ["Hello", "Hello"], seed=7, **kwargs)
    assert a[0] == a[1]  # seeded per prompt: a completion does not depend on the prompts before it
    others = {generate(model, tok, ["Hello"], seed=s, **kwargs)[0] for s in range(1, 4)}
    assert len(others | {a[0]}) > 1


def test_bad_sampling_flag_and_too_long_prompt(loaded):
    model, tok = loaded
    with pytest.raises(ZerotrainError, match="--top-p"):
        generate(model, tok, ["x"], temperature=1.0, top_p=0.0)
    with pytest.raises(ZerotrainError, match="context of 256 tokens"):
        generate(model, tok, ["x"], max_new_tokens=300)


def test_adapter_changes_the_model_and_matches_the_merged_model(model_dir, adapter_dir, loaded):
    from peft import PeftModel

    base, tok = loaded
    adapted, _ = load_for_inference(model_dir, adapter=adapter_dir)
    merged = PeftModel.from_pretrained(build_model(str(model_dir)), str(adapter_dir)).merge_and_unload().eval()
    ids = torch.tensor([tok("Before we proceed any further, hear me speak.")["input_ids"]])
    with torch.no_grad():
        base_logits, adapted_logits, merged_logits = (m(input_ids=ids).logits for m in (base, adapted, merged))
    assert not torch.allclose(base_logits, adapted_logits, atol=1e-3)
    torch.testing.assert_close(adapted_logits, merged_logits, atol=1e-4, rtol=1e-4)
    prompts = ["Who are you?", "Hello"]
    assert generate(adapted, tok, prompts, max_new_tokens=10) == generate(merged, tok, prompts, max_new_tokens=10)


# --------------------------------------------------------------------------- loading errors

def test_loading_errors(model_dir, tmp_path):
    with pytest.raises(ZerotrainError, match="does not exist"):
        load_for_inference(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ZerotrainError, match=r"--adapter .*empty is not a PEFT adapter directory"):
        load_for_inference(model_dir, adapter=tmp_path / "empty")
    with pytest.raises(ZerotrainError, match="MODEL .* is not a model directory"):
        resolve_model(tmp_path / "empty")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ZerotrainError, match="no final/ model yet.*zerotrain consolidate"):
        resolve_model(tmp_path / "run")
    (tmp_path / "run" / "final").symlink_to(model_dir)
    assert resolve_model(tmp_path / "run").base.path == tmp_path / "run" / "final"


def test_cli_errors_exit_2(model_dir, tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "hi"]) == 2
    assert f"zerotrain generate: error: MODEL {tmp_path / 'missing'} does not exist" in capsys.readouterr().err
    assert main(["eval", "--model", str(model_dir), "--adapter", str(tmp_path), "--data", "x.txt"]) == 2
    assert f"zerotrain eval: error: --adapter {tmp_path} is not a PEFT adapter directory" in capsys.readouterr().err
    assert main(["generate", "--prompt", "hi"]) == 2
    assert "name the model: zerotrain generate MODEL" in capsys.readouterr().err
    assert main(["generate", str(model_dir), "--model", str(tmp_path), "--prompt", "hi"]) == 2
    assert "two models given" in capsys.readouterr().err


def test_cli_generate_prints_prompts_and_completions(model_dir, capsys):
    assert main(["generate", "--model", str(model_dir), "--prompt", "Hello", "--prompt", "Who are you?",
                 "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "### prompt 1\nHello\n### completion 1\n" in out and "### prompt 2\nWho are you?\n" in out
    assert main(["generate", str(model_dir), "--prompt", "Hello", "Who are you?", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out == out  # MODEL first, or --model: the same


# --------------------------------------------------------------------------- one way to name a model

@pytest.fixture(scope="module")
def lora_run(model_dir, adapter_dir, tmp_path_factory) -> Path:
    """A finished LoRA SFT run's directory as training leaves it: config.yaml naming its base model
    (init_from), final/ holding the tokenizer and only adapter/ (no merged model)."""
    import shutil

    from engine.config.parse import parse_config

    run = tmp_path_factory.mktemp("lora") / "run"
    shutil.copytree(adapter_dir, run / "final" / "adapter")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (model_dir / name).is_file():
            shutil.copy(model_dir / name, run / "final" / name)
    parse_config(["--init-from", str(model_dir), "--lora-r", "4", "--output-dir", str(run)]).save(run / "config.yaml")
    return run


def logits_of(model, tok) -> torch.Tensor:
    ids = torch.tensor([tok("Who are you?")["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_a_lora_run_directory_is_its_base_model_with_its_adapter(lora_run, model_dir, adapter_dir):
    source = resolve_model(lora_run)
    assert (source.base.kind, source.base.path, source.adapter) == ("hf", model_dir, lora_run / "final" / "adapter")
    assert source.tokenizer == lora_run / "final"
    expected = logits_of(*load_for_inference(model_dir, adapter=adapter_dir))
    torch.testing.assert_close(logits_of(*load_for_inference(lora_run)), expected)
    # --adapter takes the run directory too (its final/adapter/)
    assert resolve_model(model_dir, lora_run).adapter == lora_run / "final" / "adapter"
    torch.testing.assert_close(logits_of(*load_for_inference(model_dir, adapter=lora_run)), expected)


def test_cli_generate_and_eval_take_a_lora_run_as_given(lora_run, model_dir, adapter_dir, tmp_path, capsys):
    args = ["--prompt", "Hello", "--max-new-tokens", "6"]
    assert main(["generate", str(lora_run), *args]) == 0
    from_run = capsys.readouterr().out
    assert main(["generate", "--model", str(model_dir), "--adapter", str(adapter_dir), *args]) == 0
    assert capsys.readouterr().out == from_run
    data = tmp_path / "docs.txt"
    data.write_text("\n".join(DOCS))
    flags = ["--data", str(data), "--seq-len", "16", "--json"]
    assert main(["eval", str(lora_run), *flags]) == 0
    assert main(["eval", str(model_dir), "--adapter", str(lora_run), *flags]) == 0
    first, second = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert first == second and first["tokens"] > 0


def test_cli_serve_takes_a_lora_run_as_given(lora_run, monkeypatch, capsys):
    import signal

    import uvicorn

    served = {}
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # keep pytest's own handlers
    monkeypatch.setattr(uvicorn.Server, "run", lambda self: served.update(app=self.config.app))
    assert main(["serve", str(lora_run), "--port", "8123"]) == 0
    assert "'run' (" in capsys.readouterr().out and served["app"] is not None


def test_an_adapter_is_not_a_model(lora_run, adapter_dir, model_dir):
    for path in (adapter_dir, lora_run / "final"):
        with pytest.raises(ZerotrainError, match=rf"{path} is a LoRA adapter, not a model: pass the run directory.*"
                                                 rf"or the base model with --adapter {path}, or run `zerotrain "
                                                 "merge-adapter"):
            resolve_model(path)
    with pytest.raises(ZerotrainError, match="is a LoRA run: it brings its own adapter"):
        resolve_model(lora_run, adapter_dir)


def test_a_lora_run_whose_base_is_gone_says_what_to_pass(lora_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    from engine.config.parse import parse_config

    parse_config(["--init-from", "runs/nowhere", "--lora-r", "4"]).save(run / "config.yaml")
    with pytest.raises(ZerotrainError, match=r"base model of LoRA run .*runs/nowhere .*init_from.*does not exist, read "
                                             r"from the current directory.*or pass the base model with --adapter"):
        resolve_model(run)


def test_a_state_dict_and_a_checkpoint_tag_are_models(model_dir, tmp_path):
    from safetensors.torch import save_file

    model, tok = load_for_inference(model_dir)
    path = tmp_path / "weights" / "model.safetensors"
    path.parent.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}, str(path))
    tok.save_pretrained(path.parent)
    with pytest.raises(ZerotrainError, match="state dict with no config.json beside it: pass --preset"):
        load_for_inference(path)
    loaded, _ = load_for_inference(path, preset="debug")
    torch.testing.assert_close(logits_of(loaded, tok), logits_of(model, tok))
    tag = tmp_path / "run" / "checkpoints" / "global_step3"
    tag.mkdir(parents=True)
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"")
    (tag.parent / "latest").write_text(tag.name)
    for given in (tmp_path / "run", tag):
        source = resolve_model(given)
        assert (source.base.kind, source.base.path) == ("deepspeed", tag.parent)
    assert resolve_model(tag).base.tag == "global_step3"


# --------------------------------------------------------------------------- chat

@pytest.mark.slow
def test_chat_over_a_pipe(model_dir):
    env = dict(os.environ, PATH=f"{VENV_BIN}:{os.environ.get('PATH', '')}", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false")
    lines = "Hello there\nWhat is your name?\n/reset\nAnd again\n/exit\nnever read\n"
    proc = subprocess.run(["zerotrain", "chat", "--model", str(model_dir), "--system", "Be brief.",
                           "--max-new-tokens", "5", "--temperature", "0.7", "--top-k", "20"],
                          input=lines, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("assistant> ") == 3
    assert "you> What is your name?" in proc.stdout and "(history cleared)" in proc.stdout
    assert "never read" not in proc.stdout


def test_chat_keeps_history_and_resets(loaded, monkeypatch):
    import io

    from engine.apps import generate as gen

    model, tok = loaded
    seen = []
    real = gen._fit_history
    monkeypatch.setattr(gen, "_fit_history", lambda m, t, history, *a: seen.append(list(history)) or real(m, t, history, *a))
    replies = gen.chat(model, tok, system="S", stdin=io.StringIO("a\nb\n/reset\nc\n"), max_new_tokens=3)
    assert replies == 3
    assert [[m["role"] for m in h] for h in seen] == [["system", "user"], ["system", "user", "assistant", "user"],
                                                      ["system", "user"]]
    assert [h[-1]["content"] for h in seen] == ["a", "b", "c"]


# --------------------------------------------------------------------------- eval

def test_eval_pretrain_loss_is_total_nll_over_tokens(loaded, tmp_path):
    model, tok = loaded
    path = tmp_path / "docs.txt"
    path.write_text("\n\n".join(DOCS) + "\n")
    seq_len, batch_size = 8, 3
    stream = [t for doc in DOCS for t in tok(doc, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    windows = torch.tensor(stream[: len(stream) // seq_len * seq_len]).view(-1, seq_len)
    assert len(windows) % batch_size  # a short last batch: a mean of batch means would differ
    with torch.no_grad():
        logits = model(input_ids=windows).logits
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1), reduction="sum")
    result = evaluate(model, tok, [str(path)], seq_len=seq_len, batch_size=batch_size)
    assert result["kind"] == "pretrain" and result["sequences"] == len(windows)
    assert result["tokens"] == len(windows) * (seq_len - 1)
    assert result["loss"] == pytest.approx(float(nll) / result["tokens"], rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    limited = evaluate(model, tok, [str(path)], seq_len=seq_len, batch_size=batch_size, max_batches=1)
    assert limited["tokens"] == batch_size * (seq_len - 1)


def test_eval_sft_counts_only_assistant_tokens(loaded, tmp_path):
    model, tok = loaded
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(CONVERSATIONS))
    replies = ["I am a small model.", "Hi.", "Goodbye!"]
    expected_tokens = sum(len(tok(r, add_special_tokens=False)["input_ids"]) + 1 for r in replies)  # + <|im_end|>
    nll = 0.0
    for record in CONVERSATIONS:
        messages = ([{"role": "system", "content": record["system"]}] if "system" in record else []) + [
            {"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]}
            for t in record["conversations"]]
        ids, labels, _ = encode_chat(messages, tok, 128)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
        nll += float(F.cross_entropy(logits, torch.tensor(labels[1:]), ignore_index=IGNORE_INDEX, reduction="sum"))
    result = evaluate(model, tok, [str(path)], seq_len=128, batch_size=2)  # padded to the longer one
    assert result["kind"] == "sft" and result["sequences"] == 2
    assert result["tokens"] == expected_tokens
    assert result["loss"] == pytest.approx(nll / expected_tokens, rel=1e-5)


def test_detect_kind(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(CONVERSATIONS))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in CONVERSATIONS))
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    (tmp_path / "d.txt").write_text("hello\n")
    assert detect_kind([str(tmp_path / "a.json"), str(tmp_path / "b.jsonl")]) == "sft"
    assert detect_kind([str(tmp_path / "c.jsonl"), str(tmp_path / "d.txt")]) == "pretrain"
    with pytest.raises(ZerotrainError, match="mix pretraining text and SFT"):
        detect_kind([str(tmp_path / "a.json"), str(tmp_path / "d.txt")])


def test_cli_eval_json_and_adapter(model_dir, adapter_dir, tmp_path, capsys):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    args = ["eval", "--model", str(model_dir), "--data", str(path), "--seq-len", "16", "--json"]
    assert main(args) == 0
    base = json.loads(capsys.readouterr().out)
    assert base["kind"] == "pretrain" and base["perplexity"] == pytest.approx(math.exp(base["loss"]))
    assert main(args + ["--adapter", str(adapter_dir)]) == 0
    adapted = json.loads(capsys.readouterr().out)
    assert adapted["tokens"] == base["tokens"] and adapted["loss"] != pytest.approx(base["loss"])
    assert main(args[:-1]) == 0
    table = capsys.readouterr().out
    assert "perplexity" in table and f"{base['loss']:.4f}" in table
