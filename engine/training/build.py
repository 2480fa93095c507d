"""Building a run's parts once its plan is checked (engine.training.plan), in the order setup
(engine.training.main) calls them, each returning a typed part (engine.training.parts):

    build_data    prepared datasets and this rank's resumable batch loader            -> Data
    build_model   the model to train (from the preset or --init-from, LoRA-wrapped)   -> Model
    build_engine  deepspeed.initialize with the optimizer and schedule                -> engine

and what a resumed run needs before its checkpoint is loaded: the same data (check_same_data),
a checkpoint of its world size (resume_point).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import torch

from common.errors import ZerotrainError
from common.publish import publishing
from engine.checkpoint.resume import make_universal
from engine.checkpoint.run_dir import universal_dir
from engine.checkpoint.sidecar import Sidecar
from engine.config.deepspeed import zero_stage
from engine.config.sections import ModelConfig, field_default
from engine.config.tree import Config
from engine.data.format import read_meta
from engine.data.kinds import collate_for, data_kind
from engine.data.loader import BatchLoader, MixedDataset, ShardedSampler
from engine.data.prepare import prepare_cached
from engine.data.sources import DataSource
from engine.distributed import World, on_rank0
from engine.training.init_from import build_base_model
from engine.training.lora import adapter_config, wrap_lora
from engine.training.parts import Data, Model, RunPlan

Log = Callable[[str], None]


def prepare_sources(cfg: Config, sources: list[DataSource], tokenizer, local_rank: int) -> list[Path]:
    """A prepared directory per source: raw files are prepared once (local rank 0 of each node,
    the others wait) into a cache keyed by their contents and the tokenizer."""

    def prepared(source: DataSource, show_progress: bool) -> Path:
        if Path(source.paths[0]).is_dir():
            return Path(source.paths[0])
        return prepare_cached(source.kind, source.paths, tokenizer, cfg.data.cache_dir, seq_len=cfg.data.seq_len,
                              val_fraction=cfg.data.val_fraction, skip_bad_lines=cfg.data.skip_bad_lines,
                              show_progress=show_progress, num_proc=cfg.data.num_proc,
                              columns=cfg.data.columns if data_kind(source.kind).mapped else "")

    directories = on_rank0(lambda: [prepared(s, show_progress=True) for s in sources], local_rank, "data preparation")
    if local_rank != 0:
        directories = [prepared(s, show_progress=False) for s in sources]
    return directories


def build_data(cfg: Config, plan: RunPlan, world: World, log: Log) -> Data:
    """Prepared datasets (mixed by weight when there are several sources), the collate for their
    kind, and this rank's loader."""
    from model.tokenizer import DEFAULT_TOKENIZER, tokenizer_fingerprint

    tokenizer, sources = plan.tokenizer, plan.sources
    shipped = Path(tokenizer.name_or_path) == DEFAULT_TOKENIZER
    log(f"tokenizer {tokenizer.name_or_path}: {len(tokenizer)} tokens"
        + (" (zerotrain's default, for runs from scratch; --tokenizer to use another)" if shipped else ""))
    trains, vals, identity = [], [], []
    directories = prepare_sources(cfg, sources, tokenizer, world.local_rank)
    for source, directory in zip(sources, directories):
        meta = read_meta(directory)
        identity.append({"kind": source.kind, "key": meta["key"], "weight": source.weight,
                         "files": [s["path"] for s in meta["sources"]]})
        if meta["tokenizer_fingerprint"] != tokenizer_fingerprint(tokenizer):
            raise ZerotrainError(f"{directory} was prepared with another tokenizer than this run's; "
                                 "prepare it again with this tokenizer")
        if meta["kind"] != source.kind:
            raise ZerotrainError(f"{directory} holds {meta['kind']} data, used here as {source.kind} data")
        kind = data_kind(source.kind)
        eos = tokenizer.eos_token_id if cfg.data.document_mask else None
        trains.append(kind.dataset(directory, "train", cfg.data.seq_len, document_eos=eos))
        vals.append(kind.dataset(directory, "val", cfg.data.seq_len, document_eos=eos))
        skipped = {k: v for k, v in meta["stats"].items() if v}
        log(f"{source.kind} data {directory}: {len(trains[-1])} training and {len(vals[-1])} validation {kind.item}, "
            f"{meta['splits']['train']['tokens']:,} tokens" + (f"; while preparing: {skipped}" if skipped else "")
            + (f"; weight {source.weight}" if len(sources) > 1 else ""))
    if len(sources) == 1:
        train, val = trains[0], vals[0]
    else:
        weights = [s.weight for s in sources]
        train = MixedDataset(trains, weights, cfg.train.seed)
        kept = [(v, w) for v, w in zip(vals, weights) if len(v)]
        val = MixedDataset(*map(list, zip(*kept)), cfg.train.seed) if kept else None
    collate = collate_for([s.kind for s in sources], cfg.data.seq_len, tokenizer.pad_token_id, cfg.data.pack)
    sampler = ShardedSampler(len(train), world.rank, world.size, cfg.train.seed)
    return Data(train, val, collate, BatchLoader(train, sampler, cfg.train.micro_batch_size, collate), directories,
                identity)


