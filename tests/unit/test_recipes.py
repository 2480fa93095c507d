import re
from pathlib import Path

import pytest

from engine.data.kinds import detect_kind
from engine.data.sources import parse_data_sources
from engine.objectives.distill import DistillConfig
from engine.objectives.grpo import RLConfig

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
# The launcher a recipe is written for, by its name, and the data kind of that launcher's --data.
# distill takes pretraining text or conversations, detected per file ("auto").
KINDS = {"pretrain": "pretrain", "sft": "sft", "dpo": "pref", "distill": "auto", "reward": "pref", "grpo": "prompt"}


def recipe_kind(recipe: Path) -> str:
    return KINDS[recipe.name.split("_", 1)[0]]


def parse_config(argv: list[str]):
    """The config of a recipe, as the launcher its name starts with parses it."""
    from engine.stages import all_stages, config_for

    return config_for(all_stages()[Path(argv[1]).name.split("_", 1)[0]], argv)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_is_a_valid_config(recipe, monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = parse_config(["--config", str(recipe)])
    assert cfg.train.output_dir.startswith("runs/")
    if cfg.data.data:
        kind = recipe_kind(recipe)
        if kind == "auto":
            kind = detect_kind(cfg.data.data)
        parse_data_sources(cfg.data.data, kind)  # files exist, kinds and weights are well formed


def test_the_chain_starts_each_phase_from_the_previous_one(monkeypatch):
    """recipes/chain_tiny.sh: pretrain -> LoRA SFT -> pretrain -> full SFT -> DPO, each recipe run by
    its own launcher and initialised from the output of the phase before."""
    monkeypatch.chdir(ROOT)
    phases = re.findall(r"^run launcher/(\w+)\.py --config (recipes/\S+\.yaml)$",
                        (ROOT / "recipes" / "chain_tiny.sh").read_text(), re.M)
    assert [launcher for launcher, _ in phases] == ["pretrain", "sft", "pretrain", "sft", "dpo"]
    previous = None
    for launcher, recipe in phases:
        assert recipe_kind(Path(recipe)) == KINDS[launcher], (launcher, recipe)
        cfg = parse_config(["--config", recipe])
        assert cfg.model.init_from == (previous or ""), recipe
        previous = cfg.train.output_dir


def test_the_minillm_chain_sfts_teacher_and_student_then_distills_with_reverse_kl(monkeypatch):
    """recipes/chain_minillm_tiny.sh: pretrain tiny and debug, SFT each on the same data, then
    distill the SFT student from the SFT teacher (reverse KL) on that data."""
    monkeypatch.chdir(ROOT)
    phases = re.findall(r"^run launcher/(\w+)\.py --config (recipes/\S+\.yaml)(.*)$",
                        (ROOT / "recipes" / "chain_minillm_tiny.sh").read_text(), re.M)
    assert [launcher for launcher, _, _ in phases] == ["pretrain", "pretrain", "sft", "sft", "distill"]
    cfgs = [parse_config(["--config", recipe, *flags.split()]) for _, recipe, flags in phases]
    tiny, debug, teacher_sft, student_sft, distill = cfgs
    assert (tiny.model.preset, debug.model.preset) == ("tiny", "debug")
    assert teacher_sft.model.init_from == tiny.train.output_dir
    assert student_sft.model.init_from == debug.train.output_dir
    assert teacher_sft.data.data == student_sft.data.data == distill.data.data
    assert distill.model.init_from == student_sft.train.output_dir
    assert distill.section(DistillConfig).teacher == teacher_sft.train.output_dir
    assert distill.section(DistillConfig).kd_loss == "reverse_kl" and distill.section(DistillConfig).on_policy_ratio > 0
    assert len({c.train.output_dir for c in cfgs}) == len(cfgs)


def test_the_gpu_minillm_recipe_is_gpt2_sized_with_reverse_kl(monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = parse_config(["--config", "recipes/distill_minillm_gpt2.yaml"])
    assert cfg.model.preset == "gpt2-124m" and cfg.section(DistillConfig).kd_loss == "reverse_kl" and cfg.section(DistillConfig).on_policy_ratio > 0


def test_the_rl_chain_sfts_trains_a_reward_model_then_grpo_and_serves(monkeypatch):
    """recipes/chain_grpo_tiny.sh: SFT on the shipped additions, a reward model on the SFT model's
    trunk, GRPO of the SFT model with accuracy and that reward model, then `zerotrain serve`."""
    monkeypatch.chdir(ROOT)
    text = (ROOT / "recipes" / "chain_grpo_tiny.sh").read_text()
    phases = re.findall(r"^run launcher/(\w+)\.py --config (recipes/\S+\.yaml)$", text, re.M)
    assert [launcher for launcher, _ in phases] == ["sft", "reward", "grpo"]
    sft, reward, grpo = (parse_config(["--config", recipe]) for _, recipe in phases)
    assert reward.model.init_from == grpo.model.init_from == sft.train.output_dir
    rl = grpo.section(RLConfig)
    assert rl.reward_model == reward.train.output_dir + "/final" and rl.reward_fn == ["accuracy"]
    assert len(rl.reward_weights) == 2 and grpo.train.micro_batch_size % rl.num_generations == 0
    assert detect_kind(grpo.data.data) == "prompt"
    assert re.search(rf"^zerotrain serve {grpo.train.output_dir}/final\b", text, re.M)
