"""PPO through launcher/ppo.py on 2 ZeRO-3 ranks (one launch): an actor and its critic in one
engine, a frozen reference for the KL penalty, two updates per rollout (--num-iterations 2).
The metrics carry TRL's PPO names and are finite; the rollout log's scores are the reward's;
final/ is the actor alone, a causal LM equal to the consolidated last checkpoint, which holds the
critic too; a run resumed from its step-2 checkpoint trains step 3 to the straight run's loss."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.helpers import metrics, rewound_copy, run_cases, run_launcher, train_losses

pytestmark = pytest.mark.distributed

STEPS, MBS = 3, 4


@pytest.fixture(scope="module")
def ppo_run(base_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo")
    prompts = out / "prompts.jsonl"
    with open(prompts, "w") as f:
        for i in range(24):
            prompt = f"{i % 7} + {i % 5} =" if i % 2 else [{"role": "user", "content": f"What is {i % 7} + {i % 5}?"}]
            f.write(json.dumps({"prompt": prompt}) + "\n")
    flags = ["--init-from", base_model_dir, "--data", prompts, "--reward-fn", "length", "--micro-batch-size", MBS,
             "--max-new-tokens", 8, "--seq-len", 48, "--max-steps", STEPS, "--log-interval", 1, "--lr", "1e-3",
             "--warmup-steps", 0, "--precision", "fp32", "--kl-coef", "0.05", "--num-iterations", 2,
             "--save-interval", 2, "--zero-stage", 3, "--data-cache-dir", out / "cache", "--seed", 3,
             "--output-dir", out / "run"]
    run_cases({"run": ("ppo", flags)}, out / "cases", nproc=2)
    return out / "run", [str(f) for f in flags]


def test_metrics_and_the_rollout_log(ppo_run):
    run, _ = ppo_run
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
    assert first["policy/approxkl"] < 1e-12  # the first update's ratio is 1
    assert second["policy/approxkl"] > 0 and second["objective/scores"] == first["objective/scores"]  # one rollout
    rows = [json.loads(line) for line in (run / "rollouts.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in rows}) == [1, 3] and len(rows) == 2 * MBS * 2
    for row in rows:
        assert {"score", "kl", "value", "return", "rewards", "completion_tokens"} <= set(row)
        assert row["score"] == row["rewards"]["length"] == -row["completion_tokens"] / 100
    assert first["objective/scores"] == pytest.approx(sum(r["score"] for r in rows if r["step"] == 1) / (2 * MBS))


def test_final_is_the_actor_and_the_checkpoint_holds_the_critic(ppo_run, tmp_path, capsys):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from engine.apps.cli import main as zerotrain
    from engine.offline.ds_weights import load_checkpoint

    run, _ = ppo_run
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


def test_a_resumed_run_trains_as_the_straight_one(ppo_run, tmp_path):
    """Step 3 samples anew from the actor and scores with the critic, both restored from step 2."""
    straight, flags = ppo_run
    resumed = rewound_copy(straight, tmp_path / "run", 2, later=(f"global_step{STEPS}",))
    flags[flags.index("--output-dir") + 1] = str(resumed)
    proc = run_launcher("ppo.py", flags, nproc=2)
    assert "resumed from" in proc.stdout and "at step 2" in proc.stdout
    assert train_losses(resumed) == train_losses(straight)
