"""A stage is its declaration: registering a toy stage (tests/toy_stage.py) gives it flags of its
own, a config section in config.yaml, a place in --help, a refusal of its flags by the other
launchers (naming its launcher), and the data checks of its kinds, with nothing else changed.
Training it is tests/distributed/test_toy_stage.py."""

from __future__ import annotations

import pytest

from common.errors import ZerotrainError
from engine import stages
from engine.config.parse import build_parser
from engine.objectives.causal_lm import PRETRAIN, SFT
from engine.objectives.distill import DISTILL
from engine.objectives.preference import DPO
from engine.training.plan import plan_run
from tests.helpers import SAMPLES
from tests.toy_stage import TOY, ToyConfig, ToyLoss


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(stages._registered, TOY.name, TOY)  # registered for this test only
    return TOY


def test_the_shipped_stages_are_found_by_their_declarations():
    found = stages.all_stages()
    assert [found[name] for name in ("pretrain", "sft", "dpo", "distill")] == [PRETRAIN, SFT, DPO, DISTILL]
    assert "toy" not in found


def test_a_registered_stage_has_its_own_flags_and_config_section(toy, tmp_path):
    cfg = stages.config_for(toy, ["--toy-weight", "2.5", "--output-dir", str(tmp_path / "run")])
    assert cfg.section(ToyConfig).toy_weight == 2.5
    assert isinstance(toy.objective(cfg), ToyLoss) and toy.objective(cfg).weight == 2.5
    cfg.save(tmp_path / "config.yaml")
    saved = stages.load_config(__import__("yaml").safe_load((tmp_path / "config.yaml").read_text()), "config.yaml")
    assert list(cfg.to_dict())[-1] == "toy" and saved.section(ToyConfig).toy_weight == 2.5
    with pytest.raises(ZerotrainError, match=r"toy.toy_weight \(--toy-weight\) must be a positive number"):
        stages.config_for(toy, ["--toy-weight", "0"])
    help_text = build_parser(stages.stage_description(toy), stages.stage_sections()).format_help()
    assert "--toy-weight" in help_text and "SFT's loss, weighted" in stages.stage_description(toy)


def test_the_other_launchers_refuse_its_flags_and_it_refuses_theirs(toy):
    with pytest.raises(ZerotrainError, match=r"--toy-weight: not a flag of sft \(toy section\).*launcher/toy.py"):
        stages.config_for(SFT, ["--toy-weight", "2"])
    with pytest.raises(ZerotrainError, match=r"--beta: not a flag of toy \(pref section\).*launcher/dpo.py"):
        stages.config_for(toy, ["--beta", "0.2"])


def test_its_data_kinds_are_checked_before_any_work(toy, tmp_path):
    base = ["--output-dir", str(tmp_path / "run"), "--preset", "debug"]
    plan = plan_run(stages.config_for(toy, [*base, "--data", str(SAMPLES / "sharegpt_identity_500.json")]), toy, 1)
    assert [s.kind for s in plan.sources] == ["sft"]
    assert "launcher/toy.py" in stages.launchers_for("sft") and "launcher/toy.py" not in stages.launchers_for("pref")
    with pytest.raises(ZerotrainError, match=r"pretraining text are for launcher/pretrain.py or launcher/sft.py or "
                                             r"launcher/distill.py \(toy was given pretrain data; it trains on SFT"):
        plan_run(stages.config_for(toy, [*base, "--data", f"pretrain:{SAMPLES / 'tinyshakespeare.txt'}"]), toy, 1)
    with pytest.raises(ZerotrainError, match=r"preference pairs are for launcher/dpo.py or launcher/reward.py \(toy was given pref data"):
        plan_run(stages.config_for(toy, [*base, "--data", str(SAMPLES / "pref_pairs.jsonl")]), toy, 1)


def test_two_stages_of_one_name_are_refused(toy):
    from dataclasses import replace

    with pytest.raises(ValueError, match="already declared"):
        stages.register(replace(toy, summary="another"))


def test_ppo_reads_grpo_rewards_and_sampling_and_refuses_the_rest(tmp_path):
    """PPO shares GRPO's rl section (its own default of 1 completion a prompt) beside its own ppo
    section, and LoRA without dropout by default (as GRPO; SFT keeps it); GRPO refuses PPO's flags, PPO GRPO's loss flags."""
    from engine.objectives.grpo import GRPO, RLConfig
    from engine.objectives.ppo import PPO, PPOConfig

    base = ["--output-dir", str(tmp_path / "run"), "--reward-fn", "length"]
    cfg = stages.config_for(PPO, [*base, "--gamma", "0.9", "--epsilon", "0.1"])
    assert cfg.section(RLConfig).num_generations == 1 and cfg.section(RLConfig).reward_fn == ["length"]
    assert cfg.section(PPOConfig).gamma == 0.9 and cfg.section(RLConfig).epsilon == 0.1
    assert stages.config_for(PPO, [*base, "--num-generations", "4"]).section(RLConfig).num_generations == 4
    assert stages.config_for(GRPO, base).section(RLConfig).num_generations == 8
    assert cfg.lora.lora_dropout == 0.0 and stages.config_for(GRPO, base).lora.lora_dropout == 0.0
    from engine.objectives.causal_lm import SFT

    assert stages.config_for(SFT, ["--output-dir", str(tmp_path / "sft")]).lora.lora_dropout == 0.05
    assert stages.config_for(PPO, [*base, "--lora-dropout", "0.1"]).lora.lora_dropout == 0.1
    with pytest.raises(ZerotrainError, match=r"--gamma: not a flag of grpo \(ppo section\).*launcher/ppo.py"):
        stages.config_for(GRPO, [*base, "--gamma", "0.9"])
    cfg = stages.config_for(PPO, [*base, "--kl-beta", "0.1"])
    with pytest.raises(ZerotrainError, match="--kl-beta: GRPO's, not PPO's"):
        PPO.objective(cfg).check(cfg, None)
