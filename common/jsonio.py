"""Reading the small JSON files zerotrain and the libraries it reads write (config.json,
adapter_config.json, weight indexes, zerotrain.json)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from common.errors import ZerotrainError


def read_json_object(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON file that must hold an object, with an error naming the file when it cannot be read
    or holds something else."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ZerotrainError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise ZerotrainError(f"{path}: expected a JSON object")
    return data
