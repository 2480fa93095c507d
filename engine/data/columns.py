"""--columns: a mapping that says which record fields (and, in message lists, which role values)
hold the parts of a conversation or a preference pair, for files in a shape of their own
(LLaMA-Factory's dataset_info.json idea)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from common.errors import ZerotrainError
from engine.data.chat import message

# Each shape's (required, optional) keys. Keys name record fields, except user/assistant/system
# in a message-list mapping and user/assistant in a pair mapping: those are role values.
COLUMN_SHAPES = {
    "single-turn": (("prompt", "response"), ("input", "system", "history")),
    "message-list": (("messages",), ("role", "content", "user", "assistant", "system")),
    "pair": (("chosen", "rejected"), ("prompt", "system", "role", "content", "user", "assistant")),
    "prompt": (("prompt",), ("system",)),
}


_ROLE_VALUE_KEYS = {"single-turn": (), "message-list": ("user", "assistant", "system"), "pair": ("user", "assistant"),
                    "prompt": ()}
COLUMNS_HELP = ("single-turn SFT: prompt=FIELD,response=FIELD[,input=FIELD,system=FIELD,history=FIELD]; "
                "message lists: messages=FIELD[,role=FIELD,content=FIELD,user=VALUE,assistant=VALUE,system=VALUE]; "
                "preference pairs: chosen=FIELD,rejected=FIELD[,prompt=FIELD,system=FIELD,role=FIELD,content=FIELD,"
                "user=VALUE,assistant=VALUE]; RL prompts: prompt=FIELD[,system=FIELD]")


@dataclass(frozen=True)
class Columns:
    """A checked --columns mapping: which record fields (and, in message lists, which role values)
    hold the parts of a conversation or a preference pair (LLaMA-Factory's dataset_info.json idea)."""

    shape: str  # a key of COLUMN_SHAPES
    fields: dict[str, str]

    @property
    def kind(self) -> str:
        """The data kind the mapping reads: pref for pairs, prompt for RL prompts, sft for conversations."""
        return {"pair": "pref", "prompt": "prompt"}.get(self.shape, "sft")

    @property
    def roles(self) -> dict[str, str]:
        """Mapped role values (lower case) -> user / assistant / system."""
        return {self.fields[k].lower(): k for k in _ROLE_VALUE_KEYS[self.shape] if k in self.fields}

    def spec(self) -> str:
        """The mapping as sorted KEY=VALUE text: equal mappings give equal text (the cache key)."""
        return ",".join(f"{k}={v}" for k, v in sorted(self.fields.items()))


def parse_columns(spec: str, prompts: bool = False) -> Columns | None:
    """The checked mapping of a --columns KEY=VALUE,... string (None when empty); its shape is
    told by its keys (chosen/rejected: pairs; messages: message lists; else single-turn), or is
    the RL prompts' when `prompts`."""
    if not spec.strip():
        return None
    known = sorted({k for required, optional in COLUMN_SHAPES.values() for k in required + optional})
    fields: dict[str, str] = {}
    for entry in spec.split(","):
        key, equals, value = (part.strip() for part in entry.partition("="))
        if not equals or not key or not value:
            raise ZerotrainError(f"--columns {spec!r}: {entry.strip()!r} is not KEY=VALUE; {COLUMNS_HELP}")
        if key not in known:
            raise ZerotrainError(f"--columns {spec!r}: unknown key '{key}' (valid keys: {', '.join(known)}); "
                                 f"{COLUMNS_HELP}")
        if key in fields:
            raise ZerotrainError(f"--columns {spec!r}: '{key}' is given twice; give each key once")
        fields[key] = value
    shape = ("prompt" if prompts else "pair" if {"chosen", "rejected"} & fields.keys() else
             "message-list" if "messages" in fields else "single-turn")
    required, optional = COLUMN_SHAPES[shape]
    stray = [k for k in fields if k not in required + optional]
    if stray:
        raise ZerotrainError(f"--columns {spec!r}: '{stray[0]}' is not a key of a {shape} mapping (its keys: "
                             f"{', '.join(required + optional)}); {COLUMNS_HELP}")
    missing = [k for k in required if k not in fields]
    if missing:
        raise ZerotrainError(f"--columns {spec!r}: missing '{missing[0]}': a {shape} mapping needs "
                             f"{' and '.join(required)}; {COLUMNS_HELP}")
    return Columns(shape, fields)


def columns_for(kind: str, spec: str) -> Columns | None:
    """The checked --columns mapping for raw data of `kind` (None without one)."""
    mapping = parse_columns(spec, prompts=kind == "prompt")
    if mapping is None or mapping.kind == kind:
        return mapping
    if kind == "pretrain":
        raise ZerotrainError(f"--columns {spec!r} maps SFT conversations or preference pairs; pretraining "
                             "records are read from their \"text\" field: drop --columns for pretraining data")
    raise ZerotrainError(f"--columns {spec!r} is a {mapping.shape} mapping, for {mapping.kind} data, but the data "
                         f"is {kind}; {COLUMNS_HELP}")


def mapped_field(record: Any, name: str, where: str, what: str = "the record") -> Any:
    """record[name] for a field that --columns names; a record without it is an error naming the
    fields it has."""
    if not isinstance(record, dict):
        raise ZerotrainError(f"{where}: {what} must be a JSON object, not {type(record).__name__}")
    if name not in record:
        raise ZerotrainError(f"{where}: {what} has no field '{name}' (named by --columns); it has "
                             f"{sorted(record)}: fix the record or the mapping")
    return record[name]


def mapped_turn(turn: Any, columns: Columns, where: str, name: str) -> dict[str, str]:
    """One {role, content} message from a turn read through a mapping's role/content names and
    role values (other role values go through ROLE_ALIASES)."""
    role = mapped_field(turn, columns.fields.get("role", "role"), where, name)
    content = mapped_field(turn, columns.fields.get("content", "content"), where, name)
    role = columns.roles.get(str(role).lower(), role)
    return message({"role": role, "content": content}, "role", "content", where, name)
