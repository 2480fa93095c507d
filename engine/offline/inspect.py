"""`zerotrain inspect`: what each tag of a checkpoint directory holds (stage, ranks, dtype, size,
completeness), as a table; and the human-readable counts the checkpoint tools print."""

from __future__ import annotations

from typing import Any

from common.errors import ZerotrainError
from engine.checkpoint.run_dir import LATEST, checkpoint_dir, is_tag_dir, list_tags
from engine.offline.ds_layout import CheckpointInfo, describe


def inspect(ckpt_dir: str, *, trust_pickle: bool = False) -> tuple[str | None, list[CheckpointInfo]]:
    """`latest` (or None) and the description of every tag in a checkpoint dir (or of one tag folder)."""
    root = checkpoint_dir(ckpt_dir)
    if is_tag_dir(root):
        return None, [describe(root, trust_pickle=trust_pickle)]
    tags = list_tags(root)
    if not tags:
        raise ZerotrainError(f"{root} holds no DeepSpeed checkpoint (no global_stepN/ folder with *_model_states.pt)")
    latest = (root / LATEST).read_text().strip() if (root / LATEST).is_file() else None
    return latest, [describe(root / t, trust_pickle=trust_pickle) for t in tags]


def format_inspect(root: str, latest: str | None, infos: list[CheckpointInfo]) -> str:
    """The table `zerotrain inspect` prints."""
    lines = [f"{root}" + (f" (latest: {latest})" if latest else "")]
    rows = [("tag", "step", "stage", "ranks", "dtype", "params", "LoRA", "size", "complete")]
    for i in infos:
        rows.append((i.tag, _str(i.step), _str(i.zero_stage), _str(i.world_size), i.dtype or "?",
                     human_count(i.num_params) if i.num_params is not None else "?",
                     "yes" if i.is_lora else "no", human_count(i.bytes, "B"), "yes" if i.complete else "NO"))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    for r in rows:
        lines.append("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
    for i in infos:
        lines += [f"{i.tag}: {p}" for p in i.problems]
    if latest and latest not in {i.tag for i in infos}:
        lines.append(f"latest names {latest!r}, which is not there")
    return "\n".join(lines)


def _str(v: Any) -> str:
    return "?" if v is None else str(v)


def human_count(n: float, unit: str = "", base: int = 1000) -> str:
    """`n` with a K/M/G/T prefix and one decimal (1234567 -> "1.2M", with unit "B" -> "1.2MB");
    below `base`, the number itself."""
    for prefix in ("", "K", "M", "G", "T"):
        if abs(n) < base or prefix == "T":
            return f"{n:.1f}{prefix}{unit}" if prefix else f"{n}{unit}"
        n /= base
    return str(n)
