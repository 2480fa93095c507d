"""The frozen reference model of DPO and IPO, live or computed once.

Which model: --ref-from if given, else the --init-from model (the policy's starting point; the
same seeded random init when there is none). How it runs, holding the least memory:

- LoRA, no --ref-from: the policy itself with its adapter disabled (peft's disable_adapter), so
  there is no second copy at all.
- Full fine-tuning: a frozen copy (engine.objectives.frozen), partitioned like the policy under ZeRO-3, whole
  on every rank in the run's precision under ZeRO 0-2.

With --precompute-ref the reference runs once over the prepared pairs before training; the
summed response log-probs are cached beside the prepared data under a key of the reference's
files and the run's precision and context, and carried in each batch as `ref_logps`. The model
is freed before the first step, so training holds one model.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from common.publish import publishing
from engine.checkpoint.run_dir import Resolved
from engine.config.deepspeed import zero_stage
from engine.distributed import World
from engine.objectives.base import Batch
from engine.objectives.frozen import frozen_key, frozen_model, over_dataset

if TYPE_CHECKING:
    from engine.config.tree import Config
    from engine.training.parts import Data, RunPlan

ReferenceLogps = Callable[[Batch], torch.Tensor]
"""Batch -> the reference's summed response log-probs per sequence ([2 x pairs], fp32)."""
SequenceLogps = Callable[[Any, Batch, int], tuple[torch.Tensor, torch.Tensor]]
"""The objective's own (model, batch, --loss-chunk-size) -> (summed log-probs, trained tokens) per
sequence, which the reference runs exactly as the policy does."""


def _source(ref_from: str, plan: RunPlan) -> Resolved | None:
    """--ref-from, else the policy's own starting point."""
    from engine.training.init_from import resolve_init_from

    return resolve_init_from(ref_from) if ref_from else plan.init_source


def reference_logps(cfg: Config, plan: RunPlan, engine: Any, ref_from: str, logps: SequenceLogps) -> ReferenceLogps:
    """The reference as a function of a batch, built as the module docstring says (through the
    LM head --loss-chunk-size tokens at a time, as the policy)."""
    chunk = cfg.train.loss_chunk_size
    if cfg.lora.enabled and not ref_from:
        policy = engine.module

        @torch.no_grad()
        def adapter_disabled(batch: Batch) -> torch.Tensor:
            # eval(): no dropout in the reference, as for a separate frozen copy.
            was_training = policy.training
            policy.eval()
            try:
                with policy.disable_adapter():
                    return logps(policy, batch, chunk)[0]
            finally:
                policy.train(was_training)

        return adapter_disabled

    module = frozen_model(cfg, plan, engine.device, _source(ref_from, plan), zero3=zero_stage(plan.ds_config) == 3)

    @torch.no_grad()
    def frozen(batch: Batch) -> torch.Tensor:
        return logps(module, batch, chunk)[0]

    return frozen


# --------------------------------------------------------------------------- precomputed

def reference_key(cfg: Config, plan: RunPlan, ref_from: str) -> str:
    """What the cached log-probs depend on besides the prepared pairs: which reference (its
    files, or the preset and seed of a random init), the precision and the attention backend."""
    return frozen_key(cfg, plan, _source(ref_from, plan))


def _all_logps(reference: ReferenceLogps, dataset, collate, world: World, micro_batch_size: int,
               device: torch.device) -> np.ndarray:
    """[pairs, 2] (chosen, rejected) for every pair of `dataset`."""
    def per_pair(batch: Batch) -> list[tuple[float, float]]:
        chosen, rejected = reference(batch).float().cpu().chunk(2)
        return list(zip(chosen.tolist(), rejected.tolist()))

    values = over_dataset(per_pair, dataset, collate, world, micro_batch_size, device)
    return np.array(values, dtype=np.float32).reshape(len(values), 2)


class WithReference(torch.utils.data.Dataset):
    """A pair dataset whose items also carry the reference's log-probs (collate_pref turns them
    into the batch's `ref_logps`)."""

    def __init__(self, dataset, logps: np.ndarray):
        if len(logps) != len(dataset):
            raise ValueError(f"{len(logps)} reference log-probs for {len(dataset)} pairs")
        self.dataset, self.logps = dataset, torch.from_numpy(logps)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {**self.dataset[i], "ref_chosen_logps": self.logps[i, 0], "ref_rejected_logps": self.logps[i, 1]}


def precompute(cfg: Config, plan: RunPlan, engine: Any, data: Data, prepared: Path, world: World,
               log: Callable[[str], None], ref_from: str, logps: SequenceLogps) -> None:
    """Give `data`'s pairs their reference log-probs: from the cache beside the prepared
    directory, else computed now (every rank its share) and cached, then the model is freed."""
    cache = prepared / "reference" / f"{reference_key(cfg, plan, ref_from)}.npz"
    splits = {"train": data.train, "val": data.val}
    if cache.is_file():
        with np.load(cache) as saved:
            logps = {split: saved[split] for split in splits}
        log(f"reference log-probs from {cache}")
    else:
        reference = reference_logps(cfg, plan, engine, ref_from, logps)
        logps = {split: _all_logps(reference, dataset, data.collate, world, cfg.train.micro_batch_size,
                                   engine.device) if dataset is not None else np.zeros((0, 2), np.float32)
                 for split, dataset in splits.items()}
        del reference
        gc.collect()
        if world.local_rank == 0:  # every node, in case the cache is not shared
            with publishing(cache) as tmp:
                with open(tmp, "wb") as f:
                    np.savez(f, **logps)
        log(f"reference log-probs of {len(data.train)} training pairs computed once, cached in {cache}")
    data.train = WithReference(data.train, logps["train"])
    if data.val is not None:
        data.val = WithReference(data.val, logps["val"])
    data.loader.dataset = data.train
