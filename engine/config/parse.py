"""A run's config from its command line: `--config FILE.yaml` plus flags named after the fields.

Precedence: dataclass defaults < an entry point's `defaults` < `--config FILE.yaml` < flags.
Every field of every section is a flag (`micro_batch_size` is `--micro-batch-size`; a bool
field `--pack` takes `--pack`, `--pack false` or `--no-pack`); --help shows each field's
docstring, its default (the entry point's, where it has one) and its choices.
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
from engine.config.sections import Given, choices_of, field_default, flag
from engine.config.tree import (
    RETIRED,
    Config,
    coerce,
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


def build_parser(description: str, stage_sections: Iterable[type] = (), *, shown: Iterable[type] | None = None,
                 defaults: dict[str, Any] | None = None, epilog: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one flag per config field (defaults suppressed, so YAML can fill them).

    `shown`: the stage sections whose flags --help lists (default: all); the others are parsed
    all the same (so that a launcher can refuse another stage's flag by name) but not listed.
    `defaults`: the entry point's own defaults, which --help shows in place of the dataclass's."""
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False, epilog=epilog,
                                     argument_default=argparse.SUPPRESS,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file of config keys (flat or by section); flags override it")
    # The deepspeed launcher appends --local_rank=N; the rank also arrives as LOCAL_RANK.
    parser.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, help=argparse.SUPPRESS)
    stage_sections = tuple(stage_sections)
    listed = set(stage_sections if shown is None else shown)
    for section, section_cls in section_classes(stage_sections).items():
        hidden = section_cls in stage_sections and section_cls not in listed
        group = parser.add_argument_group(section)
        docs, choices = field_docs(section_cls), choices_of(section_cls)
        for name, annotation in field_types(section_cls).items():
            default = (defaults or {}).get(name, field_default(section_cls, name))
            help_text = argparse.SUPPRESS if hidden else with_default(docs.get(name, ""), default)
            options = "{" + ",".join(map(str, choices[name])) + "}" if name in choices else None
            if annotation is bool:  # --flag, --flag true|false, --no-flag
                group.add_argument(flag(name), dest=name, nargs="?", const="true", metavar="BOOL", help=help_text)
                group.add_argument("--no-" + flag(name)[2:], dest=name, action="store_const", const="false",
                                   help=argparse.SUPPRESS)
            elif typing.get_origin(annotation) is list:
                group.add_argument(flag(name), dest=name, nargs="+", action="extend", metavar=options or "VALUE",
                                   help=help_text)
            else:
                group.add_argument(flag(name), dest=name, metavar=options or name.upper(), help=help_text)
    return parser


def with_default(doc: str, default: Any) -> str:
    """A field's help text and its default. An empty default (None, "", []) is left to the text
    where it says what happens then ("default: ...", "empty: ...")."""
    if default in (None, "", []) and ("default" in doc.lower() or "empty:" in doc.lower()):
        return doc
    if isinstance(default, Given):
        shown = f"{show_value(default.value)}; {show_value(default.then)} with {flag(default.field)}"
    else:
        shown = show_value(default)
    return f"{doc} (default: {shown})".lstrip()


def show_value(value: Any) -> str:
    """A default as a user would type it."""
    if value in (None, "", []):
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def parse_config(argv: list[str] | None = None, *, stage_sections: Iterable[type] = (),
                 description: str = "zerotrain run", defaults: dict[str, Any] | None = None,
                 shown: Iterable[type] | None = None, epilog: str | None = None) -> Config:
    """Parse `argv` (YAML via --config, then flags) into a checked Config with the common sections
    and `stage_sections` (the section dataclasses of a stage: engine.stages.config_for parses a
    launcher's command line).

    `defaults` are per-entry-point overrides of the dataclass defaults (lowest precedence); a
    `Given` one takes its other value when the run sets its field. `shown` and `epilog` shape
    --help (build_parser).
    """
    stage_sections = tuple(stage_sections)
    parser = build_parser(description, stage_sections, shown=shown, defaults=defaults, epilog=epilog)
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
    values: dict[str, Any] = {}
    given = vars(args)
    if "config" in given:
        path = given.pop("config")
        merge(values, read_yaml(path), path, classes)
    given.pop("local_rank", None)
    merge(values, given, "arguments", classes)
    return Config.from_dict({**resolve_defaults(defaults or {}, values, stage_sections), **values},
                            stage_sections=stage_sections, source="arguments")


def resolve_defaults(defaults: dict[str, Any], given: dict[str, Any], stage_sections: tuple[type, ...]) -> dict[str, Any]:
    """An entry point's defaults for a run that sets `given` (flat keys from YAML and flags):
    a Given default is its `then` where the run sets its field to something true."""
    owner, classes = field_sections(stage_sections), section_classes(stage_sections)
    resolved = {}
    for name, default in defaults.items():
        if isinstance(default, Given):
            raw = given.get(default.field)
            annotation = field_types(classes[owner[default.field]])[default.field]
            default = default.then if raw is not None and coerce(raw, annotation, flag(default.field)) else default.value
        resolved[name] = default
    return resolved


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
