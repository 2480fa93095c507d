"""`scripts/demo.sh --quick`: the whole pipeline (tokenizer, 2-rank ZeRO-2 pretraining through the
deepspeed launcher, consolidation, LoRA SFT, adapter extraction, DPO of the SFT model, generation,
plots, report) runs, and every artifact it reports exists and loads."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import ROOT, launcher_env

pytestmark = pytest.mark.system
PROMPTS = ["Who are you?", "Are you ChatGPT?", "What is up?", "ROMEO:", "床前明月光，"]


def run_demo(demo_dir: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = launcher_env(DEMO_DIR=str(demo_dir))
    env.pop("DEMO_QUICK", None)
    return subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, errors="replace", timeout=timeout)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    demo_dir = tmp_path_factory.mktemp("demo") / "runs" / "demo"
    start = time.perf_counter()
    proc = run_demo(demo_dir, "--quick")
    if proc.returncode != 0:
        raise AssertionError(f"demo.sh --quick failed with {proc.returncode}:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    print(f"demo.sh --quick took {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return demo_dir


def base_model(demo: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(demo / "pretrain" / "final").eval()


def test_every_step_printed_a_header_and_the_total_time(demo):
    timings = (demo / "timings.tsv").read_text().splitlines()
    assert len(timings) == 1 + 10  # header + 10 steps
    commands = (demo / "commands.sh").read_text()
    assert "deepspeed --num_gpus 2" in commands
    for launcher in ("pretrain", "sft", "dpo"):
        assert f"launcher/{launcher}.py" in commands
    for tool in ("train-tokenizer", "prepare", "consolidate", "extract-adapter", "generate", "plot"):
        assert f"zerotrain {tool}" in commands


def test_tokenizer_loads_with_auto_tokenizer(demo):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo / "tokenizer")
    assert len(tokenizer) == 1000  # --quick's vocabulary
    text = "ROMEO: But, soft! 床前明月光，疑是地上霜。"
    assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text


def test_pretraining_ran_on_two_ranks_with_zero2_and_its_loss_fell(demo):
    sidecars = sorted((demo / "pretrain" / "checkpoints").glob("global_step*/zerotrain.json"))
    assert [p.parent.name for p in sidecars] == ["global_step10", "global_step20"]
    sidecar = json.loads(sidecars[-1].read_text())
    assert (sidecar["world_size"], sidecar["zero_stage"]) == (2, 2)
    assert len(list(sidecars[-1].parent.glob("zero_pp_rank_*_optim_states.pt"))) == 2  # one shard per rank
    losses = [r["loss"] for r in map(json.loads, (demo / "pretrain" / "metrics.jsonl").read_text().splitlines())
              if r.get("loss") is not None]
    assert losses[-1] < losses[0] - 0.5


def test_consolidated_files_load_strictly_and_equal_the_final_model(demo):
    model = base_model(demo)
    final = load_file(demo / "pretrain" / "final" / "model.safetensors")
    tied = {"lm_head.weight": "model.embed_tokens.weight"} if model.config.tie_word_embeddings else {}

    pth = torch.load(demo / "consolidated" / "pretrain.pth", weights_only=True)
    model.load_state_dict(pth, strict=True)  # a .pth keeps the tied lm_head.weight
    safetensors = load_file(demo / "consolidated" / "pretrain.safetensors")
    assert set(safetensors) == set(model.state_dict()) - set(tied)  # tied copies left out, as save_pretrained does
    model.load_state_dict({**safetensors, **{alias: safetensors[target] for alias, target in tied.items()}},
                          strict=True)
    for name, tensor in final.items():
        assert torch.equal(safetensors[name], tensor), name
        assert torch.equal(pth[name], tensor), name


def test_extracted_adapter_loads_with_peft_on_the_base_and_matches_the_live_one(demo):
    from peft import PeftModel

    adapter_dir = demo / "adapter"
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["r"] == 8  # modules_to_save as read from the shards: names or module paths
    assert sorted(m.rsplit(".", 1)[-1] for m in config["modules_to_save"]) == ["embed_tokens", "lm_head"]
    extracted = load_file(adapter_dir / "adapter_model.safetensors")
    live = load_file(demo / "sft" / "final" / "adapter" / "adapter_model.safetensors")  # gathered by the engine
    assert extracted.keys() == live.keys()
    assert all(torch.allclose(extracted[k], live[k]) for k in live)
    assert any("embed_tokens" in k for k in extracted) and any("lm_head" in k for k in extracted)

    model = PeftModel.from_pretrained(base_model(demo), str(adapter_dir)).eval()
    ids = torch.randint(3, 1000, (1, 16))
    with torch.no_grad():
        tuned = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    assert not torch.allclose(tuned, base, atol=1e-4)


def test_dpo_tuned_the_sft_model_on_two_ranks_and_logged_rewards(demo):
    """Step 7: DPO from the SFT run (its checkpoints, the adapter folded in), every weight, ZeRO-2 on
    2 ranks; TRL's reward metrics every step and at each evaluation; an HF model in final/."""
    from transformers import AutoModelForCausalLM

    sidecar = json.loads((demo / "dpo" / "checkpoints" / "global_step6" / "zerotrain.json").read_text())
    assert (sidecar["kind"], sidecar["world_size"], sidecar["zero_stage"], sidecar["lora"]) == ("dpo", 2, 2, None)
    records = [json.loads(line) for line in (demo / "dpo" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 7))
    assert all(0.0 <= r["rewards/accuracies"] <= 1.0 for r in train)
    # the first step's policy is its reference: no margin yet; then the policy moves
    assert train[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    assert abs(train[-1]["rewards/margins"]) > 1e-4
    val = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in val] == [3, 6] and all("val_rewards/accuracies" in r for r in val)

    tuned = AutoModelForCausalLM.from_pretrained(demo / "dpo" / "final").eval()
    ids = torch.randint(3, 1000, (1, 16))
    with torch.no_grad():
        assert not torch.allclose(tuned(input_ids=ids).logits, base_model(demo)(input_ids=ids).logits, atol=1e-4)


