"""GRPO through launcher/grpo.py on 2 ranks (one launch, two runs): ZeRO-3 with a frozen
reference and LoRA under ZeRO-2 with the adapter-disabled reference, a reward function from a
user's file beside a built-in one. The rollout log recomputes: each logged reward is the
function's on the logged completion, each advantage its group's normalised reward; the KL to
the reference is 0 before the first update and not after; the metrics carry TRL's names; a run
resumed from its step-2 checkpoint samples the same completions and trains to the same losses.
The LoRA run takes two updates per rollout (--num-iterations 2): step 2 trains on step 1's
completions again, and a run resumed from step 1 (in the middle of that) trains as the straight one."""

from __future__ import annotations

import json
import math
from collections import defaultdict

import pytest
import torch

from engine.objectives.policy_loss import group_advantages
from tests.helpers import metrics, rewound_copy, run_cases, run_launcher, train_losses

pytestmark = pytest.mark.distributed

REWARD_FILE = '''
def distinct(prompts, completions, completion_ids, solution, **columns):
    """Distinct characters of the completion per 10, None for prompts without a solution."""
    text = lambda c: c[-1]["content"] if isinstance(c, list) else c
    return [len(set(text(c))) / 10 if s else None for c, s in zip(completions, solution)]
'''
STEPS, G, MBS = 3, 4, 8
SAMPLED = {"zero3": [1, 2, 3], "lora": [1, 3], "span": [1, 2, 3]}  # the steps that sample (lora: --num-iterations 2)
COMPLETIONS = {"zero3": MBS * 2, "lora": MBS * 2, "span": 2 * 2 * 2}  # a step's, every rank's


