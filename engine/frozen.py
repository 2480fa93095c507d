"""Models that only run forward beside the trained one: DPO's reference, a distillation teacher.

They never enter the optimizer or a checkpoint. Under ZeRO-3 each is partitioned over the ranks
by a DeepSpeed engine of its own with no optimizer (as TRL does for its reference), so a model
larger than one device fits; otherwise every rank holds it whole, in the run's precision.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch

from engine.run_dir import Resolved

if TYPE_CHECKING:
    from engine.builders import RunPlan
    from engine.config import Config

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def frozen_model(cfg: Config, plan: RunPlan, device: torch.device, source: Resolved | None, *,
                 zero3: bool) -> torch.nn.Module:
    """`source`'s weights (None: the preset's random init with the run's seed, the trained
    model's own starting point), without gradients, in eval mode."""
    import deepspeed

    from engine.modeling import build_base_model

    # The seed of the trained model's init (engine.builders.build_model), without moving the
    # run's own random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        model = build_base_model(cfg, source, len(plan.tokenizer), plan.context)
    model.requires_grad_(False)
    model.eval()
    if zero3:
        ds = {k: v for k, v in copy.deepcopy(plan.ds_config).items() if k not in ("optimizer", "scheduler")}
        zero = ds.setdefault("zero_optimization", {})
        zero["stage"] = 3
        zero.pop("offload_optimizer", None)
        frozen_engine, *_ = deepspeed.initialize(model=model, config=ds)
        frozen_engine.eval()
        return frozen_engine.module
    # Parameters only, as DeepSpeed casts the trained model: buffers such as rotary frequencies
    # stay fp32 (cast, they would shift every logit: DPO's first step would not be log 2).
    model.to(device)
    for param in model.parameters():
        param.data = param.data.to(DTYPES[plan.precision])
    return model
