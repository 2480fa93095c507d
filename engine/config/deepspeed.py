"""DeepSpeed JSON configs: pick one, set its ZeRO stage, fill its "auto" fields from the run config.

The JSON files hold engine settings only (ZeRO stage, offload, buckets). Every value that
overlaps the training config is "auto" there and filled here, in one place. A literal value
that disagrees with the training config is an error before DeepSpeed starts, so the two can
never silently differ.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from common.errors import ZerotrainError
from engine.config.tree import Config

DS_CONFIG_DIR = Path(__file__).resolve().parents[2] / "ds_configs"
DEFAULT_STAGE = 2


def load_ds_config(cfg: Config) -> tuple[dict[str, Any], str]:
    """The chosen DeepSpeed config file (parsed) and its path."""
    if cfg.distributed.ds_config:
        path = Path(cfg.distributed.ds_config)
    else:
        path = DS_CONFIG_DIR / f"zero{cfg.distributed.zero_stage if cfg.distributed.zero_stage is not None else DEFAULT_STAGE}.json"
    if not path.is_file():
        raise ZerotrainError(f"DeepSpeed config {path} does not exist (--ds-config); shipped ones are in "
                             f"{DS_CONFIG_DIR}: " + ", ".join(sorted(p.name for p in DS_CONFIG_DIR.glob("*.json"))))
    try:
        return json.loads(path.read_text()), str(path)
    except json.JSONDecodeError as e:
        raise ZerotrainError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None


def fill_ds_config(raw: dict[str, Any], cfg: Config, *, world_size: int, precision: str, device_type: str,
                   source: str = "ds_config") -> dict[str, Any]:
    """Return a copy of `raw` with its stage set from --zero-stage and every "auto" filled.

    A literal that disagrees with the run config (say a train_batch_size that is not
    micro x accum x world size) raises ZerotrainError naming the key and both values.
    """
    ds = copy.deepcopy(raw)
    t, o = cfg.train, cfg.optim
    global_batch = cfg.check_world_size(world_size)

    def put(keys: str, value: Any, flag: str) -> None:
        *parents, last = keys.split(".")
        node = ds
        for key in parents:
            node = node.setdefault(key, {})
        current = node.get(last, "auto")
        if current == "auto":
            node[last] = value
        elif _differs(current, value):
            raise ZerotrainError(f"{source}: \"{keys}\" is {current!r} but the run config gives {value!r} ({flag}); "
                                 f"set it to \"auto\" in {source} or change {flag}")

    zero = ds.setdefault("zero_optimization", {})
    if cfg.distributed.zero_stage is not None:
        zero["stage"] = cfg.distributed.zero_stage
    zero.setdefault("stage", 0)
    if zero["stage"] not in (0, 1, 2, 3):
        raise ZerotrainError(f"{source}: zero_optimization.stage is {zero['stage']!r}; DeepSpeed has stages 0-3")

    put("train_micro_batch_size_per_gpu", t.micro_batch_size, "--micro-batch-size")
    put("gradient_accumulation_steps", t.grad_accum, "--grad-accum")
    put("train_batch_size", global_batch, "--micro-batch-size x --grad-accum x world size")
    put("gradient_clipping", o.grad_clip, "--grad-clip")
    put("bf16.enabled", precision == "bf16", "--precision")
    put("fp16.enabled", precision == "fp16", "--precision")
    if "optimizer" in ds:
        params = ds["optimizer"].setdefault("params", {})
        put("optimizer.params.lr", o.lr, "--lr")
        put("optimizer.params.betas", [o.adam_beta1, o.adam_beta2], "--adam-beta1/--adam-beta2")
        put("optimizer.params.eps", o.adam_eps, "--adam-eps")
        put("optimizer.params.weight_decay", o.weight_decay, "--weight-decay")
        offloaded = zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)
        if not offloaded:
            # torch's AdamW (fused on GPU) instead of DeepSpeed's FusedAdam, which needs a CUDA
            # toolchain to JIT-build; with offload DeepSpeed uses its CPU Adam.
            params.setdefault("torch_adam", True)
            if device_type == "cuda":
                params.setdefault("fused", True)
    for name in t.report_to:
        key = {"csv": "csv_monitor"}.get(name, name)
        ds.setdefault(key, {"enabled": True})
        if name != "wandb":
            ds[key].setdefault("output_path", str(Path(t.output_dir) / "monitor"))
            ds[key].setdefault("job_name", "zerotrain")
    if precision == "bf16":
        # Let DeepSpeed skip a step whose gradients are not finite, as it does for fp16 and fp32.
        ds["bf16"].setdefault("check_grad_overflow", True)
    for key, value in _find_auto(ds):
        raise ZerotrainError(f"{source}: \"{key}\" is \"auto\" but zerotrain has nothing to fill it with; "
                             "give it a value")
    return ds


def _differs(current: Any, value: Any) -> bool:
    if isinstance(value, bool) or isinstance(current, bool):
        return bool(current) != bool(value)
    if isinstance(value, (int, float)) and isinstance(current, (int, float)):
        return abs(float(current) - float(value)) > 1e-12 * max(1.0, abs(float(value)))
    if isinstance(value, list) and isinstance(current, (list, tuple)):
        return len(current) != len(value) or any(_differs(a, b) for a, b in zip(current, value))
    return current != value


def _find_auto(node: Any, prefix: str = ""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _find_auto(value, f"{prefix}{key}.")
    elif node == "auto":
        yield prefix.rstrip("."), node


def zero_stage(ds: dict[str, Any]) -> int:
    """The ZeRO stage a filled DeepSpeed config runs (0 when it names none)."""
    return int(ds.get("zero_optimization", {}).get("stage", 0))
