"""The training loop, shared by every stage: get batches -> objective loss -> engine.backward ->
engine.step, then log / evaluate / save, and final/ at the end. The parts come built
(engine.training.build); what is optimised comes from the stage's objective (engine.objectives).

One optimizer step takes grad_accum micro-batches per rank; DeepSpeed steps the optimizer on
the accumulation boundary. The step's loss is the mean over every unit (trained token, or pair)
of every micro-batch on every rank, not a mean of per-micro-batch means: the units are counted
first, and each micro-batch's summed loss is divided by that global count, times grad_accum x
world size to undo DeepSpeed's own averaging.
"""

from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from common.errors import ZerotrainError
from engine.checkpoint import resume
from engine.checkpoint.export import export_final, write_adapter
from engine.checkpoint.run_dir import ADAPTER
from engine.checkpoint.save import save as save_checkpoint
from engine.checkpoint.sidecar import Sidecar
from engine.config.deepspeed import zero_stage
from engine.config.tree import Config
from engine.data.loader import eval_batches
from engine.distributed import World, all_reduce_sums, log_on_rank0
from engine.objectives.base import Batch, Objective, Stage, summed_over
from engine.training.parts import Data, Model, RunPlan
from engine.training.watchdog import Watchdog
from model.flops import device_peak_flops, mfu


@dataclass
class TrainState:
    """The trainer's own counters; saved in every checkpoint's client state."""

    step: int = 0
    tokens_seen: int = 0
    nonfinite_steps: int = 0
    consecutive_nonfinite: int = 0

    def state_dict(self) -> dict[str, int]:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.__dict__.update({k: int(v) for k, v in state.items() if k in self.__dict__})


@dataclass
class Hooks:
    """Seams for tests to inject faults into a real run (tests/fault_launcher.py); production
    code sets none."""

    loss: Callable[[int, torch.Tensor], torch.Tensor] | None = None
    """(step being taken, micro-batch loss) -> the loss to backpropagate instead."""
    after_checkpoint_shards: Callable[[Path], None] | None = None
    """Runs on every rank once DeepSpeed has written a tag's files, before zerotrain's own."""
    evaluate: Callable[[int], None] | None = None
    """(step) runs on every rank as the evaluation after that step starts, in eval mode."""


