from pathlib import Path

import pytest

from engine.config import parse_config
from engine.data import parse_data_sources

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_is_a_valid_config(recipe, monkeypatch):
    monkeypatch.chdir(recipe.parent.parent)
    cfg = parse_config(["--config", str(recipe)])
    assert cfg.train.output_dir.startswith("runs/")
    if cfg.data.data:
        kind = "sft" if recipe.name.startswith("sft") else "pretrain"  # the launcher it is written for
        parse_data_sources(cfg.data.data, kind)  # files exist, kinds and weights are well formed