@pytest.fixture(scope="module")
def grpo_runs(base_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("grpo")
    prompts = out / "prompts.jsonl"
    with open(prompts, "w") as f:
        for i in range(40):
            prompt = f"{i % 7} + {i % 5} =" if i % 2 else [{"role": "user", "content": f"What is {i % 7} + {i % 5}?"}]
            f.write(json.dumps({"prompt": prompt, "solution": str(i % 7 + i % 5) if i % 10 else ""}) + "\n")
    (out / "my_rewards.py").write_text(REWARD_FILE)
    common = ["--init-from", base_model_dir, "--data", prompts, "--reward-fn", f"{out / 'my_rewards.py'}:distinct",
              "length", "--reward-weights", "1", "0.5", "--num-generations", G, "--micro-batch-size", MBS,
              "--max-new-tokens", 12, "--seq-len", 64, "--max-steps", STEPS, "--log-interval", 1, "--lr", "1e-3",
              "--warmup-steps", 0, "--precision", "fp32", "--kl-beta", "0.05", "--save-interval", 2,
              "--data-cache-dir", out / "cache", "--seed", 3]
    run_cases({"zero3": ("grpo", [*common, "--output-dir", out / "zero3", "--zero-stage", 3]),
               "lora": ("grpo", [*common, "--output-dir", out / "lora", "--zero-stage", 2, "--lora-r", 8,
                                 "--rl-loss", "dapo", "--epsilon-high", "0.28", "--num-iterations", 2,
                                 "--save-interval", 1]),
               # groups that span ranks: 2 completions a micro-batch, 2 micro-batches a step on 2 ranks, G = 4
               "span": ("grpo", [*common, "--output-dir", out / "span", "--zero-stage", 2, "--micro-batch-size", 2,
                                 "--grad-accum", 2])}, out / "cases", nproc=2)
    return out


@pytest.mark.parametrize("run", ["zero3", "lora", "span"])
def test_the_rollout_log_recomputes_rewards_and_advantages(grpo_runs, run):
    rows = [json.loads(line) for line in (grpo_runs / run / "rollouts.jsonl").read_text().splitlines()]
    assert sorted({row["step"] for row in rows}) == SAMPLED[run]
    assert len(rows) == len(SAMPLED[run]) * COMPLETIONS[run]  # every completion of every sampling step, both ranks'
    namespace: dict = {}
    exec(REWARD_FILE, namespace)
    groups = defaultdict(list)
    for row in rows:
        assert set(row) == {"step", "group", "prompt", "completion", "completion_tokens", "rewards", "reward",
                            "advantage"}
        completion = ([{"role": "assistant", "content": row["completion"]}] if isinstance(row["prompt"], list)
                      else row["completion"])
        solution = row["rewards"]["distinct"] is not None
        [distinct] = namespace["distinct"]([row["prompt"]], [completion], [[0] * row["completion_tokens"]],
                                           [solution])
        assert row["rewards"]["distinct"] == distinct
        assert row["rewards"]["length"] == -row["completion_tokens"] / 100
        assert row["reward"] == pytest.approx((distinct or 0.0) + 0.5 * row["rewards"]["length"], rel=1e-12)
        groups[(row["step"], row["group"])].append(row)
    assert len(groups) == len(SAMPLED[run]) * COMPLETIONS[run] // G and all(len(g) == G for g in groups.values())
    spread = 0
    for group in groups.values():
        scores = torch.tensor([[r["rewards"]["distinct"] if r["rewards"]["distinct"] is not None else math.nan,
                                r["rewards"]["length"]] for r in group], dtype=torch.float64)
        _, advantages, std = group_advantages(scores, torch.tensor([1.0, 0.5]), G, "group")
        assert [r["advantage"] for r in group] == pytest.approx(advantages.tolist(), rel=1e-5, abs=1e-6)
        spread += bool(std[0] > 0)
    assert spread > len(groups) // 2  # most groups train (their rewards differ)
    if run == "span":  # the log holds rank 0's rows, then rank 1's: each group has rows in both
        for step in SAMPLED[run]:
            of_step = [row["group"] for row in rows if row["step"] == step]
            assert set(of_step[:4]) == set(of_step[4:]) and len(set(of_step)) == 2, of_step


@pytest.mark.parametrize("run", ["zero3", "lora"])
def test_metrics_and_the_kl_to_the_reference(grpo_runs, run):
    records = metrics(grpo_runs / run)
    assert [r["step"] for r in records if "loss" in r] == list(range(1, STEPS + 1))
    first, last = records[0], [r for r in records if "loss" in r][-1]
    for name in ("reward", "reward_std", "rewards/distinct/mean", "rewards/length/mean", "completions/mean_length",
                 "completions/clipped_ratio", "frac_reward_zero_std", "kl", "entropy", "clip_ratio/region_mean"):
        assert name in first and first[name] is not None, name
    assert first["kl"] < 1e-6  # the policy is its reference before the first update
    assert last["kl"] > 1e-6
    assert 0 < first["completions/mean_length"] <= 12
    assert (grpo_runs / run / "final").is_dir()
    if run == "lora":  # step 2 trains on step 1's completions, moved off the policy that sampled them
        second = [r for r in records if r["step"] == 2 and "loss" in r][0]
        assert [second[k] for k in ("reward", "completions/mean_length")] == [first[k] for k in
                                                                              ("reward", "completions/mean_length")]
        assert second["loss"] != first["loss"]


def resumed_case(grpo_runs, case: str, step: int, into, **launch):
    """The fixture's `case` run rewound to its step-`step` checkpoint in `into`, then run again with
    the same flags (it resumes there): (the run directory, the launch's output)."""
    later = tuple(f"global_step{s}" for s in range(step + 1, STEPS + 1))
    resumed = rewound_copy(grpo_runs / case, into, step, later=later)
    flags = json.loads((grpo_runs / "cases" / "cases.json").read_text())[case]["flags"]
    flags[flags.index("--output-dir") + 1] = str(resumed)
    return resumed, run_launcher("grpo.py", flags, **launch)


def last_step_rows(run) -> list[str]:
    """The rollout log's lines of the last step, as the last launch wrote them (both ranks')."""
    return [line for line in (run / "rollouts.jsonl").read_text().splitlines()
            if json.loads(line)["step"] == STEPS][-MBS * 2:]


def test_a_resumed_run_samples_and_trains_as_the_straight_one(grpo_runs, tmp_path):
    resumed, proc = resumed_case(grpo_runs, "zero3", 2, tmp_path / "run", nproc=2)
    assert "resumed from" in proc.stdout and "at step 2" in proc.stdout
    assert train_losses(resumed) == train_losses(grpo_runs / "zero3")
    assert last_step_rows(resumed) == last_step_rows(grpo_runs / "zero3")  # the same completions, rewards, advantages


def test_an_rl_run_resumes_on_another_number_of_ranks(grpo_runs, tmp_path):
    """The 2-rank ZeRO-3 run's step-2 checkpoint (a cycle's end: nothing carried) goes on on one
    rank: converted to DeepSpeed's universal layout, then one more step, sampled and trained."""
    resumed, proc = resumed_case(grpo_runs, "zero3", 2, tmp_path / "run", nproc=1, launcher="python")
    assert "saved on 2 ranks, now 1" in proc.stdout
    last = [r for r in metrics(resumed) if "loss" in r][-1]
    assert last["step"] == STEPS and math.isfinite(last["loss"]) and last["reward"] is not None
    rows = [json.loads(line) for line in (resumed / "rollouts.jsonl").read_text().splitlines()]
    assert len([r for r in rows if r["step"] == STEPS]) == 2 * MBS + MBS  # the straight run's two ranks, then one


def test_a_run_resumed_between_updates_of_one_rollout_trains_on_the_same_completions(grpo_runs, tmp_path):
    """The LoRA run's step-1 checkpoint holds each rank's rollouts (step 2 trains on them again):
    the resumed run takes them back instead of sampling, and ends as the straight run did."""
    straight = grpo_runs / "lora"
    assert sorted(p.name for p in (straight / "checkpoints" / "global_step1").glob("objective_state_*")) == [
        "objective_state_0.pt", "objective_state_1.pt"]
    assert not list((straight / "checkpoints" / "global_step2").glob("objective_state_*"))  # a cycle's end
    resumed, proc = resumed_case(grpo_runs, "lora", 1, tmp_path / "run", nproc=2)
    assert "resumed from" in proc.stdout and "at step 1" in proc.stdout
    assert train_losses(resumed) == train_losses(straight)
    assert last_step_rows(resumed) == last_step_rows(straight)


def test_checkpoint_tools_work_on_rl_runs(grpo_runs, tmp_path, capsys):
    """consolidate of the ZeRO-3 run's last checkpoint gives its final/ weights; extract-adapter of
    the LoRA run gives its final/adapter/; both in this process, as test_consolidate runs them."""
    from safetensors.torch import load_file

    from engine.apps.cli import main as zerotrain

    for cmd in (["consolidate", str(grpo_runs / "zero3"), str(tmp_path / "zero3.safetensors")],
                ["extract-adapter", str(grpo_runs / "lora"), str(tmp_path / "adapter")]):
        assert zerotrain(cmd) == 0, (cmd, capsys.readouterr())
    final = load_file(grpo_runs / "zero3" / "final" / "model.safetensors")
    consolidated = load_file(tmp_path / "zero3.safetensors")
    shared = final.keys() & consolidated.keys()
    assert shared and all(torch.equal(final[k], consolidated[k]) for k in shared)
    live = load_file(grpo_runs / "lora" / "final" / "adapter" / "adapter_model.safetensors")
    extracted = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert live.keys() == extracted.keys() and all(torch.equal(live[k], extracted[k]) for k in live)


def _fixed_rollout_steps(rank, world_size, out, base_model_dir, prompts, zero):
    """Two steps of GRPO on the same 8 completions a step, however they fall into ranks and
    micro-batches: 1 rank x 2 micro-batches of 4, or 2 ranks x 1."""
    from engine.data.format import IGNORE_INDEX
    from engine.distributed import World
    from engine.objectives.grpo import GRPO
    from engine.stages import config_for
    from engine.training.main import setup
    from tests.helpers import step_records

    argv = ["--init-from", str(base_model_dir), "--data", str(prompts), "--output-dir", str(out / f"z{zero}"),
            "--reward-fn", "length", "--num-generations", "2", "--micro-batch-size", "4",
            "--grad-accum", str(2 // world_size), "--max-new-tokens", "8", "--seq-len", "32", "--max-steps", "4",
            "--lr", "1e-3", "--warmup-steps", "0", "--zero-stage", str(zero), "--precision", "fp32", "--seed", "3",
            "--kl-beta", "0.05", "--rl-loss", "dapo", "--data-cache-dir", str(out / f"cache{zero}")]
    trainer = setup(config_for(GRPO, argv), GRPO, World(rank, rank, world_size))
    objective = trainer.objective

    def rollouts(step):
        g = torch.Generator().manual_seed(100 + step)
        batches = []
        for lengths in ([20, 17, 14, 20], [11, 20, 9, 15]):  # unequal token counts: dapo's global mean shows
            ids = torch.randint(3, 900, (4, 20), generator=g)
            keep = torch.arange(20)[None, :] < torch.tensor(lengths)[:, None]
            labels = torch.where(keep, ids, IGNORE_INDEX)
            labels[:, :8] = IGNORE_INDEX  # the prompt
            batch = {"input_ids": ids, "attention_mask": keep.long(), "position_ids": torch.arange(20).expand(4, 20),
                     "labels": labels, "advantages": torch.randn(4, generator=g)}
            batch["ref_logps"] = objective.reference({k: v.to(trainer.engine.device) for k, v in batch.items()})
            batches.append(batch)
        return batches if world_size == 1 else [batches[rank]]

    objective.step_batches = lambda model, given, step: rollouts(step)
    records = step_records(trainer, 2)
    if rank == 0:
        (out / f"z{zero}-{world_size}.json").write_text(json.dumps(records))


def test_fixed_rollouts_train_alike_on_two_zero3_ranks_and_one_zero0_rank(base_model_dir, tmp_path):
    from tests.helpers import run_ranks

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(16)))
    run_ranks(_fixed_rollout_steps, 1, tmp_path, base_model_dir, prompts, 0)
    run_ranks(_fixed_rollout_steps, 2, tmp_path, base_model_dir, prompts, 3)
    one, two = (json.loads((tmp_path / name).read_text()) for name in ("z0-1.json", "z3-2.json"))
    for a, b in zip(one, two):
        for key in ("loss", "kl", "entropy", "clip_ratio/region_mean"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-9), key
    assert one[1]["kl"] > 0  # the second step trains a policy that has moved from its reference


