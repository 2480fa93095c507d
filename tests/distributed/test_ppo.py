"""PPO through launcher/ppo.py on 2 ZeRO-3 ranks, in full and with LoRA (one launch): an actor
and its critic in one engine, a frozen reference for the KL penalty (with LoRA: the actor with
its adapter disabled), two updates per rollout (--num-iterations 2). The metrics carry TRL's PPO
names and are finite; the rollout log's scores are the reward's; final/ is the actor alone, a
causal LM equal to the consolidated last checkpoint, which holds the critic too; a run resumed
from its step-2 checkpoint trains step 3 to the straight run's loss. With LoRA, final/adapter/ is
the actor's adapter, which peft loads onto the --init-from model and extract-adapter gives bit
for bit, and the merged final/ is that model with it folded in; the actor's base weights never
move, the critic's do."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.helpers import metrics, rewound_copy, run_cases, run_launcher, train_losses

pytestmark = pytest.mark.distributed

STEPS, MBS = 3, 4


@pytest.fixture(scope="module")
def ppo_runs(base_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo")
    prompts = out / "prompts.jsonl"
    with open(prompts, "w") as f:
        for i in range(24):
            prompt = f"{i % 7} + {i % 5} =" if i % 2 else [{"role": "user", "content": f"What is {i % 7} + {i % 5}?"}]
            f.write(json.dumps({"prompt": prompt}) + "\n")
    common = ["--init-from", base_model_dir, "--data", prompts, "--reward-fn", "length", "--micro-batch-size", MBS,
              "--max-new-tokens", 8, "--seq-len", 48, "--max-steps", STEPS, "--log-interval", 1, "--lr", "1e-3",
              "--warmup-steps", 0, "--precision", "fp32", "--kl-coef", "0.05", "--num-iterations", 2,
              "--save-interval", 2, "--zero-stage", 3, "--data-cache-dir", out / "cache", "--seed", 3]
    full = [*common, "--output-dir", out / "full"]
    run_cases({"full": ("ppo", full),
               "lora": ("ppo", [*common, "--output-dir", out / "lora", "--lora-r", 8, "--lr", "1e-2",
                                "--merge-lora-at-end"])}, out / "cases", nproc=2)
    return out, [str(f) for f in full]


@pytest.mark.parametrize("case", ["full", "lora"])
def test_metrics_and_the_rollout_log(ppo_runs, case):
    run = ppo_runs[0] / case
    records = [r for r in metrics(run) if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for record in records:
        for name in ("loss", "objective/scores", "objective/kl", "objective/rlhf_reward", "policy/clipfrac",
                     "val/clipfrac", "loss/policy", "loss/value", "val/mean", "policy/approxkl",
                     "completions/mean_length", "rewards/length/mean"):
            assert isinstance(record[name], float) and math.isfinite(record[name]), (record["step"], name)
    first, second, last = records
    assert abs(first["objective/kl"]) < 1e-4  # the policy is its reference before the first update
    assert last["objective/kl"] > 1e-4
    assert first["policy/approxkl"] < 1e-12 and last["policy/approxkl"] < 1e-12  # a rollout's first update: ratio 1
    assert second["policy/approxkl"] > 0 and second["objective/scores"] == first["objective/scores"]  # one rollout
    rows = [json.loads(line) for line in (run / "rollouts.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in rows}) == [1, 3] and len(rows) == 2 * MBS * 2
    for row in rows:
        assert {"score", "kl", "value", "return", "rewards", "completion_tokens"} <= set(row)
        assert row["score"] == row["rewards"]["length"] == -row["completion_tokens"] / 100
    assert first["objective/scores"] == pytest.approx(sum(r["score"] for r in rows if r["step"] == 1) / (2 * MBS))


def test_final_is_the_actor_and_the_checkpoint_holds_the_critic(ppo_runs, tmp_path, capsys):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from engine.apps.cli import main as zerotrain
    from engine.offline.ds_weights import load_checkpoint

    run = ppo_runs[0] / "full"
    ckpt = load_checkpoint(run / "checkpoints" / f"global_step{STEPS}")
    assert ckpt.sidecar.exported == "actor"
    assert any(k.startswith("critic.score.") for k in ckpt.tensors) and any(k.startswith("actor.") for k in ckpt.tensors)
    model = AutoModelForCausalLM.from_pretrained(run / "final")
    assert zerotrain(["consolidate", str(run), str(tmp_path / "consolidated")]) == 0, capsys.readouterr()
    assert "critic" in capsys.readouterr().out  # the note on what was left out
    final = load_file(run / "final" / "model.safetensors")
    consolidated = load_file(tmp_path / "consolidated" / "model.safetensors")
    assert final.keys() == consolidated.keys() and all(torch.equal(final[k], consolidated[k]) for k in final)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "consolidated")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_a_resumed_run_trains_as_the_straight_one(ppo_runs, tmp_path):
    """Step 3 samples anew from the actor and scores with the critic, both restored from step 2."""
    out, flags = ppo_runs
    straight = out / "full"
    resumed = rewound_copy(straight, tmp_path / "run", 2, later=(f"global_step{STEPS}",))
    flags[flags.index("--output-dir") + 1] = str(resumed)
    proc = run_launcher("ppo.py", flags, nproc=2)
    assert "resumed from" in proc.stdout and "at step 2" in proc.stdout
    assert train_losses(resumed) == train_losses(straight)


def test_a_lora_run_adapts_the_actor_alone(ppo_runs, base_model_dir, tmp_path, capsys):
    """final/adapter/ is the actor's PEFT adapter for the --init-from model (plain causal-LM
    names), extract-adapter gives it bit for bit, and the merged final/ and consolidate give that
    model with it folded in; in the last checkpoint the actor's base weights are the base model's
    and the critic, trained in full, has moved."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from engine.apps.cli import main as zerotrain
    from engine.offline.ds_weights import load_checkpoint

    run = ppo_runs[0] / "lora"
    live = load_file(run / "final" / "adapter" / "adapter_model.safetensors")
    assert live and all(k.startswith("base_model.model.model.layers.") and ".lora_" in k for k in live), list(live)
    assert any(v.abs().max() > 0 for k, v in live.items() if ".lora_B." in k)  # trained (B starts at 0)
    assert zerotrain(["extract-adapter", str(run), str(tmp_path / "adapter")]) == 0, capsys.readouterr()
    extracted = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert live.keys() == extracted.keys() and all(torch.equal(live[k], extracted[k]) for k in live)
    live_config, extracted_config = (json.loads((d / "adapter_config.json").read_text())
                                     for d in (run / "final" / "adapter", tmp_path / "adapter"))
    assert live_config["r"] == 8 and live_config["lora_dropout"] == 0.0  # PPO's LoRA: no dropout by default
    for config in (live_config, extracted_config):
        config["target_modules"] = sorted(config["target_modules"])
    for key in ("r", "lora_alpha", "lora_dropout", "target_modules"):
        assert live_config[key] == extracted_config[key], key

    base = AutoModelForCausalLM.from_pretrained(base_model_dir)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, str(run / "final" / "adapter")).merge_and_unload().state_dict()
    final = AutoModelForCausalLM.from_pretrained(run / "final").state_dict()
    assert final.keys() == merged.keys()
    for name in final:
        torch.testing.assert_close(final[name], merged[name], rtol=0, atol=1e-6, msg=name)
    assert any(not torch.equal(final[k], base_state[k]) for k in final)
    assert zerotrain(["consolidate", str(run), str(tmp_path / "consolidated")]) == 0, capsys.readouterr()
    consolidated = AutoModelForCausalLM.from_pretrained(tmp_path / "consolidated").state_dict()
    for name in final:
        torch.testing.assert_close(consolidated[name], final[name], rtol=0, atol=1e-6, msg=name)

    ckpt = load_checkpoint(run / "checkpoints" / f"global_step{STEPS}")
    actor = {k: v for k, v in ckpt.tensors.items() if k.startswith("actor.") and ".lora_" not in k}
    for name, source in actor.items():
        plain = name.removeprefix("actor.base_model.model.").replace(".base_layer.", ".")
        assert torch.equal(source.read(), base_state[plain]), name
    critic = {k.removeprefix("critic."): v for k, v in ckpt.tensors.items() if k.startswith("critic.model.")}
    assert critic and any(not torch.equal(v.read(), base_state[k]) for k, v in critic.items())
