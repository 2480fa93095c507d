"""The training loop: setup -> fit (train, evaluate, log, save) -> export, on DeepSpeed.

Pretraining and SFT share everything here and differ only in their data. One optimizer step:
fetch grad_accum micro-batches -> forward -> engine.backward -> engine.step, per micro-batch;
DeepSpeed steps the optimizer on the accumulation boundary.

The loss of a step is the mean over every trained token of every micro-batch on every rank
(not a mean of per-micro-batch means): each micro-batch's summed token loss is divided by the
step's global token count, times grad_accum x world size to undo DeepSpeed's own averaging.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine import checkpoint
from engine.config import Config, parse_config
from engine.data import (IGNORE_INDEX, BatchLoader, DataSource, MixedDataset, PretrainDataset, SFTDataset,
                         ShardedSampler, collate_pad, collate_packed, collate_stack, eval_batches, parse_data_sources,
                         prepare_cached, read_meta)
from engine.ds_config import fill_ds_config, load_ds_config, resolve_precision, zero_stage
from engine.distributed import init_distributed, on_rank0, world
from common.errors import ZerotrainError
from engine.run_dir import zerotrain_tags
from engine.sidecar import Sidecar
from engine.modeling import (build_base_model, lora_record, merged_model, resolve_init_from, save_adapter,
                             tokenizer_path, wrap_lora)

KINDS = ("pretrain", "sft")


# --------------------------------------------------------------------------- setup helpers

def lr_lambda(cfg: Config):
    """Linear warmup to lr, then cosine decay to lr x min_lr_ratio at max_steps (a multiplier of lr)."""
    warmup, total, floor = cfg.optim.warmup_steps, cfg.train.max_steps, cfg.optim.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only: never on norms, biases or embeddings (tied lm_head included)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or id(p) in embeddings else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def prepare_sources(cfg: Config, sources: list[DataSource], tokenizer, local_rank: int) -> list[Path]:
    """A prepared directory per source: raw files are prepared once (local rank 0 of each node,
    the others wait) into a cache keyed by their contents and the tokenizer."""

    def prepared(source: DataSource, show_progress: bool) -> Path:
        if Path(source.paths[0]).is_dir():
            return Path(source.paths[0])
        return prepare_cached(source.kind, source.paths, tokenizer, cfg.data.cache_dir, seq_len=cfg.data.seq_len,
                              val_fraction=cfg.data.val_fraction, skip_bad_lines=cfg.data.skip_bad_lines,
                              show_progress=show_progress)

    directories = on_rank0(lambda: [prepared(s, show_progress=True) for s in sources], local_rank, "data preparation")
    if local_rank != 0:
        directories = [prepared(s, show_progress=False) for s in sources]
    return directories


def load_data(cfg: Config, sources: list[DataSource], tokenizer, local_rank: int, log=print):
    """(train dataset, val dataset or None, collate) for the run's data sources."""
    from model.tokenizer import tokenizer_fingerprint

    trains, vals = [], []
    for source, directory in zip(sources, prepare_sources(cfg, sources, tokenizer, local_rank)):
        meta = read_meta(directory)
        if meta["tokenizer_fingerprint"] != tokenizer_fingerprint(tokenizer):
            raise ZerotrainError(f"{directory} was prepared with another tokenizer than this run's; "
                                 "prepare it again with this tokenizer")
        if meta["kind"] != source.kind:
            raise ZerotrainError(f"{directory} holds {meta['kind']} data, used here as {source.kind} data")
        dataset = PretrainDataset if source.kind == "pretrain" else SFTDataset
        trains.append(dataset(directory, "train", cfg.data.seq_len))
        vals.append(dataset(directory, "val", cfg.data.seq_len))
        skipped = {k: v for k, v in meta["stats"].items() if v}
        log(f"{source.kind} data {directory}: {len(trains[-1])} training and {len(vals[-1])} validation samples, "
            f"{meta['splits']['train']['tokens']:,} tokens" + (f"; while preparing: {skipped}" if skipped else "")
            + (f"; weight {source.weight}" if len(sources) > 1 else ""))
    if len(sources) == 1:
        train, val = trains[0], vals[0]
    else:
        weights = [s.weight for s in sources]
        train = MixedDataset(trains, weights, cfg.train.seed)
        kept = [(v, w) for v, w in zip(vals, weights) if len(v)]
        val = MixedDataset(*map(list, zip(*kept)), cfg.train.seed) if kept else None
    if all(s.kind == "pretrain" for s in sources):
        return train, val, collate_stack
    pad_id = tokenizer.pad_token_id
    collate = ((lambda ex: collate_packed(ex, cfg.data.seq_len, pad_id)) if cfg.data.pack
               else (lambda ex: collate_pad(ex, pad_id)))
    return train, val, collate


