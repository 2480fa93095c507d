"""zerotrain.json: what zerotrain writes beside DeepSpeed's shards in every checkpoint tag.

Written once, last, by rank 0 after every rank has saved (so its presence marks a complete
save), and read by resume, consolidate, extract-adapter and inspect. It carries what the shards
do not say: the run's config and model config, the LoRA settings, the training state, and a
manifest of every file's fingerprint to catch truncated or foreign shards. Whole-file digests,
which come later from a background thread, live beside it in checksums/ (engine.checkpoint.checksums).
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from common.errors import ZerotrainError
from common.jsonio import read_json_object
from common.publish import write_text
from engine.checkpoint.run_dir import SIDECAR


@dataclass
class Sidecar:
    step: int
    tokens_seen: int
    kind: str
    """The training stage that wrote it: pretrain, sft, ..."""
    zero_stage: int
    world_size: int
    """Data-parallel ranks that saved the checkpoint."""
    precision: str
    config: dict[str, Any]
    """The run's resolved config (engine.config.tree.Config.to_dict())."""
    model_config: dict[str, Any]
    """The transformers config of the model trained (PretrainedConfig.to_dict())."""
    exported: str = ""
    """The submodule whose weights are the model (engine.objectives.base.Stage.exported: PPO's actor,
    its critic beside it); its name, with a dot, starts theirs in the checkpoint. "" all of them."""
    lora: dict[str, Any] | None = None
    """PEFT LoRA settings (r, lora_alpha, target_modules, ...) for LoRA runs."""
    files: dict[str, str] = field(default_factory=dict)
    """Fingerprint of every other file of the tag, by path relative to it."""
    data: list[dict[str, Any]] | None = None
    """The data the run trained on (engine.training.parts.Data.identity); None in checkpoints saved
    before it was recorded."""

    def write(self, tag_dir: Path) -> None:
        write_text(tag_dir / SIDECAR, json.dumps(asdict(self), indent=2, default=str))

    @classmethod
    def read(cls, tag_dir: Path) -> Sidecar | None:
        """The tag's sidecar; None when it has none (a foreign checkpoint, or a save that did not
        finish). A malformed one is an error naming the file and the key."""
        path = Path(tag_dir) / SIDECAR
        if not path.is_file():
            return None
        data = read_json_object(path)
        names = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        missing = sorted(required - data.keys())
        if missing:
            raise ZerotrainError(f"{path} lacks {', '.join(missing)}; it was not written by this zerotrain")
        for key, kind in (("step", int), ("tokens_seen", int), ("zero_stage", int), ("world_size", int),
                          ("config", dict), ("model_config", dict), ("files", dict)):
            if key in data and not isinstance(data[key], kind):
                raise ZerotrainError(f"{path}: '{key}' should be {kind.__name__}, found {type(data[key]).__name__}")
        return cls(**{k: v for k, v in data.items() if k in names})

    @property
    def tokenizer(self) -> str | None:
        """The tokenizer the run was configured with (--tokenizer), if it named one."""
        return (self.config.get("model") or {}).get("tokenizer") or None
