import re
from pathlib import Path

import pytest

from engine.config import parse_config
from engine.data import parse_data_sources

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
# The launcher a recipe is written for, by its name, and the data kind of that launcher's --data.
KINDS = {"pretrain": "pretrain", "sft": "sft", "dpo": "pref"}


def recipe_kind(recipe: Path) -> str:
    return KINDS[recipe.name.split("_", 1)[0]]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_is_a_valid_config(recipe, monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = parse_config(["--config", str(recipe)])
    assert cfg.train.output_dir.startswith("runs/")
    if cfg.data.data:
        parse_data_sources(cfg.data.data, recipe_kind(recipe))  # files exist, kinds and weights are well formed


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