def _save_tokenizer(tokenizer, run_dir: Path) -> None:
    import shutil
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix=".tokenizer.tmp-", dir=run_dir))
    tokenizer.save_pretrained(str(tmp))
    if (run_dir / "tokenizer").exists():
        shutil.rmtree(run_dir / "tokenizer")
    os.replace(tmp, run_dir / "tokenizer")


def check_output_dir(cfg: Config, run_dir: Path) -> None:
    """Refuse a run directory that holds another run's checkpoints (or any, with --resume never)."""
    import yaml

    ckpts = zerotrain_tags(run_dir / "checkpoints")
    if not ckpts:
        return
    if cfg.checkpoint.resume == "never":
        raise ZerotrainError(f"{run_dir} already holds checkpoints ({ckpts[-1]}); pass --resume auto to continue "
                             "that run, or choose an empty --output-dir")
    saved = run_dir / "config.yaml"
    if saved.is_file():
        old = Config.from_dict(yaml.safe_load(saved.read_text()), source=str(saved))
        for section, key in (("model", "preset"), ("model", "tokenizer"), ("data", "seq_len")):
            a, b = getattr(getattr(old, section), key), getattr(getattr(cfg, section), key)
            if a != b:
                raise ZerotrainError(f"{run_dir} holds checkpoints of another run ({section}.{key} = {a!r}, this run "
                                     f"has {b!r}); choose another --output-dir")


