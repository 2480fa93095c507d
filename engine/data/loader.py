"""This rank's batches: several sources mixed by weight, an endless seeded sampler shared out
between the ranks whose only state is a global cursor (so a run resumes on any number of ranks
at the same place), the micro-batch loader, and the validation batches."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch

from common.errors import ZerotrainError


class MixedDataset(torch.utils.data.Dataset):
    """Several datasets mixed by weight (MiniMind-style pretrain/SFT iteration).

    Position i draws its source from a seeded categorical over `weights`, and takes that
    source's next sample (wrapping around), so any stretch of the sampler's stream mixes the
    sources in proportion. Each sample keeps its own labels (its own loss mask).
    """

    def __init__(self, datasets: list[torch.utils.data.Dataset], weights: list[float], seed: int,
                 length: int | None = None):
        if len(datasets) != len(weights) or not datasets:
            raise ValueError("one weight per dataset")
        if any(w <= 0 for w in weights):
            raise ZerotrainError(f"mixture weights must be positive, got {weights}")
        if any(len(d) == 0 for d in datasets):
            raise ZerotrainError("a mixed data source has no samples: use more data or a shorter --seq-len")
        self.datasets = datasets
        self.weights = [w / sum(weights) for w in weights]
        self.length = length or sum(len(d) for d in datasets)
        rng = np.random.default_rng([seed, 0x6D6978])
        self.source = rng.choice(len(datasets), size=self.length, p=self.weights)
        self.index = np.empty(self.length, dtype=np.int64)
        for k, d in enumerate(datasets):
            where = np.nonzero(self.source == k)[0]
            self.index[where] = np.arange(len(where)) % len(d)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.datasets[self.source[i]][int(self.index[i])]


class ShardedSampler:
    """An endless, seeded stream of sample indices shared out between ranks.

    The stream is epoch 0's permutation, then epoch 1's, and so on. Each micro-batch step
    consumes the next `world_size * micro_batch_size` positions of it: rank r takes the r-th
    block. The only state is the global `cursor` (positions consumed), which does not depend
    on the world size: a run can resume on another number of ranks at the same place.
    """

    def __init__(self, num_samples: int, rank: int, world_size: int, seed: int, shuffle: bool = True):
        if num_samples <= 0:
            raise ZerotrainError("the dataset has no samples: use more data or a shorter --seq-len")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.num_samples, self.rank, self.world_size = num_samples, rank, world_size
        self.seed, self.shuffle, self.cursor = seed, shuffle, 0
        self._epoch, self._perm = -1, None

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_samples)
        if not self.shuffle:
            return offset
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        return int(self._perm[offset])

    def next_indices(self, micro_batch_size: int) -> list[int]:
        """This rank's indices for the next micro-batch; advances the shared cursor."""
        start = self.cursor + self.rank * micro_batch_size
        self.cursor += self.world_size * micro_batch_size
        return [self._index(p) for p in range(start, start + micro_batch_size)]

    def take(self, count: int) -> list[int]:
        """The indices at the next `count` positions of the stream, the same on every rank (an
        RL step shares its prompts out itself: engine.objectives.grpo); advances the cursor."""
        start, self.cursor = self.cursor, self.cursor + count
        return [self._index(p) for p in range(start, start + count)]

    @property
    def epoch(self) -> float:
        return self.cursor / self.num_samples

    def state_dict(self) -> dict[str, int]:
        return {"cursor": self.cursor, "seed": self.seed, "num_samples": self.num_samples}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["num_samples"] != self.num_samples or state["seed"] != self.seed:
            raise ZerotrainError(
                f"the checkpoint's data position is for {state['num_samples']} samples with seed {state['seed']}, "
                f"this run has {self.num_samples} samples with seed {self.seed}: resume with the same data and "
                "seed, or start a new run from its weights (--init-from the checkpoint, another --output-dir)")
        self.cursor = int(state["cursor"])


@dataclass
class BatchLoader:
    """Micro-batches for one rank: dataset + sampler + collate, resumable through state_dict()."""

    dataset: torch.utils.data.Dataset
    sampler: ShardedSampler
    micro_batch_size: int
    collate: Callable[[list[dict[str, torch.Tensor]]], dict[str, torch.Tensor]]

    def next_batch(self) -> dict[str, torch.Tensor]:
        return self.collate([self.dataset[i] for i in self.sampler.next_indices(self.micro_batch_size)])

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)


def rank_rounds(n: int, rank: int, world_size: int, micro_batch_size: int) -> list[list[int]]:
    """Rank `rank`'s share of examples 0 .. n - 1 (r, r + world, ...) in micro-batches, as many
    rounds on every rank, since a collective pass (a ZeRO-3 forward) needs every rank in every
    round: a rank whose share runs out first gets empty rounds."""
    mine = list(range(rank, n, world_size))
    rounds = math.ceil(math.ceil(n / world_size) / micro_batch_size) if n else 0
    return [mine[r * micro_batch_size:(r + 1) * micro_batch_size] for r in range(rounds)]


def eval_batches(dataset: torch.utils.data.Dataset, rank: int, world_size: int, micro_batch_size: int,
                 samples: int, collate) -> Iterator[tuple[dict[str, torch.Tensor], bool]]:
    """Validation micro-batches for one rank, each with whether it counts: the split's first
    `samples` samples (all of them when it is smaller), unshuffled, shared out by rank_rounds. So
    every number of ranks scores the same samples, and a validation loss does not depend on it;
    an empty round repeats a sample that does not count, to keep the ranks in step."""
    for indices in rank_rounds(min(samples, len(dataset)), rank, world_size, micro_batch_size):
        yield collate([dataset[i] for i in (indices or [0])]), bool(indices)
