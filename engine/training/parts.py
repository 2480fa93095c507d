"""The parts a run is built from, each made by one step of engine.training.setup and handed to
the loop (engine.training.trainer) and the objectives: what the run will do (RunPlan), its data
(Data) and its model (Model). Plain records: no building happens here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from engine.checkpoint.run_dir import Resolved, RunDir
from engine.data.loader import BatchLoader
from engine.data.sources import DataSource


@dataclass
class RunPlan:
    """What a run will do, decided and checked before any expensive work (engine.training.plan)."""

    run: RunDir
    device_type: str
    precision: str
    ds_config: dict[str, Any]
    sources: list[DataSource]
    init_source: Resolved | None
    """--init-from, resolved (None: a fresh model from the preset)."""
    tokenizer: Any
    context: int
    """The model's context length: the preset's, unless the run asks for more."""
    world_size: int
    resume_tag: Path | None
    saved_world_size: int | None
    """Ranks that saved `resume_tag` (None when starting fresh)."""

    @property
    def reshape(self) -> bool:
        """Resuming on another number of ranks than saved: through DeepSpeed's universal format."""
        return self.saved_world_size is not None and self.saved_world_size != self.world_size


@dataclass
class Data:
    """The run's datasets and this rank's batches (engine.training.build.build_data)."""

    train: torch.utils.data.Dataset
    val: torch.utils.data.Dataset | None
    collate: Callable[[list[dict[str, torch.Tensor]]], dict[str, torch.Tensor]]
    loader: BatchLoader
    directories: list[Path]
    """The prepared directory of each source (raw files are prepared into the cache)."""
    identity: list[dict[str, Any]]
    """What the sampler's positions index, saved in every checkpoint's sidecar: each source's kind,
    preparation key (a hash of its files' contents, the tokenizer and the preparation settings)
    and mixing weight."""


@dataclass
class Model:
    """The model to train, before DeepSpeed wraps it (engine.training.build.build_model)."""

    module: torch.nn.Module
    config: Any
    """Its transformers config (of the base model, for LoRA runs)."""
    lora: dict[str, Any] | None
    """The LoRA settings recorded in checkpoints; None for full training."""
    flops_per_token: float
    checkpoint_bytes: int
    """Estimated size of one checkpoint: module weights, plus fp32 masters and two Adam moments of
    what trains."""
