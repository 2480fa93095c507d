"""A run's config from its command line: `--config FILE.yaml` plus flags named after the fields.

Precedence: dataclass defaults < an entry point's `defaults` < `--config FILE.yaml` < flags.
Every field of every section is a flag (`micro_batch_size` is `--micro-batch-size`; a bool
field `--pack` takes `--pack`, `--pack false` or `--no-pack`); --help shows each field's
docstring.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import textwrap
import typing
from pathlib import Path
from typing import Any, Iterable

import yaml

from common.errors import ZerotrainError, did_you_mean
from engine.config.sections import flag
from engine.config.tree import (
    RETIRED,
    Config,
    field_sections,
    field_types,
    merge,
    section_classes,
)


def read_yaml(path: str) -> dict[str, Any]:
    """Read a YAML config file; a missing file or a non-mapping is a clear error."""
    p = Path(path)
    if not p.is_file():
        raise ZerotrainError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ZerotrainError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ZerotrainError(f"{path}: expected a mapping of config keys at the top level")
    return data


def build_parser(description: str, stage_sections: Iterable[type] = ()) -> argparse.ArgumentParser:
    """An argparse parser with one flag per config field (defaults suppressed, so YAML can fill them)."""
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False,
                                     argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", help="YAML file of config keys (flat or by section)")
    # The deepspeed launcher appends --local_rank=N; the rank also arrives as LOCAL_RANK.
    parser.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, help=argparse.SUPPRESS)
    for section, section_cls in section_classes(tuple(stage_sections)).items():
        group = parser.add_argument_group(section)
        docs = field_docs(section_cls)
        for name, annotation in field_types(section_cls).items():
            help_text = docs.get(name, "")
            if annotation is bool:  # --flag, --flag true|false, --no-flag
                group.add_argument(flag(name), dest=name, nargs="?", const="true", metavar="BOOL", help=help_text)
                group.add_argument("--no-" + flag(name)[2:], dest=name, action="store_const", const="false",
                                   help=argparse.SUPPRESS)
            elif typing.get_origin(annotation) is list:
                group.add_argument(flag(name), dest=name, nargs="+", action="extend", metavar="VALUE",
                                   help=help_text)
            else:
                group.add_argument(flag(name), dest=name, metavar=name.upper(), help=help_text)
    return parser


def parse_config(argv: list[str] | None = None, *, stage_sections: Iterable[type] = (),
                 description: str = "zerotrain run", defaults: dict[str, Any] | None = None) -> Config:
    """Parse `argv` (YAML via --config, then flags) into a checked Config with the common sections
    and `stage_sections` (the section dataclasses of a stage: engine.stages.config_for parses a
    launcher's command line).

    `defaults` are per-entry-point overrides of the dataclass defaults (lowest precedence).
    """
    stage_sections = tuple(stage_sections)
    parser = build_parser(description, stage_sections)
    args, rest = parser.parse_known_args(argv)
    for token in rest:
        if token.startswith("--"):
            name = token[2:].split("=", 1)[0]
            if name.replace("-", "_") in RETIRED:
                new, what = RETIRED[name.replace("-", "_")]
                raise ZerotrainError(f"--{name} was replaced by {flag(new)} ({what})")
            valid = [flag(n) for n in field_sections(stage_sections)] + ["--config"]
            hint = did_you_mean("--" + name, valid, cutoff=0.5)
            raise ZerotrainError(f"unknown flag '--{name}'" + (f"; {hint}" if hint else ""))
        raise ZerotrainError(f"unexpected argument '{token}' (flags take the form --name value)")
    classes = section_classes(stage_sections)
    values: dict[str, Any] = dict(defaults or {})
    given = vars(args)
    if "config" in given:
        path = given.pop("config")
        merge(values, read_yaml(path), path, classes)
    given.pop("local_rank", None)
    merge(values, given, "arguments", classes)
    return Config.from_dict(values, stage_sections=stage_sections, source="arguments")


def field_docs(section_cls: type) -> dict[str, str]:
    """Field docstrings (the string literal under each field) for --help."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(section_cls)))
    docs: dict[str, str] = {}
    body = tree.body[0].body
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split()).replace("%", "%%")
    return docs
