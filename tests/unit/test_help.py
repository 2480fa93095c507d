"""A launcher's --help teaches: every flag with its default (the stage's own where it has one)
and its choices, only the sections the stage reads, the ways to launch it and where the manual
is; and no help text carries a benchmark figure that would go stale."""

from __future__ import annotations

import re

import pytest

from common.errors import ZerotrainError
from engine import stages
from engine.config.parse import field_docs
from engine.config.sections import choices_of
from engine.config.tree import section_classes
from engine.objectives.preference import DPO


def help_of(stage, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        stages.config_for(stage, ["--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def test_dpo_help_shows_defaults_choices_and_only_its_own_sections(capsys):
    text = help_of(DPO, capsys)
    assert "--pref-loss {dpo,ipo,orpo,simpo}" in text and "--precision {auto,bf16,fp16,fp32}" in text
    assert "--zero-stage {0,1,2,3}" in text
    assert "(default: dpo)" in text and "(default: 0.1)" in text  # --pref-loss, --beta
    assert "(default: 512)" in text and "(default: debug)" in text  # --seq-len, --preset
    for other in ("--kd-loss", "--teacher", "--reward-fn", "--num-generations", "--kl-coef", "--critic-init",
                  "--center-rewards-coefficient"):
        assert other not in text, other
    for section in ("distill:", "rl:", "ppo:", "reward:"):
        assert f"\n{section}\n" not in text, section
    assert "torchrun --nproc_per_node N launcher/dpo.py" in text and "sbatch scripts/slurm/dpo.sbatch" in text
    assert "docs/flags.md" in text and "docs/README.md" in text


def test_a_hidden_section_is_still_refused_by_name():
    with pytest.raises(ZerotrainError, match=r"--kd-loss: not a flag of dpo \(distill section\).*launcher/distill.py"):
        stages.config_for(DPO, ["--kd-loss", "jsd"])


def test_every_stage_shows_its_own_and_shared_sections(capsys):
    from engine.objectives.ppo import PPO

    text = help_of(PPO, capsys)
    assert "\nppo:\n" in text and "\nrl:\n" in text and "\npref:\n" not in text
    assert "--scale-rewards {group,batch,none}" in text  # a shared section's choices


def test_a_choice_field_refuses_a_value_outside_its_choices(tmp_path):
    with pytest.raises(ZerotrainError, match=r"pref.pref_loss \(--pref-loss\) must be one of dpo, ipo, orpo, simpo, "
                                             r"got 'kto'"):
        stages.config_for(DPO, ["--pref-loss", "kto"])
    (tmp_path / "run.yaml").write_text("train:\n  report_to: [csv, slack]\n")
    with pytest.raises(ZerotrainError, match=r"train.report_to \(--report-to\) must be any of tensorboard, csv, wandb, "
                                             r"got 'slack'"):
        stages.config_for(DPO, ["--config", str(tmp_path / "run.yaml")])


def test_choices_have_one_home_the_field():
    from engine.objectives.preference import PREF_LOSSES, PrefConfig

    assert choices_of(PrefConfig) == {"pref_loss": PREF_LOSSES}


FIGURE = re.compile(r"\d\.\d+x\b|\b\d+(\.\d+)?\s*[KMG]i?B/s\b|BENCHMARKS|tokens/s\b|\d+(\.\d+)?\s*%")
"""A measured figure: a ratio like 0.21x, a throughput, a percentage, a pointer to the benchmarks.
A rule such as "20x the median step time" is not one."""


def test_no_help_text_carries_a_benchmark_figure():
    sections = section_classes(stages.stage_sections())
    docs = {f"{name}.{field}": doc for name, cls in sections.items() for field, doc in field_docs(cls).items()}
    assert len(docs) > 60
    assert not {key: doc for key, doc in docs.items() if FIGURE.search(doc)}


# --------------------------------------------------------------------------- defaults by stage


def test_each_stage_has_its_own_learning_rate_and_a_flag_overrides_it(tmp_path):
    from engine.objectives.causal_lm import SFT
    from engine.objectives.distill import DISTILL
    from engine.objectives.grpo import GRPO
    from engine.objectives.ppo import PPO
    from engine.objectives.reward_model import REWARD

    lr = {stage.name: stages.config_for(stage, []).optim.lr for stage in (SFT, DPO, DISTILL, GRPO, PPO, REWARD)}
    assert lr == {"sft": 5e-4, "dpo": 1e-6, "distill": 5e-5, "grpo": 1e-6, "ppo": 1e-6, "reward": 1e-4}
    assert stages.config_for(DPO, ["--lora-r", "8"]).optim.lr == 5e-6  # an adapter's larger steps
    assert stages.config_for(DPO, ["--lora-r", "0"]).optim.lr == 1e-6
    (tmp_path / "lora.yaml").write_text("lora:\n  lora_r: 8\n")
    assert stages.config_for(DPO, ["--config", str(tmp_path / "lora.yaml")]).optim.lr == 5e-6
    assert stages.config_for(DPO, ["--lora-r", "8", "--lr", "3e-5"]).optim.lr == 3e-5
    (tmp_path / "lr.yaml").write_text("lr: 2.0e-6\n")
    assert stages.config_for(DPO, ["--config", str(tmp_path / "lr.yaml")]).optim.lr == 2e-6


def test_a_stage_help_shows_its_own_defaults(capsys):
    from engine.objectives.causal_lm import PRETRAIN, SFT
    from engine.objectives.distill import DISTILL

    def flag_help(stage, name):
        text = help_of(stage, capsys)
        start = text.index(f"\n  {name} ")
        return " ".join(text[start:text.index("\n  --", start + 1)].split())

    assert flag_help(DPO, "--lr").endswith("(default: 1e-06; 5e-06 with --lora-r)")
    assert flag_help(SFT, "--lr").endswith("(default: 0.0005)")
    assert flag_help(SFT, "--pack").endswith("(default: true)")
    assert flag_help(PRETRAIN, "--pack").endswith("(default: false)")
    assert flag_help(DISTILL, "--pack").endswith("(default: true; false with --on-policy-ratio)")


def test_sft_dpo_and_distillation_pack_by_default_and_no_pack_turns_it_off():
    from engine.objectives.causal_lm import PRETRAIN, SFT
    from engine.objectives.distill import DISTILL
    from engine.objectives.reward_model import REWARD

    for stage in (SFT, DPO, DISTILL):
        assert stages.config_for(stage, []).data.pack is True, stage.name
        assert stages.config_for(stage, ["--no-pack"]).data.pack is False, stage.name
        assert stages.config_for(stage, ["--pack", "false"]).data.pack is False, stage.name
    for stage in (PRETRAIN, REWARD):  # a reward model refuses --pack: its default must not ask for it
        assert stages.config_for(stage, []).data.pack is False, stage.name
    # On-policy distillation rebuilds each row from its prompt and refuses --pack: off there by default,
    # while an explicit --pack is kept for the objective to refuse with its reason.
    assert stages.config_for(DISTILL, ["--on-policy-ratio", "0.5"]).data.pack is False
    assert stages.config_for(DISTILL, ["--on-policy-ratio", "0"]).data.pack is True
    assert stages.config_for(DISTILL, ["--on-policy-ratio", "0.5", "--pack"]).data.pack is True


def test_a_run_from_no_weights_says_which_preset_and_how_big():
    from types import SimpleNamespace

    import torch

    from engine.config.parse import parse_config
    from engine.training.build import new_model_line
    from engine.training.parts import Model

    model = Model(torch.nn.Linear(10, 10), SimpleNamespace(num_hidden_layers=2), None, 0.0, 0)
    line = new_model_line(parse_config([]), model)
    assert "preset 'debug', 110 parameters" in line and "2-layer" in line and "--preset tiny|" in line
    assert new_model_line(parse_config(["--preset", "tiny"]), model).endswith("preset 'tiny', 110 parameters")
