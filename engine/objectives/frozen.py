"""Models that only run forward beside the trained one: DPO's reference, a distillation teacher.

They never enter the optimizer or a checkpoint. Under ZeRO-3 each is partitioned over the ranks
by a DeepSpeed engine of its own with no optimizer (as TRL does for its reference), so a model
larger than one device fits; otherwise every rank holds it whole, in the run's precision.

What such a model computes once, before training (DPO's reference log-probs, a teacher's top-k),
is keyed by `frozen_key` and computed by `over_dataset`, the ranks sharing the examples.
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import TYPE_CHECKING, Any, Callable

import torch

from engine.checkpoint.run_dir import Resolved
from engine.config.precision import DTYPES
from engine.distributed import World

if TYPE_CHECKING:
    from engine.config.tree import Config
    from engine.training.parts import RunPlan

def frozen_model(cfg: Config, plan: RunPlan, device: torch.device, source: Resolved | None, *,
                 zero3: bool) -> torch.nn.Module:
    """`source`'s weights (None: the preset's random init with the run's seed, the trained
    model's own starting point), without gradients, in eval mode."""
    from engine.training.init_from import build_base_model

    # The seed of the trained model's init (engine.training.build.build_model), without moving the
    # run's own random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        model = build_base_model(cfg, source, plan.tokenizer, plan.context)
    model.requires_grad_(False)
    model.eval()
    if zero3:
        return partitioned(model, plan.ds_config)
    # Parameters only, as DeepSpeed casts the trained model: buffers such as rotary frequencies
    # stay fp32 (cast, they would shift every logit: DPO's first step would not be log 2).
    model.to(device)
    for param in model.parameters():
        param.data = param.data.to(DTYPES[plan.precision])
    return model


def partitioned(model: torch.nn.Module, ds_config: dict[str, Any]) -> torch.nn.Module:
    """`model`, frozen, partitioned over the ranks by a DeepSpeed ZeRO-3 engine of its own with no
    optimizer (the run's config otherwise): the module to call. Its every forward is collective,
    so every rank must run the same number of them."""
    import deepspeed

    ds = {k: v for k, v in copy.deepcopy(ds_config).items() if k not in ("optimizer", "scheduler")}
    zero = ds.setdefault("zero_optimization", {})
    zero["stage"] = 3
    zero.pop("offload_optimizer", None)
    frozen_engine, *_ = deepspeed.initialize(model=model, config=ds)
    frozen_engine.eval()
    return frozen_engine.module


def frozen_key(cfg: Config, plan: RunPlan, source: Resolved | None, **more: Any) -> str:
    """A short hash of what a frozen model's outputs depend on, to key what is computed from
    them once (DPO's reference log-probs, a teacher's top-k): `source`'s files (names, sizes,
    modification times) or the preset and seed of a random init, the precision, the attention
    backend, the vocabulary, and `more`."""
    if source is None:
        what: Any = {"preset": cfg.model.preset, "seed": cfg.train.seed, "context": plan.context}
    else:
        root = source.path
        files = sorted(p for p in ([root] if root.is_file() else root.rglob("*")) if p.is_file())
        what = {"path": str(root.resolve()), "tag": source.tag,
                "files": [(str(p.relative_to(root) if p != root else p.name), p.stat().st_size, p.stat().st_mtime_ns)
                          for p in files]}
    parts = {"reference": what, "precision": plan.precision, "attn": cfg.model.attn_implementation,
             "vocab": len(plan.tokenizer), **more}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def over_dataset(fn: Callable[[dict[str, torch.Tensor]], list[Any]], dataset, collate, world: World,
                 micro_batch_size: int, device: torch.device) -> list[Any]:
    """`fn`'s result for every example of `dataset`, in order (fn maps a collated batch to one
    result per example). Rank r takes examples r, r + world, ...; every rank runs the same number
    of batches (a ZeRO-3 model's forwards are collective), then the ranks share their results."""
    import torch.distributed as dist

    from engine.data.loader import rank_rounds

    n = len(dataset)
    results: list[tuple[int, Any]] = []
    for indices in rank_rounds(n, world.rank, world.size, micro_batch_size):
        batch = collate([dataset[i] for i in (indices or [0])])  # an idle rank still joins the forward
        out = fn({k: v.to(device) for k, v in batch.items()})
        results += zip(indices, out)
    gathered: list[Any] = [results]
    if world.size > 1:
        gathered = [None] * world.size
        dist.all_gather_object(gathered, results)
    ordered: list[Any] = [None] * n
    for part in gathered:
        for i, value in part:
            ordered[i] = value
    return ordered
