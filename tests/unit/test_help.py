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