@dataclass
class Trainer:
    """One run's loop over its built parts (engine.training.main.setup builds them)."""

    cfg: Config
    stage: Stage
    plan: RunPlan
    world: World
    data: Data
    model: Model
    engine: Any
    objective: Objective
    hooks: Hooks = field(default_factory=Hooks)
    state: TrainState = field(default_factory=TrainState)
    resumed_from: Path | None = None
    stop_signal: int | None = None  # set by this rank's signal handler
    stopping: int | None = None  # the signal every rank agreed to stop on (see train_step)
    watchdog: Watchdog = field(default_factory=Watchdog.off)  # started by fit
    peak_flops: float | None = field(default_factory=device_peak_flops)

    @property
    def zero3(self) -> bool:
        return zero_stage(self.plan.ds_config) == 3

    # ----------------------------------------------------------------------- logging

    def log(self, message: str) -> None:
        log_on_rank0(self.world.rank, message)

    def write_metrics(self, record: dict[str, Any]) -> None:
        if self.world.rank != 0:
            return
        with open(self.plan.run.metrics, "a") as f:
            f.write(json.dumps(record) + "\n")
        monitor = getattr(self.engine, "monitor", None)
        if monitor is not None and getattr(monitor, "enabled", False):
            monitor.write_events([(f"zerotrain/{k}", v, record["step"]) for k, v in record.items()
                                  if k != "step" and isinstance(v, (int, float))])

    # ----------------------------------------------------------------------- one step

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over grad_accum micro-batches; the step's loss and metrics (means per
        unit over every rank), tokens processed and learning rate."""
        engine, accum, ranks = self.engine, self.cfg.train.grad_accum, self.world.size
        lr = engine.get_lr()[0]  # the rate this step uses (the scheduler moves on inside engine.step)
        mark = self.watchdog.mark  # where a stall report says this rank was
        mark(f"step {self.state.step + 1}: loading its {accum} micro-batch(es)")
        # An objective that trains on one step's rollouts again in later steps draws nothing then.
        draws = self.objective.draws_data(self.state.step + 1)
        batches = [self.data.loader.next_batch() for _ in range(accum)] if draws else []
        mark(f"step {self.state.step + 1}: preparing its batches")
        batches = self.objective.step_batches(engine, batches, self.state.step + 1)
        mark(f"step {self.state.step + 1}: all-reduce of the trained units")
        units = all_reduce_sums({"units": sum(self.objective.units(b) for b in batches)}, engine.device)["units"]
        # DeepSpeed divides by grad_accum and averages over ranks; this undoes both, so the
        # step's loss is (sum of every unit's loss) / (every unit counted).
        scale = accum * ranks / max(1.0, units)
        # The loss and metrics add up where they are computed; nothing waits for a micro-batch's
        # results before the step's reduction (on a GPU a float() here would stall the queue).
        sums: dict[str, float | torch.Tensor] = {"loss": 0.0, "nonfinite": 0.0, "tokens": 0.0}
        for i, batch in enumerate(batches):
            what = f"step {self.state.step + 1}, micro-batch {i + 1} of {accum}"
            mark(f"{what}: forward")
            sums["tokens"] += batch_tokens(batch)  # before the batch moves to the device
            batch = {k: v.to(engine.device) for k, v in batch.items()}
            out = self.objective.loss(engine, batch)
            loss = out.loss * scale
            if self.hooks.loss is not None:
                loss = self.hooks.loss(self.state.step + 1, loss)
            # A non-finite loss is backpropagated all the same: its gradients are non-finite on
            # every rank after the reduction, and the optimizer skips the whole step.
            finite = torch.isfinite(loss.detach())
            mark(f"{what}: backward")
            engine.backward(loss)
            mark(f"{what}: optimizer step" if i == accum - 1 else f"{what}: engine step")
            engine.step()
            sums["nonfinite"] = sums["nonfinite"] + ~finite
            for name, value in {"loss": out.loss, **out.metrics}.items():
                sums[name] = sums.get(name, 0.0) + torch.where(finite, value.detach().double(), 0.0)
        sums["signalled"] = float(self.stop_signal is not None)
        sums["signal"] = float(self.stop_signal or 0)
        mark(f"step {self.state.step + 1}: all-reduce of its sums")
        totals = all_reduce_sums(sums, engine.device)
        step_nonfinite = totals["nonfinite"] > 0
        self.state.step += 1
        self.state.tokens_seen += int(totals["tokens"])
        self.state.nonfinite_steps += int(step_nonfinite)
        self.state.consecutive_nonfinite = self.state.consecutive_nonfinite + 1 if step_nonfinite else 0
        # Stop on what the ranks agreed, never on this rank's own flag: a signal that lands after
        # this reduction is seen by this rank alone, which would save while the others train on.
        # It is counted at the next step's reduction instead.
        if totals["signalled"] and self.stopping is None:
            self.stopping = self.stop_signal or round(totals["signal"] / totals["signalled"])
        means = {k: None if step_nonfinite else v / max(1.0, units) for k, v in totals.items()
                 if k not in ("nonfinite", "tokens", "signalled", "signal")}
        return {**means, **self.objective.step_metrics(), "tokens": int(totals["tokens"]), "lr": lr}

    # ----------------------------------------------------------------------- evaluation

    def evaluate(self) -> dict[str, float] | None:
        """Validation loss and metrics (val_ prefixed): sums over this rank's share of the
        validation batches, reduced over ranks, divided by the units counted."""
        rounds = list(eval_batches(self.data.val, self.world.rank, self.world.size, self.cfg.train.micro_batch_size,
                                   self.cfg.train.eval_samples, self.data.collate)) if self.data.val else []
        batches, counts = [batch for batch, _ in rounds], [counted for _, counted in rounds]
        if not batches:
            return None
        self.engine.eval()
        if self.hooks.evaluate is not None:
            self.hooks.evaluate(self.state.step)
        sums = summed_over(self.objective, self.engine, batches, self.engine.device, counts)
        self.engine.train()
        totals = all_reduce_sums(sums, self.engine.device)
        units = totals.pop("units")
        if units == 0:
            return None
        result = {f"val_{k}": v / units for k, v in totals.items()}
        if self.objective.unit == "token":
            result["val_ppl"] = math.exp(min(result["val_loss"], 50.0))
        return result

    # ----------------------------------------------------------------------- saving

    def save(self) -> Path:
        """A checkpoint of this step (a collective): DeepSpeed's shards, the trainer's state and
        data position, the sidecar, and for LoRA runs the PEFT adapter beside them."""
        client = {"zerotrain": {"state": self.state.state_dict(), "loader": self.data.loader.state_dict(),
                                "config": self.cfg.to_dict()}}
        sidecar = Sidecar(step=self.state.step, tokens_seen=self.state.tokens_seen, kind=self.stage.name,
                          zero_stage=zero_stage(self.plan.ds_config), world_size=self.world.size,
                          precision=self.plan.precision, config=self.cfg.to_dict(),
                          model_config=self.model.config.to_dict(), exported=self.stage.exported, lora=self.model.lora,
                          data=self.data.identity)
        tag = save_checkpoint(self.engine, self.plan.run.checkpoints, client, sidecar, self.cfg.checkpoint.keep_last,
                              estimated_bytes=self.model.checkpoint_bytes,
                              after_shards=self.hooks.after_checkpoint_shards,
                              verify=self.cfg.checkpoint.verify_checkpoints,
                              objective_state=self.objective.state_dict())
        if self.model.lora:
            write_adapter(self.engine, tag / ADAPTER if self.world.rank == 0 else None, zero3=self.zero3,
                          precision=self.plan.precision, exported=self.stage.exported)
        self.log(f"checkpoint {tag}")
        return tag

    def restore(self, tag: Path) -> None:
        """Model, optimizer, scheduler, this rank's RNG, the counters, the data position and what
        the objective carried."""
        client, objective_state = resume.load(self.engine, tag)
        self.state.load_state_dict(client["state"])
        self.objective.load_state_dict(objective_state)
        self.data.loader.load_state_dict(client["loader"])
        self.resumed_from = tag
        saved = self.plan.saved_world_size
        self.log(f"resumed from {tag} at step {self.state.step}"
                 + (f" (saved on {saved} ranks, now {self.world.size})" if self.plan.reshape else ""))

    # ----------------------------------------------------------------------- the loop

    def fit(self) -> int:
        """Train to max_steps, or until the ranks agree on a stop signal (a checkpoint is saved
        then); 0 when done. The hang watchdog (engine.training.watchdog) watches every step, evaluation
        and save."""
        self.watchdog = Watchdog(self.plan.run.hang, self.world.rank, self.world.size, self.cfg.train.hang_timeout)
        with self.watchdog.start(self.state.step):
            return self._fit()

    def _fit(self) -> int:
        from tqdm import tqdm

        cfg, watchdog = self.cfg, self.watchdog
        bar = tqdm(total=cfg.train.max_steps, initial=self.state.step, disable=self.world.rank != 0,
                   desc=self.stage.name, unit="step", dynamic_ncols=True)
        window_start, window_tokens = time.perf_counter(), 0
        last_saved = self.state.step if self.resumed_from is not None else -1
        while self.state.step < cfg.train.max_steps:
            out = self.train_step()
            window_tokens += out["tokens"]
            step = self.state.step
            watchdog.beat(step)
            if self.state.consecutive_nonfinite >= cfg.train.max_consecutive_nonfinite:
                raise ZerotrainError(
                    f"{self.state.consecutive_nonfinite} steps in a row had a NaN/inf loss (up to step {step}); "
                    f"stopping. The last checkpoint in {self.plan.run.checkpoints} is usable: lower --lr, check the "
                    "data, or use bf16/fp32")
            bar.update(1)
            if step % cfg.train.log_interval == 0 or step == cfg.train.max_steps:
                elapsed = time.perf_counter() - window_start
                record = self._metrics(out, window_tokens / max(elapsed, 1e-9))
                shown = {"loss": "nan" if record["loss"] is None else f"{record['loss']:.4f}"}
                shown.update({label: f"{record[metric]:.2f}" for label, metric in self.stage.headline
                              if record.get(metric) is not None})
                bar.set_postfix(**shown, lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_sec']:.0f}")
                self.write_metrics(record)
                window_start, window_tokens = time.perf_counter(), 0
            if (cfg.train.eval_interval and step % cfg.train.eval_interval == 0) or step == cfg.train.max_steps:
                with watchdog.activity("eval"):
                    result = self.evaluate()
                if result is not None:
                    self.write_metrics({"step": step, **result})
            if step % cfg.checkpoint.save_interval == 0 or step == cfg.train.max_steps:
                with watchdog.activity("save"):
                    self.save()
                last_saved = step
            if self.stopping is not None:
                if last_saved != step:
                    with watchdog.activity("save"):
                        self.save()
                bar.close()
                self.log(f"stopped by signal {signal.Signals(self.stopping).name} at step {step}; "
                         f"resume with --resume auto")
                return 0
        bar.close()
        with watchdog.activity("save"):
            final = export_final(self.engine, self.plan.run, self.plan.tokenizer, self.model.config,
                                 lora=bool(self.model.lora), merge_lora=cfg.lora.merge_lora_at_end, zero3=self.zero3,
                                 precision=self.plan.precision, exported=self.stage.exported)
        self.log(f"final model in {final}")
        return 0

    def _metrics(self, out: dict[str, Any], tokens_per_sec: float) -> dict[str, Any]:
        engine = self.engine
        record: dict[str, Any] = {
            "step": self.state.step, "loss": out["loss"], "lr": out["lr"],
            "grad_norm": _number(engine.get_global_grad_norm()), "tokens_per_sec": tokens_per_sec,
            "tokens_seen": self.state.tokens_seen, "epoch": self.data.loader.sampler.epoch,
            "skipped_steps": int(engine.skipped_steps), "nonfinite_steps": self.state.nonfinite_steps,
        }
        record.update({k: v for k, v in out.items() if k not in ("loss", "lr", "tokens")})
        value = mfu(tokens_per_sec, self.model.flops_per_token, self.world.size, self.peak_flops)
        if value is not None:
            record["mfu"] = value
        if self.plan.precision == "fp16":
            scale = getattr(engine.optimizer, "cur_scale", None) or getattr(engine.optimizer, "loss_scale", None)
            record["loss_scale"] = _number(scale)
        return record


def batch_tokens(batch: Batch) -> int:
    """Tokens a micro-batch feeds the model (padding excluded where an attention mask says so)."""
    return int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()


def _number(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value.item() if isinstance(value, torch.Tensor) else value)
    return value if math.isfinite(value) else None