def _uneven_completions(rank, world_size, out, base_model_dir, prompts):
    """Rank 0 takes nearly every token for a stop token, so its completions end after one token
    while rank 1's run to --max-new-tokens: ZeRO-3 generation gathers weights layer by layer,
    and the ranks must stay in step through it."""
    from engine.distributed import World
    from engine.objectives.grpo import GRPO
    from engine.stages import config_for
    from engine.training.main import setup

    argv = ["--init-from", str(base_model_dir), "--data", str(prompts), "--output-dir", str(out / "uneven"),
            "--reward-fn", "length", "--num-generations", "2", "--micro-batch-size", "4", "--max-new-tokens", "10",
            "--seq-len", "32", "--max-steps", "2", "--zero-stage", "3", "--precision", "fp32", "--seed", "3",
            "--data-cache-dir", str(out / "cache")]
    trainer = setup(config_for(GRPO, argv), GRPO, World(rank, rank, world_size))
    if rank == 0:
        trainer.objective.stop_ids = list(range(3, len(trainer.plan.tokenizer)))
    records = [trainer.train_step() for _ in range(2)]
    lengths = [r["completions/mean_length"] for r in records]
    (out / f"uneven{rank}.json").write_text(json.dumps(lengths))


def test_zero3_ranks_whose_completions_end_at_different_lengths_stay_in_step(base_model_dir, tmp_path):
    from tests.helpers import run_ranks

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(16)))
    run_ranks(_uneven_completions, 2, tmp_path, base_model_dir, prompts)
    lengths = json.loads((tmp_path / "uneven0.json").read_text())
    # the mean over both ranks: rank 0's completions are 1 token, rank 1's up to 10
    assert all(1.0 < length < 10.0 for length in lengths), lengths