# --------------------------------------------------------------------------- the trainer

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
class Trainer:
    cfg: Config
    kind: str
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    state: TrainState = field(default_factory=TrainState)
    stop_signal: int | None = None
    # Fault injection for tests: steps (1-based) whose loss is made NaN.
    fault_nan_steps: set[int] = field(default_factory=lambda: {
        int(s) for s in os.environ.get("ZEROTRAIN_FAULT_NAN_STEPS", "").split(",") if s.strip()})

    def setup(self) -> None:
        """Check everything that can be checked, then build tokenizer, data, model and engine."""
        import deepspeed
        from model.presets import preset_config
        from model.tokenizer import load_tokenizer

        cfg = self.cfg
        if self.kind not in KINDS:
            raise ZerotrainError(f"unknown run kind {self.kind!r}")
        if not cfg.train.output_dir:
            raise ZerotrainError("--output-dir is required (the run directory)")
        self.run_dir = Path(cfg.train.output_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        self.precision = resolve_precision(cfg.train.precision, device_type)
        raw_ds, ds_source = load_ds_config(cfg)
        self.ds_config = fill_ds_config(raw_ds, cfg, world_size=self.world_size, precision=self.precision,
                                        device_type=device_type, source=ds_source)
        self.sources = parse_data_sources(cfg.data.data, self.kind)
        check_output_dir(cfg, self.run_dir)
        self.resume_tag = checkpoint.find_resume_tag(self.ckpt_dir, cfg.checkpoint.resume)
        self.reshape = (self.resume_tag is not None
                        and checkpoint.saved_world_size(self.resume_tag) != self.world_size)
        if self.reshape:  # saved on another number of ranks: load DeepSpeed's universal format
            self.ds_config.setdefault("checkpoint", {})["load_universal"] = True
        init_source = resolve_init_from(cfg.model.init_from)
        self.tokenizer = load_tokenizer(tokenizer_path(cfg, init_source))
        context = preset_config(cfg.model.preset).max_position_embeddings  # also checks the preset name

        init_distributed(self.local_rank)
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(self.run_dir / "config.yaml")
            _save_tokenizer(self.tokenizer, self.run_dir)
        if self.reshape:
            on_rank0(lambda: checkpoint.make_universal(self.resume_tag), self.rank,
                     "converting the checkpoint to universal format")
            self.resume_tag = checkpoint.universal_dir(self.resume_tag)
        self.train_data, self.val_data, self.collate = load_data(cfg, self.sources, self.tokenizer, self.local_rank,
                                                                 log=self.log)
        self.loader = BatchLoader(self.train_data, ShardedSampler(len(self.train_data), self.rank, self.world_size,
                                                                  cfg.train.seed), cfg.train.micro_batch_size, self.collate)

        torch.manual_seed(cfg.train.seed)
        # The preset's context length stands unless the run asks for more.
        model = build_base_model(cfg, init_source, len(self.tokenizer), max(context, cfg.data.seq_len))
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            setattr(model.config, name, getattr(self.tokenizer, name))
            setattr(model.generation_config, name, getattr(self.tokenizer, name))
        if cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if cfg.lora.enabled:
                model.enable_input_require_grads()
        self.model_config = model.config
        from model.flops import device_peak_flops, flops_per_token

        self.flops_per_token = flops_per_token(model.config, cfg.data.seq_len)
        self.peak_flops = device_peak_flops()
        if cfg.lora.enabled:
            base_path = str(init_source.path.resolve()) if init_source.kind == "hf" else None
            model = wrap_lora(cfg, model, base_path)
        self.lora = lora_record(model)
        # First checkpoint's size: module weights, plus fp32 masters and two Adam moments of what trains.
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.checkpoint_estimate = 4 * total + 12 * trainable
        self.engine, *_ = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, cfg.optim.weight_decay), config=self.ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)))
        self._guard_plain_optimizer()
        if self.world_size == 1 and zero_stage(self.ds_config) == 0:
            # Nothing to average over one rank: skip DeepSpeed's flatten/all-reduce/unflatten copy.
            self.engine.enable_backward_allreduce = False
        if self.resume_tag is not None:
            client = checkpoint.load(self.engine, self.resume_tag)
            self.state.load_state_dict(client["state"])
            self.loader.load_state_dict(client["loader"])
            self.log(f"resumed from {self.resume_tag} at step {self.state.step}"
                     + (f" (saved on {checkpoint.saved_world_size(self.resume_tag)} ranks, now {self.world_size})"
                        if self.reshape else ""))

    def _guard_plain_optimizer(self) -> None:
        """ZeRO-0 in fp32 hands the bare torch optimizer to DeepSpeed, which then has no check for
        non-finite gradients; give it the same `overflow` skip DeepSpeed's own optimizers have."""
        opt = self.engine.optimizer
        if zero_stage(self.ds_config) != 0 or self.precision != "fp32" or hasattr(opt, "overflow"):
            return
        step = opt.step

        def guarded_step(*args, **kwargs):
            grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
            # One fused reduction (a per-tensor isfinite costs ~10x more); an infinite norm of
            # finite values also counts as an overflow, as in DeepSpeed's ZeRO optimizers.
            opt.overflow = bool(grads) and not bool(torch.stack(torch._foreach_norm(grads)).sum().isfinite())
            if opt.overflow:
                opt.zero_grad(set_to_none=True)
                return None
            return step(*args, **kwargs)

        opt.overflow = False
        opt.step = guarded_step

    # ----------------------------------------------------------------------- logging

    def log(self, message: str) -> None:
        if self.rank == 0:
            print(f"[zerotrain] {message}", flush=True)

    def write_metrics(self, record: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        monitor = getattr(self.engine, "monitor", None)
        if monitor is not None and getattr(monitor, "enabled", False):
            monitor.write_events([(f"zerotrain/{k}", v, record["step"]) for k, v in record.items()
                                  if k != "step" and isinstance(v, (int, float))])

    # ----------------------------------------------------------------------- one step

    def _micro_batches(self) -> tuple[list[dict[str, torch.Tensor]], float]:
        """This step's micro-batches and the token count that normalises their summed losses."""
        batches = [self.loader.next_batch() for _ in range(self.cfg.train.grad_accum)]
        if self.collate is collate_stack:  # pretraining windows: every position but the last is a target
            count = sum(b["labels"][:, 1:].numel() for b in batches) * self.world_size
        else:
            import torch.distributed as dist

            local = torch.tensor([sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)],
                                 dtype=torch.float64, device=self.engine.device)
            dist.all_reduce(local)
            count = max(1.0, float(local.item()))
        return batches, count

    def train_step(self) -> dict[str, Any]:
        import torch.distributed as dist

        engine, cfg = self.engine, self.cfg
        lr = engine.get_lr()[0]  # the rate this step uses (the scheduler moves on inside engine.step)
        batches, count = self._micro_batches()
        # DeepSpeed divides by grad_accum and averages over ranks; this undoes both, so the
        # step's loss is (sum of every token loss) / (every token counted).
        items = torch.tensor(count / (cfg.train.grad_accum * self.world_size), device=engine.device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=engine.device)
        nonfinite = 0
        tokens = 0
        for batch in batches:
            batch = {k: v.to(engine.device) for k, v in batch.items()}
            tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
            loss = engine(**batch, use_cache=False, num_items_in_batch=items).loss
            if self.state.step + 1 in self.fault_nan_steps:
                loss = loss * float("nan")
            # A non-finite loss is backpropagated all the same: its gradients are non-finite on
            # every rank after the reduction, and the optimizer skips the whole step.
            nonfinite += int(not torch.isfinite(loss.detach()))
            engine.backward(loss)
            engine.step()
            if torch.isfinite(loss.detach()):
                loss_sum += loss.detach().double()
        signalled = self.stop_signal is not None
        flags = torch.tensor([float(loss_sum), float(nonfinite), float(tokens), float(signalled),
                              float(self.stop_signal or 0)], dtype=torch.float64, device=engine.device)
        dist.all_reduce(flags)
        self.state.step += 1
        self.state.tokens_seen += int(flags[2])
        step_nonfinite = flags[1] > 0
        self.state.nonfinite_steps += int(step_nonfinite)
        self.state.consecutive_nonfinite = self.state.consecutive_nonfinite + 1 if step_nonfinite else 0
        if flags[3] > 0 and self.stop_signal is None:  # another rank was signalled: stop with it
            self.stop_signal = round(float(flags[4] / flags[3]))
        return {"loss": None if step_nonfinite else float(flags[0]) / (cfg.train.grad_accum * self.world_size),
                "tokens": int(flags[2]), "lr": lr}

    # ----------------------------------------------------------------------- evaluation

    @torch.no_grad()
    def evaluate(self) -> dict[str, float] | None:
        import torch.distributed as dist

        batches = list(eval_batches(self.val_data, self.rank, self.world_size, self.cfg.train.micro_batch_size,
                                    self.cfg.train.eval_batches, self.collate))
        if not batches:
            return None
        self.engine.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=self.engine.device)
        for batch in batches:
            batch = {k: v.to(self.engine.device) for k, v in batch.items()}
            n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            loss = self.engine(**batch, use_cache=False).loss
            if n:
                totals += torch.tensor([float(loss) * n, n], dtype=torch.float64, device=totals.device)
        self.engine.train()
        dist.all_reduce(totals)
        if totals[1] == 0:
            return None
        val_loss = float(totals[0] / totals[1])
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}

    # ----------------------------------------------------------------------- saving

    def save(self) -> Path:
        client = {"zerotrain": {"state": self.state.state_dict(), "loader": self.loader.state_dict(),
                                "config": self.cfg.to_dict()}}
        sidecar = Sidecar(step=self.state.step, tokens_seen=self.state.tokens_seen, kind=self.kind,
                          zero_stage=zero_stage(self.ds_config), world_size=self.world_size, precision=self.precision,
                          config=self.cfg.to_dict(), model_config=self.model_config.to_dict(), lora=self.lora)
        tag = checkpoint.save(self.engine, self.ckpt_dir, client, sidecar, self.cfg.checkpoint.keep_last,
                              estimated_bytes=self.checkpoint_estimate)
        if self.lora:
            self.save_adapter(tag / "adapter" if self.rank == 0 else None)
        self.log(f"checkpoint {tag}")
        return tag

    def full_state_dict(self, only_trainable: bool = False) -> dict[str, torch.Tensor] | None:
        """The model's weights on rank 0 (fp32 master weights where mixed precision keeps them);
        a collective, which gathers ZeRO-3's partitions. `only_trainable` takes just what the
        optimizer updates (LoRA matrices and modules_to_save) and no buffers."""
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        module = self.engine.module
        params = {n: p for n, p in module.named_parameters() if p.requires_grad or not only_trainable}
        out = {}
        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None,
                                               enabled=zero_stage(self.ds_config) == 3):
            for name, p in params.items():
                full = safe_get_full_fp32_param(p) if self.precision != "fp32" and p.requires_grad else None
                out[name] = (full if full is not None else p.data).detach().float().cpu().clone()
            if not only_trainable:
                for name, b in module.named_buffers():
                    out[name] = b.detach().cpu().clone()
        return out if self.rank == 0 else None

    def save_adapter(self, out_dir: Path | None) -> None:
        """The PEFT adapter (gathered, complete under every ZeRO stage) into `out_dir` on rank 0
        (None elsewhere); a collective."""
        state = self.full_state_dict(only_trainable=True)
        if self.rank == 0:
            save_adapter(self.engine.module, state, out_dir)

    def export_final(self) -> None:
        """final/: the model in HF format with the tokenizer; LoRA runs write final/adapter/ and,
        with --merge-lora-at-end, the merged model. A collective; rank 0 writes."""
        import shutil
        import tempfile

        import torch.distributed as dist

        write_model = not self.lora or self.cfg.lora.merge_lora_at_end
        state = self.full_state_dict() if write_model else None
        tmp = Path(tempfile.mkdtemp(prefix=".final.tmp-", dir=self.run_dir)) if self.rank == 0 else None
        if self.lora:
            self.save_adapter(tmp / "adapter" if tmp else None)
        if self.rank == 0:
            if write_model:
                model = merged_model(self.engine.module, state) if self.lora else self._plain_model(state)
                model.save_pretrained(str(tmp))
            self.tokenizer.save_pretrained(str(tmp))
            final = self.run_dir / "final"
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            self.log(f"final model in {final}")
        dist.barrier()

    def _plain_model(self, state: dict[str, torch.Tensor]) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(self.model_config)
        model.load_state_dict(state, strict=False, assign=True)
        model.tie_weights()
        return model

    # ----------------------------------------------------------------------- the loop

    def fit(self) -> int:
        cfg = self.cfg
        from tqdm import tqdm

        bar = tqdm(total=cfg.train.max_steps, initial=self.state.step, disable=self.rank != 0, desc=self.kind,
                   unit="step", dynamic_ncols=True)
        window_start, window_tokens = time.perf_counter(), 0
        last_saved = self.state.step if self.resume_tag is not None else -1
        while self.state.step < cfg.train.max_steps:
            out = self.train_step()
            window_tokens += out["tokens"]
            step = self.state.step
            if self.state.consecutive_nonfinite >= cfg.train.max_consecutive_nonfinite:
                raise ZerotrainError(
                    f"{self.state.consecutive_nonfinite} steps in a row had a NaN/inf loss (up to step {step}); "
                    f"stopping. The last checkpoint in {self.ckpt_dir} is usable: lower --lr, check the data, "
                    "or use bf16/fp32")
            bar.update(1)
            if step % cfg.train.log_interval == 0 or step == cfg.train.max_steps:
                elapsed = time.perf_counter() - window_start
                record = self._metrics(out, window_tokens / max(elapsed, 1e-9))
                bar.set_postfix(loss="nan" if record["loss"] is None else f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                tok_s=f"{record['tokens_per_sec']:.0f}")
                self.write_metrics(record)
                window_start, window_tokens = time.perf_counter(), 0
            if (cfg.train.eval_interval and step % cfg.train.eval_interval == 0) or step == cfg.train.max_steps:
                result = self.evaluate()
                if result is not None:
                    self.write_metrics({"step": step, **result})
            if step % cfg.checkpoint.save_interval == 0 or step == cfg.train.max_steps:
                self.save()
                last_saved = step
            if self.stop_signal is not None:
                if last_saved != step:
                    self.save()
                bar.close()
                self.log(f"stopped by signal {signal.Signals(self.stop_signal).name} at step {step}; "
                         f"resume with --resume auto")
                return 0
        bar.close()
        self.export_final()
        return 0

    def _metrics(self, out: dict[str, Any], tokens_per_sec: float) -> dict[str, Any]:
        from model.flops import mfu

        engine = self.engine
        record: dict[str, Any] = {
            "step": self.state.step, "loss": out["loss"], "lr": out["lr"],
            "grad_norm": _number(engine.get_global_grad_norm()), "tokens_per_sec": tokens_per_sec,
            "tokens_seen": self.state.tokens_seen, "epoch": self.loader.sampler.epoch,
            "skipped_steps": int(engine.skipped_steps), "nonfinite_steps": self.state.nonfinite_steps,
        }
        value = mfu(tokens_per_sec, self.flops_per_token, self.world_size, self.peak_flops)
        if value is not None:
            record["mfu"] = value
        if self.precision == "fp16":
            scale = getattr(engine.optimizer, "cur_scale", None) or getattr(engine.optimizer, "loss_scale", None)
            record["loss_scale"] = _number(scale)
        return record


def _number(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value.item() if isinstance(value, torch.Tensor) else value)
    return value if math.isfinite(value) else None


def main(argv: list[str] | None = None, kind: str = "pretrain") -> int:
    """Entry point of launcher/pretrain.py and launcher/sft.py."""
    rank, local_rank, world_size = world()
    try:
        cfg = parse_config(argv, description=f"zerotrain {kind}")
        trainer = Trainer(cfg, kind, rank=rank, local_rank=local_rank, world_size=world_size)
        # From here on SIGTERM/SIGUSR1 (SLURM preemption) mean: finish the step, save, exit 0.
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, lambda signum, frame: setattr(trainer, "stop_signal", signum))
        # DeepSpeed still calls collectives torch has renamed: one FutureWarning a call, every step.
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.distributed\.")
        trainer.setup()
        return trainer.fit()
    except ZerotrainError as e:
        print(f"zerotrain {kind}: error{f' (rank {rank})' if world_size > 1 else ''}: {e}", file=sys.stderr, flush=True)
        return 2
