"""The offline teacher: its top-k log-probs of every trained token, stored beside the prepared data.

For each trained token (the trained-token rule of engine.objectives.tokens) the teacher's
temperature-softened distribution is kept as its k most likely tokens plus one "tail" bucket
holding the rest of the probability mass, so it stays a distribution over k + 1 outcomes. The
student's distribution is bucketed the same way (its log-probs at the teacher's k ids, and the
rest), and the divergence of engine.objectives.distill is taken between the two bucketed
distributions. Merging outcomes never increases a KL or JS divergence, so the top-k loss is a
lower bound of the full one that grows towards it with k (equal once k covers the vocabulary).

Layout: `<prepared>/teacher/<key>/` with meta.json and, per split, `<split>.ids.npy` [tokens, k]
int32, `<split>.logps.npy` [tokens, k + 1] float32 (the tail last) and `<split>.offsets.npy`
[examples + 1] (example i's tokens are rows offsets[i]:offsets[i + 1]). The key covers the
teacher's files, precision, attention backend, vocabulary, k and the temperature, so a changed
teacher is never read from a stale store. The directory appears whole (common.publish).

`zerotrain teacher-logits` (engine.apps.teacher_logits) fills it ahead of training (under torchrun
too, the ranks sharing the examples); a distill run with --teacher-top-k fills it at start when it
is missing, then frees the teacher before the first step.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from common.errors import ZerotrainError
from common.publish import publishing
from engine.data.collate import collate_pad
from engine.distributed import World
from engine.objectives.base import Batch, model_inputs
from engine.objectives.frozen import frozen_key, frozen_model, over_dataset
from engine.objectives.tokens import trained_tokens

if TYPE_CHECKING:
    from engine.checkpoint.run_dir import Resolved
    from engine.config.tree import Config
    from engine.training.parts import Data, RunPlan

FLOOR = 1e-30
"""Smallest tail probability kept: an empty tail (k = vocabulary) would be log 0."""


def with_tail(logps: torch.Tensor) -> torch.Tensor:
    """[..., k] log-probs of k tokens -> [..., k + 1] with the log-prob of all the others last."""
    rest = (-torch.expm1(torch.logsumexp(logps, dim=-1, keepdim=True))).clamp(min=FLOOR)
    return torch.cat([logps, rest.log()], dim=-1)


def top_k(logps: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Full log-probs [..., vocab] -> (ids [..., k], bucketed log-probs [..., k + 1])."""
    values, ids = logps.topk(min(k, logps.shape[-1]), dim=-1)
    return ids, with_tail(values)


