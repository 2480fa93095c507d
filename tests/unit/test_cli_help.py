"""`zerotrain --help` teaches: every subcommand listed in a group, the launchers named, and each
subcommand described with its flags' defaults shown (issue 24)."""

from __future__ import annotations

import re

import pytest

from engine.apps.cli import DOCS, build_commands, main

PARSER, GROUPS = build_commands()
COMMANDS = {name: parser for group in GROUPS.values() for name, parser in group.items()}
DESTS = {"--config": "model_config", "--model": "model_option", "--chat": "chat"}


def test_top_level_help_lists_every_command_in_a_group_and_the_launchers(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for title, commands in GROUPS.items():
        block = text.split(f"  {title}:\n", 1)[1].split(":\n", 1)[0]
        assert commands and all(re.search(rf"^    {name} +\S", block, re.M) for name in commands), title
    for launcher in ("pretrain", "sft", "dpo", "distill", "grpo", "reward", "ppo"):
        assert f"launcher/{launcher}.py" in text
    assert DOCS in text


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_subcommand_is_described_and_shows_its_defaults(name):
    parser = COMMANDS[name]
    assert parser.description and len(parser.description) > 40, name
    text = parser.format_help()
    options = text.split("options:\n", 1)[1]
    entries = re.split(r"\n(?=  -)", options)  # one entry per flag, its help wrapped below it
    for entry in entries:
        flag = re.findall(r"--[a-z][\w-]*", entry.strip().split("  ")[0])[0]  # the first of its spellings
        if flag == "--help":
            continue
        default = parser.get_default(DESTS.get(flag, flag[2:].replace("-", "_")))
        if default not in (None, False, ""):
            assert "(default:" in " ".join(entry.split()), f"zerotrain {name} {flag}: default {default!r} not shown"


def test_no_benchmark_figures_in_help():
    for name, parser in COMMANDS.items():
        assert not re.search(r"\d(\.\d+)?x (faster|slower)|\d+(\.\d+)? ?(s|ms|min)\b", parser.format_help()), name