def test_generations_cover_every_prompt_for_every_model(demo):
    for name in ("base", "sft", "dpo"):
        text = (demo / "samples" / f"{name}.txt").read_text()
        assert re.findall(r"^### prompt \d+\n(.*)$", text, re.M) == PROMPTS
        assert text.count("### completion") == len(PROMPTS)


def test_plots_are_valid_pngs(demo):
    from matplotlib.image import imread

    for name in ("pretrain", "sft", "compare", "dpo"):
        path = demo / "plots" / f"{name}.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        height, width = imread(path).shape[:2]
        assert (width, height) == ((1800, 800) if name == "dpo" else (1200, 800))  # DPO: reward panels added


def test_report_names_every_artifact(demo):
    report = (demo / "REPORT.md").read_text()
    artifacts = [demo / "tokenizer", demo / "data" / "pretrain", demo / "data" / "sft",
                 demo / "pretrain" / "config.yaml", demo / "pretrain" / "metrics.jsonl",
                 demo / "pretrain" / "checkpoints" / "global_step10", demo / "pretrain" / "checkpoints" / "global_step20",
                 demo / "pretrain" / "final", demo / "consolidated" / "pretrain.safetensors",
                 demo / "consolidated" / "pretrain.pth", demo / "sft" / "config.yaml", demo / "sft" / "metrics.jsonl",
                 demo / "sft" / "checkpoints" / "global_step10", demo / "sft" / "final" / "adapter", demo / "adapter",
                 demo / "data" / "pref", demo / "dpo" / "config.yaml", demo / "dpo" / "metrics.jsonl",
                 demo / "dpo" / "checkpoints" / "global_step6", demo / "dpo" / "final",
                 demo / "samples" / "base.txt", demo / "samples" / "sft.txt", demo / "samples" / "dpo.txt",
                 demo / "plots" / "pretrain.png", demo / "plots" / "sft.png", demo / "plots" / "compare.png",
                 demo / "plots" / "dpo.png"]
    for path in artifacts:
        assert path.exists(), path
        assert f"`{path}`" in report, f"REPORT.md does not mention {path}"
    for section in ("## Steps", "## Runs", "## Preference tuning (DPO)", "## Curves", "## Sample generations",
                    "## Artifacts", "## Configs"):
        assert section in report
    assert "(plots/pretrain.png)" in report and "(plots/dpo.png)" in report  # the curves are embedded
    assert "tokens/s" in report and re.search(r"-> \*\*\d+\.\d+\*\*", report)  # throughput, final loss
    assert re.search(r"^\| reward accuracy \(first log -> last; val\) \| - \| - \| [01]\.\d{3} \(step 1\) -> ", report, re.M)
    # the DPO table: step 1, then a row per evaluation (steps 3 and 6) with its val reward accuracy
    rows = re.findall(r"^\| ([\d-]+) \| [\d.]+ \| [\d.]+ \| -?[\d.]+ \| [\d.]* \| ([\d.]*) \|", report, re.M)
    assert [steps for steps, _ in rows] == ["1", "2-3", "4-6"] and all(val for _, val in rows[1:])
    for prompt in PROMPTS:
        assert f"`{prompt}`" in report
    generations = report.split("## Sample generations")[1].split("## Artifacts")[0]
    assert generations.count("\nSFT:\n") == generations.count("\nDPO:\n") == len(PROMPTS)  # before and after DPO


def test_a_directory_the_demo_did_not_make_is_refused(tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    proc = run_demo(precious, "--quick", timeout=60)
    assert proc.returncode == 2
    assert "was not made by the demo" in proc.stderr
    assert (precious / "notes.txt").read_text() == "keep me"
    assert run_demo(tmp_path / "x", "--bogus", timeout=60).returncode == 2