def check_same_data(data: Data, resume_tag: Path) -> None:
    """Refuse to resume on other data than the checkpoint was trained on: the data position it
    saved (a sample cursor) means nothing in another dataset, even one of the same size. Compared
    by preparation key, so the same files prepared anew (or moved) still match; a checkpoint saved
    before the sidecar recorded its data is not checked."""
    sidecar = Sidecar.read(resume_tag)
    saved = sidecar.data if sidecar is not None else None
    if saved is None:
        return
    key = lambda sources: [(s["kind"], s["key"], s["weight"]) for s in sources]  # noqa: E731
    if key(saved) == key(data.identity):
        return
    show = lambda sources: "; ".join(f"{s['kind']} {' '.join(s['files'])} (key {s['key']}"  # noqa: E731
                                     + (f", weight {s['weight']}" if s["weight"] is not None else "") + ")"
                                     for s in sources)
    raise ZerotrainError(f"{resume_tag} was trained on other data than this run's --data: it saved its place in "
                         f"{show(saved)}; this run reads {show(data.identity)}. Resume with the data it was "
                         f"trained on, or start a new run from its weights: --init-from {resume_tag} "
                         "--output-dir NEW_DIR")


def build_model(cfg: Config, plan: RunPlan, head: Callable[[torch.nn.Module, Config], torch.nn.Module] | None = None,
                exported: str = "") -> Model:
    """The trained module: the causal LM of --init-from (or the preset), through the stage's `head`
    when it has one (engine.objectives.base.Stage.model), with LoRA when asked on its `exported`
    submodule (Stage.exported; the whole module when ""), the rest trained in full."""
    from model.flops import flops_per_token

    tokenizer, source = plan.tokenizer, plan.init_source
    torch.manual_seed(cfg.train.seed)
    model = build_base_model(cfg, source, tokenizer, plan.context)
    if head is not None:
        model = head(model, cfg)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.config, name, getattr(tokenizer, name))
        if getattr(model, "generation_config", None) is not None:  # none on models that do not generate
            setattr(model.generation_config, name, getattr(tokenizer, name))
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.lora.enabled:
            model.get_submodule(exported).enable_input_require_grads()
    model_config = model.config
    flops = flops_per_token(model.config, cfg.data.seq_len)
    if cfg.lora.enabled:
        base_path = str(source.path.resolve()) if source is not None and source.kind == "hf" else None
        model = wrap_lora(cfg, model, base_path, exported)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return Model(model, model_config, adapter_config(model.get_submodule(exported)), flops, 4 * total + 12 * trainable)


def new_model_line(cfg: Config, model: Model) -> str:
    """What a run that starts from no weights (no --init-from, no checkpoint) trains, said once:
    the preset and its size, and loudly when it is the default, the test-sized debug preset."""
    params = sum(p.numel() for p in model.module.parameters())
    line = f"no --init-from: a new model from preset {cfg.model.preset!r}, {params:,} parameters"
    if cfg.model.preset == field_default(ModelConfig, "preset"):
        from model.presets import preset_names

        others = "|".join(name for name in preset_names() if name != cfg.model.preset)
        line += (f" (the {model.config.num_hidden_layers}-layer preset the tests use, not a useful model: pass "
                 f"--preset {others} for a real one)")
    return line


def lr_lambda(cfg: Config) -> Callable[[int], float]:
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


def build_engine(cfg: Config, plan: RunPlan, model: Model):
    """deepspeed.initialize with AdamW over the parameter groups and the warmup-cosine schedule."""
    import deepspeed

    engine, *_ = deepspeed.initialize(
        model=model.module, model_parameters=param_groups(model.module, cfg.optim.weight_decay),
        config=plan.ds_config, lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)))
    stage = zero_stage(plan.ds_config)
    if stage == 0 and plan.precision == "fp32":
        guard_plain_optimizer(engine.optimizer)
    if stage == 0 and plan.world_size == 1:
        # Nothing to average over one rank: skip DeepSpeed's flatten/all-reduce/unflatten copy.
        engine.enable_backward_allreduce = False
    return engine


def guard_plain_optimizer(opt: torch.optim.Optimizer) -> None:
    """ZeRO-0 in fp32 hands the bare torch optimizer to DeepSpeed, which then has no check for
    non-finite gradients; give it the same `overflow` skip DeepSpeed's own optimizers have."""
    if hasattr(opt, "overflow"):
        return
    step = opt.step

    def guarded_step(*args, **kwargs):
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        # One fused reduction (a per-tensor isfinite costs ~10x more); an infinite norm of
        # finite values also counts as an overflow, as in DeepSpeed's ZeRO optimizers.
        opt.overflow = bool(grads) and not bool(torch.nn.utils.get_total_norm(grads).isfinite())
        if opt.overflow:
            opt.zero_grad(set_to_none=True)
            return None
        return step(*args, **kwargs)

    opt.overflow = False
    opt.step = guarded_step


def resume_point(plan: RunPlan, world: World) -> Path | None:
    """The tag to resume from, converted to the universal format when the number of ranks changed."""
    if plan.resume_tag is None or not plan.reshape:
        return plan.resume_tag
    on_rank0(lambda: make_universal(plan.resume_tag), world.rank,
             "converting the checkpoint to universal format")
    return universal_dir(plan.resume_tag)


def write_run_files(plan: RunPlan, cfg: Config, world: World) -> None:
    """config.yaml and tokenizer/ (rank 0), once every check has passed and the run is restored:
    a start that is refused leaves the run directory as it was."""
    if world.rank == 0:
        plan.run.root.mkdir(parents=True, exist_ok=True)
        cfg.save(plan.run.config)
        with publishing(plan.run.tokenizer, directory=True) as tmp:
            plan.tokenizer.save_pretrained(str(tmp))