def bucketed(logps: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Full log-probs [..., vocab] bucketed on another distribution's top-k `ids`."""
    return with_tail(logps.gather(-1, ids.long()))


def store_dir(prepared: Path, cfg: Config, plan: RunPlan, source: Resolved, top_k: int, temperature: float) -> Path:
    """Where the store of a teacher's top-k log-probs at a temperature lies, beside prepared data:
    keyed by what the log-probs depend on (engine.objectives.frozen.frozen_key)."""
    return prepared / "teacher" / frozen_key(cfg, plan, source, top_k=top_k, temperature=temperature)


# --------------------------------------------------------------------------- computing

def _per_example(teacher: Callable[..., Any], k: int, temperature: float, vocab: int) -> Callable[[Batch], list]:
    @torch.no_grad()
    def run(batch: Batch) -> list[tuple[np.ndarray, np.ndarray]]:
        logits = teacher(**model_inputs(batch), use_cache=False).logits[..., :vocab]
        mask = trained_tokens(batch["labels"])
        ids, logps = top_k(F.log_softmax(logits[mask].float() / temperature, dim=-1), k)
        counts = mask.sum(1).tolist()
        return [(i.cpu().numpy().astype(np.int32), p.cpu().numpy()) for i, p in
                zip(ids.split(counts), logps.split(counts))]

    return run


def compute(cfg: Config, plan: RunPlan, device: torch.device, data: Data, prepared: Path, world: World,
            source: Resolved, zero3: bool, log: Callable[[str], None], *, top_k: int, temperature: float) -> Path:
    """The store of the teacher `source`'s `top_k` log-probs at `temperature` for `data` (one
    prepared source): read if there, else computed now (every rank its share of the examples) and
    written. Returns its directory."""
    target = store_dir(prepared, cfg, plan, source, top_k, temperature)
    if (target / "meta.json").is_file():
        log(f"teacher top-{top_k} log-probs from {target}")
        return target
    k = top_k
    teacher = frozen_model(cfg, plan, device, source, zero3=zero3)
    run = _per_example(teacher, k, temperature, len(plan.tokenizer))
    pad = lambda examples: collate_pad(examples, plan.tokenizer.pad_token_id)  # noqa: E731  one example a row
    results = {split: over_dataset(run, dataset, pad, world, cfg.train.micro_batch_size, device)
               for split, dataset in (("train", data.train), ("val", data.val)) if dataset is not None}
    del teacher, run
    gc.collect()
    if world.local_rank == 0:  # every node, in case the prepared data is not shared
        with publishing(target, directory=True) as tmp:
            meta: dict[str, Any] = {"teacher": str(source.path.resolve()), "top_k": k, "temperature": temperature,
                                    "precision": plan.precision, "splits": {}}
            for split, examples in results.items():
                counts = [len(ids) for ids, _ in examples]
                np.save(tmp / f"{split}.offsets.npy", np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))
                width = min(k, len(plan.tokenizer))
                np.save(tmp / f"{split}.ids.npy", np.concatenate([ids for ids, _ in examples]) if examples
                        else np.zeros((0, width), np.int32))
                np.save(tmp / f"{split}.logps.npy", np.concatenate([p for _, p in examples]) if examples
                        else np.zeros((0, width + 1), np.float32))
                meta["splits"][split] = {"examples": len(examples), "tokens": int(sum(counts))}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    if world.size > 1:
        torch.distributed.barrier()
    log(f"teacher top-{k} log-probs of {sum(len(r) for r in results.values())} examples computed once, stored in "
        f"{target}")
    return target


# --------------------------------------------------------------------------- reading

class WithTeacher(torch.utils.data.Dataset):
    """A dataset whose examples also carry the stored teacher log-probs of their trained tokens
    (`teacher_ids`, `teacher_logps`; with_teacher_collate concatenates them)."""

    def __init__(self, dataset: torch.utils.data.Dataset, store: Path, split: str):
        self.dataset = dataset
        try:
            self.offsets = np.load(store / f"{split}.offsets.npy")
            self.ids = np.load(store / f"{split}.ids.npy", mmap_mode="r")
            self.logps = np.load(store / f"{split}.logps.npy", mmap_mode="r")
        except (OSError, ValueError) as e:
            raise ZerotrainError(f"{store}: unreadable teacher log-probs ({e}); delete the directory to compute "
                                 "them again") from e
        if len(self.offsets) != len(dataset) + 1 or self.offsets[-1] != len(self.ids) or len(self.ids) != len(self.logps):
            raise ZerotrainError(f"{store}: {split} holds teacher log-probs for {len(self.offsets) - 1} examples, the "
                                 f"prepared data has {len(dataset)}; delete the directory to compute them again")

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return {**self.dataset[i], "teacher_ids": torch.from_numpy(np.array(self.ids[a:b])),
                "teacher_logps": torch.from_numpy(np.array(self.logps[a:b]))}


def with_teacher_collate(collate: Callable[[list], Batch]) -> Callable[[list], Batch]:
    """`collate` for WithTeacher examples: the stored rows of every example, in batch order, which
    is the row-major order of the batch's trained tokens for every collate of engine.data."""
    def inner(examples: list[dict[str, torch.Tensor]]) -> Batch:
        batch = collate([{k: v for k, v in e.items() if not k.startswith("teacher_")} for e in examples])
        for key in ("teacher_ids", "teacher_logps"):
            batch[key] = torch.cat([e[key] for e in examples])
        return batch

    return inner


def attach(data: Data, store: Path) -> None:
    """Give `data`'s examples their stored teacher log-probs."""
    data.train = WithTeacher(data.train, store, "train")
    if data.val is not None:
        data.val = WithTeacher(data.val, store, "val")
    data.collate = with_teacher_collate(data.collate)
    data.loader.dataset, data.loader.collate = data.train, data.collate
