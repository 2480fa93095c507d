"""Write docs/flags.md, the flag reference, from the config dataclasses (so it cannot drift).

    python scripts/docs/flags.py           # (re)write docs/flags.md
    python scripts/docs/flags.py --check   # exit 1 if docs/flags.md is not what this writes

Every section a launcher parses: the common ones (engine.config.sections.COMMON_SECTIONS, every
launcher) and each stage's own (engine.stages.all_stages(): its `section`, the sections it
`shares`, and its `defaults`). Per flag: its YAML key, type, default, choices where the field
declares them (`field(metadata={"choices": ...})`), its docstring, and the launchers that take it.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engine.config.parse import field_docs  # noqa: E402
from engine.config.sections import COMMON_SECTIONS, flag  # noqa: E402
from engine.config.tree import field_types  # noqa: E402
from engine.stages import all_stages  # noqa: E402

OUTPUT = ROOT / "docs" / "flags.md"
COMMAND = "python scripts/docs/flags.py"


def shipped_stages() -> dict[str, Any]:
    """The stages zerotrain ships (declared in engine/), not ones a test or plugin registered."""
    return {name: stage for name, stage in all_stages().items()
            if getattr(stage.objective, "__module__", "").startswith("engine.")}


def type_name(annotation: Any) -> str:
    """A field's type as a reader would write it: int, float, str, bool, list[str]."""
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation) or (str,)
        return f"list[{type_name(item)}]"
    return getattr(annotation, "__name__", str(annotation).replace("typing.", ""))


def show(value: Any) -> str:
    """A default as a YAML user would write it, in code format ('' shown as "")."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = value if value else '""'
    elif isinstance(value, (list, tuple)):
        text = "[" + ", ".join(str(v) for v in value) + "]"
    elif value is None:
        text = "null"
    else:
        text = repr(value)
    return "`" + text.replace("|", "\\|") + "`"


def default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def cell(text: str) -> str:
    """Table-cell text: no pipes or newlines; argparse's %% back to %."""
    return " ".join(text.replace("%%", "%").split()).replace("|", "\\|")


def section_table(section_cls: type, launchers: str, stage_defaults: dict[str, dict[str, Any]]) -> list[str]:
    docs = field_docs(section_cls)
    types = field_types(section_cls)
    lines = [f"## `{section_cls.SECTION}`", ""]
    summary = " ".join((section_cls.__doc__ or "").split())
    if summary:
        lines += [summary, ""]
    lines += [f"Launchers: {launchers}.", "",
              "| flag | YAML key | type | default | choices | what |",
              "| --- | --- | --- | --- | --- | --- |"]
    for f in dataclasses.fields(section_cls):
        if f.name not in types:
            continue
        default = show(default_of(f))
        per_stage = stage_defaults.get(f.name, {})
        if per_stage:
            default += " (" + ", ".join(f"{stage}: {show(v)}" for stage, v in sorted(per_stage.items())) + ")"
        choices = f.metadata.get("choices") if f.metadata else None
        choices_text = ", ".join(f"`{c}`" for c in choices) if choices else ""
        lines.append(f"| `{flag(f.name)}` | `{f.name}` | {type_name(types[f.name])} | {default} | {choices_text} "
                     f"| {cell(docs.get(f.name, ''))} |")
    return lines + [""]


def render() -> str:
    """The whole of docs/flags.md."""
    stages = shipped_stages()
    owners: dict[type, list[str]] = {}
    stage_defaults: dict[str, dict[str, Any]] = {}
    for name, stage in stages.items():
        for section_cls in stage.sections:
            owners.setdefault(section_cls, []).append(name)
        for key, value in stage.defaults:
            stage_defaults.setdefault(key, {})[name] = value
    lines = ["# Flag reference", "",
             f"Generated from the config dataclasses by `{COMMAND}`; do not edit by hand "
             "(`tests/unit/test_docs.py` fails when it is stale).", "",
             "Every flag is also a YAML key of `--config FILE.yaml` (flat, or under its section's name); flags win "
             "over the file, the file over the defaults. Booleans take `--flag`, `--flag true|false` or `--no-flag`; "
             "lists take several values or one comma-separated value. See [configuration](configuration.md).", "",
             "Sections: " + ", ".join(f"[`{c.SECTION}`](#{c.SECTION})"
                                      for c in (*COMMON_SECTIONS, *owners)) + ".", "",
             "# Every launcher", ""]
    everyone = ", ".join(f"`launcher/{n}.py`" for n in sorted(stages))
    for section_cls in COMMON_SECTIONS:
        lines += section_table(section_cls, f"all ({everyone})", stage_defaults)
    lines += ["# One stage's own", ""]
    for section_cls, names in owners.items():
        launchers = ", ".join(f"`launcher/{n}.py`" for n in names)
        lines += section_table(section_cls, launchers + " (the other launchers refuse these flags)", stage_defaults)
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/flags.md is stale; write nothing")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not OUTPUT.exists() or OUTPUT.read_text() != text:
            print(f"{OUTPUT.relative_to(ROOT)} is stale: run `{COMMAND}`", file=sys.stderr)
            return 1
        print(f"{OUTPUT.relative_to(ROOT)} is up to date")
        return 0
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
