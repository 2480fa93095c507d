import re
from pathlib import Path

import pytest

from engine.data.kinds import detect_kind
from engine.data.sources import parse_data_sources
from engine.objectives.distill import DistillConfig
from engine.objectives.grpo import RLConfig
from engine.objectives.ppo import PPOConfig

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
    its own launcher and initialised from the output of the phase before; then the DPO model is
    the teacher of a student distilled from scratch."""
    monkeypatch.chdir(ROOT)
    phases = re.findall(r"^run launcher/(\w+)\.py --config (recipes/\S+\.yaml)$",
                        (ROOT / "recipes" / "chain_tiny.sh").read_text(), re.M)
    assert [launcher for launcher, _ in phases] == ["pretrain", "sft", "pretrain", "sft", "dpo", "distill"]
    previous = None
    for launcher, recipe in phases[:-1]:
        assert recipe_kind(Path(recipe)) == KINDS[launcher], (launcher, recipe)
        cfg = parse_config(["--config", recipe])
        assert cfg.model.init_from == (previous or ""), recipe
        previous = cfg.train.output_dir
    distill = parse_config(["--config", phases[-1][1]])
    assert distill.section(DistillConfig).teacher == previous and distill.model.init_from == ""


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


# The demo's chain (scripts/demo.sh runs these, giving its own prepared data and tokenizer).
DEMO_CHAIN = ["recipes/pretrain_demo.yaml", "recipes/sft_demo_lora.yaml", "recipes/dpo_demo.yaml"]
# Recipes in no chain, each with why its sources lie outside the recipes.
STANDALONE = {
    "pretrain_minimind_26m.yaml": "from scratch, on the user's own --data",
    "distill_minillm_gpt2.yaml": "its teacher and student are made by the commands in its header (GPU-sized)",
}


def chain_phases(script: Path) -> list[list[str]]:
    """A chain script's training phases, each as the argv of its launcher (recipe and flags)."""
    return [[launcher, *rest.split()] for launcher, rest in
            re.findall(r"^run launcher/(\w+)\.py (--config recipes/\S+\.yaml.*)$", script.read_text(), re.M)]


def chains() -> dict[str, list[list[str]]]:
    found = {script.name: chain_phases(script) for script in sorted((ROOT / "recipes").glob("chain_*.sh"))}
    found["scripts/demo.sh"] = [[recipe.split("/")[1].split("_")[0], "--config", recipe] for recipe in DEMO_CHAIN]
    return found


def sources(cfg) -> dict[str, str]:
    """The paths a config reads models from: init_from, and the teacher, reward model or critic."""
    out = {"init_from": cfg.model.init_from}
    for section_cls, names in ((DistillConfig, ["teacher"]), (RLConfig, ["reward_model"]), (PPOConfig, ["critic_init"])):
        try:
            section = cfg.section(section_cls)
        except KeyError:
            continue
        out.update({name: getattr(section, name) for name in names})
    return {key: value for key, value in out.items() if value}


def test_every_recipe_reads_only_models_an_earlier_phase_of_its_chain_wrote(monkeypatch):
    """Every model a chained recipe reads (init_from, teacher, reward_model, critic_init) is the
    output_dir, or its final/, of an earlier phase of the same chain; every recipe is in a chain or
    listed as standalone."""
    monkeypatch.chdir(ROOT)
    chained = set()
    for name, phases in chains().items():
        written: list[str] = []
        for launcher, *argv in phases:
            cfg = config_for(launcher, argv)
            chained.add(Path(argv[1]).name)
            for key, path in sources(cfg).items():
                assert path.removesuffix("/final") in written, f"{name}: {argv[1]} reads {key}={path}, not written before"
            written.append(cfg.train.output_dir)
        assert len(set(written)) == len(written), name
    assert {r.name for r in RECIPES} == chained | set(STANDALONE)


def config_for(launcher: str, argv: list[str]):
    from engine.stages import all_stages
    from engine.stages import config_for as build

    return build(all_stages()[launcher], argv)


def test_the_recipes_page_shows_each_chain_as_its_script_runs_it():
    page = (ROOT / "docs" / "recipes.md").read_text()
    documented = re.findall(r"^deepspeed --num_gpus 2 launcher/(\w+)\.py (--config recipes/\S+\.yaml[^#\n]*?)\s*(?:#.*)?$",
                            page, re.M)
    documented = [(launcher, argv.strip()) for launcher, argv in documented]
    scripts = {name: [(launcher, " ".join(argv)) for launcher, *argv in phases]
               for name, phases in chains().items() if name.startswith("chain_")}
    for name, phases in scripts.items():
        assert f"bash recipes/{name}" in page, name
        starts = [i for i in range(len(documented)) if documented[i:i + len(phases)] == phases]
        assert starts, f"docs/recipes.md does not show recipes/{name}'s phases in order: {phases}"
    assert len(documented) == sum(len(phases) for phases in scripts.values())
    for recipe in DEMO_CHAIN + [f"recipes/{r}" for r in STANDALONE]:
        assert recipe in page, recipe
