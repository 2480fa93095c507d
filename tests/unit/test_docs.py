"""The manual stays true: the generated flag reference is current, every relative link in README.md
and docs/ resolves (anchors to a heading of the target), every `--flag` the docs name is a flag of
some launcher or `zerotrain` subcommand (or an external tool's, listed below with why), and the
README's quick start parses and chains."""

import argparse
import importlib.util
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Flags of other programs that the docs name, each with where it comes from.
EXTERNAL_FLAGS = {
    # deepspeed's launcher (multi-node.md, README's launcher forms)
    "--num_gpus": "deepspeed", "--num_nodes": "deepspeed", "--hostfile": "deepspeed", "--include": "deepspeed",
    "--exclude": "deepspeed", "--master_addr": "deepspeed/torchrun", "--master_port": "deepspeed/torchrun",
    "--ssh_port": "deepspeed", "--no_ssh_check": "deepspeed", "--log_level": "deepspeed (the demo's transcript)",
    # torchrun
    "--nproc_per_node": "torchrun", "--nnodes": "torchrun", "--node_rank": "torchrun",
    # sbatch / scancel / srun
    "--nodes": "sbatch", "--gpus-per-node": "sbatch", "--cpus-per-task": "sbatch", "--time": "sbatch",
    "--signal": "sbatch/scancel", "--requeue": "sbatch", "--batch": "scancel",
    # pytest (testing.md)
    "--strict-markers": "pytest", "--durations": "pytest",
    # HF Trainer, LLaMA-Factory and Megatron-LM flags mapped to ours (coming-from-elsewhere.md)
    "--per_device_train_batch_size": "HF Trainer", "--gradient_accumulation_steps": "HF Trainer",
    "--learning_rate": "HF Trainer", "--warmup_steps": "HF Trainer", "--lr_scheduler_type": "HF Trainer",
    "--max_steps": "HF Trainer", "--bf16": "HF Trainer", "--fp16": "HF Trainer", "--deepspeed": "HF Trainer",
    "--gradient_checkpointing": "HF Trainer", "--save_steps": "HF Trainer", "--save_total_limit": "HF Trainer",
    "--resume_from_checkpoint": "HF Trainer", "--report_to": "HF Trainer",
    "--finetuning_type": "LLaMA-Factory", "--lora_target": "LLaMA-Factory", "--stage": "LLaMA-Factory",
    "--pref_beta": "LLaMA-Factory", "--pref_loss": "LLaMA-Factory", "--packing": "LLaMA-Factory",
    "--neat_packing": "LLaMA-Factory", "--reset-position-ids": "Megatron-LM", "--reset-attention-mask": "Megatron-LM",
    "--monitor-interval": "torchrun (--report-to's docstring says why it is not --monitor)",
    # not flags: placeholders and a refused example in configuration.md and --report-to's docstring
    "--flag": "placeholder", "--no-flag": "placeholder", "--micro-batch": "the unknown-flag error's example",
    "--monitor": "the name --report-to avoids",
}


def text_of(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def without_code(text: str) -> str:
    """Markdown outside fenced code blocks and inline code (links are only links there)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", text_of(path), flags=re.S | re.M)
    return {slug(m) for m in re.findall(r"^#+\s+(.*)$", text, re.M)}


def load_flags_script():
    spec = importlib.util.spec_from_file_location("docs_flags", ROOT / "scripts" / "docs" / "flags.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_flag_reference_is_current():
    flags = load_flags_script()
    assert (ROOT / "docs" / "flags.md").read_text() == flags.render(), (
        f"docs/flags.md is stale: regenerate it with `{flags.COMMAND}`")


def test_the_flag_reference_covers_every_flag_of_every_launcher():
    from engine.config.tree import field_sections

    sections = {s for stage in load_flags_script().shipped_stages().values() for s in stage.sections}
    text = text_of(ROOT / "docs" / "flags.md")
    for name in field_sections(tuple(sorted(sections, key=lambda c: c.SECTION))):
        assert f"`--{name.replace('_', '-')}`" in text, name


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(doc):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", without_code(text_of(doc))):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        if not path.exists():
            broken.append(f"{target}: no file {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target}: no heading #{anchor} in {path.relative_to(ROOT)}")
    assert not broken, f"{doc.relative_to(ROOT)}: " + "; ".join(broken)


def option_strings() -> set[str]:
    """Every option of every launcher (all stage sections) and of every `zerotrain` subcommand."""
    from engine.apps.cli import build_commands
    from engine.config.parse import build_parser
    from engine.stages import stage_sections

    found: set[str] = {"--help"}
    parsers = [build_parser("docs", stage_sections()), build_commands()[0]]
    while parsers:
        parser = parsers.pop()
        for action in parser._actions:
            found.update(s for s in action.option_strings if s.startswith("--"))
            if isinstance(action, argparse._SubParsersAction):
                parsers.extend(action.choices.values())
    return found


def test_every_flag_the_docs_name_exists():
    known = option_strings() | set(EXTERNAL_FLAGS)
    unknown = {}
    for doc in DOCS:
        for token in re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*[a-z0-9]", text_of(doc)):
            if token not in known:
                unknown.setdefault(token, str(doc.relative_to(ROOT)))
    assert not unknown, ("flags named in the docs that no launcher or zerotrain subcommand takes "
                         f"(fix the doc, or list an external tool's flag in EXTERNAL_FLAGS): {unknown}")


def quick_start_commands() -> list[list[str]]:
    readme = text_of(ROOT / "README.md")
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1).replace("\\\n", " ")
    return [shlex.split(line) for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_the_quick_start_parses_and_each_stage_starts_from_the_one_before(monkeypatch):
    from engine.stages import all_stages, config_for

    monkeypatch.chdir(ROOT)
    outputs: list[str] = []
    launched = []
    for argv in quick_start_commands():
        if argv[0] == "deepspeed":
            launcher = next(a for a in argv if a.startswith("launcher/"))
            stage = Path(launcher).stem
            cfg = config_for(all_stages()[stage], argv[argv.index(launcher) + 1:])
            assert not cfg.model.init_from or cfg.model.init_from == outputs[-1], (stage, cfg.model.init_from)
            for path in cfg.data.data:
                assert (ROOT / path).exists(), path
            outputs.append(cfg.train.output_dir)
            launched.append(stage)
        elif argv[0] == "zerotrain":
            model = argv[argv.index("--model") + 1] if "--model" in argv else argv[2]
            assert model == outputs[-1], argv
    assert launched == ["pretrain", "sft", "dpo"]
