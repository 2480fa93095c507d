"""Building a run, step by step, each step returning a typed part (in the spirit of torchtitan):

    plan_run      every check that needs no process group: output dir, precision, DeepSpeed
                  config, data sources, resume point, --init-from, tokenizer, preset  -> RunPlan
    build_data    prepared datasets and this rank's resumable batch loader            -> Data
    build_model   the model to train (from the preset or --init-from, LoRA-wrapped)   -> Model
    build_engine  deepspeed.initialize with the optimizer and schedule                -> engine
    restore       model, optimizer, scheduler, data position and counters from a checkpoint

`setup` runs them in order and hands the parts to engine.trainer.Trainer.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch

from common.errors import ZerotrainError
from common.publish import publishing
from engine import checkpoint
from engine.config import SECTIONS, STAGE_SECTIONS, Config
from engine.data.collate import collate_packed, collate_pad, collate_stack
from engine.data.columns import parse_columns
from engine.data.conversations import SFTDataset
from engine.data.format import read_meta
from engine.data.kinds import KINDS, detect_kind
from engine.data.loader import BatchLoader, MixedDataset, ShardedSampler
from engine.data.prepare import prepare_cached
from engine.data.sources import DataSource, parse_data_sources
from engine.data.text import PretrainDataset
from engine.distributed import World, init_distributed, on_rank0
from engine.ds_config import fill_ds_config, load_ds_config, resolve_precision, zero_stage
from engine.modeling import build_base_model, lora_record, resolve_init_from, tokenizer_path, wrap_lora
from engine.objectives import Stage
from engine.data.pairs import PrefDataset, collate_pref, collate_pref_packed
from engine.run_dir import Resolved, RunDir, universal_dir, zerotrain_tags
from engine.sidecar import Sidecar

Log = Callable[[str], None]


# --------------------------------------------------------------------------- the plan

@dataclass
class RunPlan:
    """What a run will do, decided and checked before any expensive work."""

    stage: Stage
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


def check_output_dir(cfg: Config, run_dir: Path) -> None:
    """Refuse a run directory that holds another run's checkpoints (or any, with --resume never)."""
    import yaml

    run = RunDir(run_dir)
    ckpts = zerotrain_tags(run.checkpoints)
    if not ckpts:
        return
    if cfg.checkpoint.resume == "never":
        raise ZerotrainError(f"{run.root} already holds checkpoints ({ckpts[-1]}); pass --resume auto to continue "
                             "that run, or choose an empty --output-dir")
    if run.config.is_file():
        old = Config.from_dict(yaml.safe_load(run.config.read_text()), source=str(run.config))
        for section, key in (("model", "preset"), ("model", "tokenizer"), ("data", "seq_len")):
            a, b = getattr(getattr(old, section), key), getattr(getattr(cfg, section), key)
            if a != b:
                raise ZerotrainError(f"{run.root} holds checkpoints of another run ({section}.{key} = {a!r}, this run "
                                     f"has {b!r}); choose another --output-dir")


def check_stage_sections(cfg: Config, stage: Stage) -> None:
    """Refuse flags of another stage's config section (say --beta given to launcher/sft.py)
    instead of ignoring them."""
    for name in STAGE_SECTIONS:
        if name in stage.config_sections:
            continue
        given, default = getattr(cfg, name), SECTIONS[name]()
        changed = [f.name for f in dataclasses.fields(given) if getattr(given, f.name) != getattr(default, f.name)]
        if changed:
            flags = ", ".join("--" + n.replace("_", "-") for n in changed)
            raise ZerotrainError(f"{flags}: not a flag of {stage.name} ({name} section); drop it, or run the "
                                 "launcher it belongs to")


def check_document_mask(cfg: Config, sources: list[DataSource]) -> None:
    """--document-mask needs pretraining windows in batches without an attention mask: transformers
    keeps documents apart through restarting position_ids only when no mask is passed."""
    if not cfg.data.document_mask:
        return
    kinds = {s.kind for s in sources}
    if "pretrain" not in kinds:
        raise ZerotrainError(f"--document-mask splits pretraining windows at their end-of-document tokens; this run "
                             f"has {'/'.join(sorted(kinds))} data only (one conversation or pair per example already): "
                             "drop --document-mask")
    if kinds != {"pretrain"} and not cfg.data.pack:
        raise ZerotrainError("--document-mask with pretraining and SFT data mixed needs --pack: a padded batch's "
                             "attention mask would let a window's documents see each other")


def _default_kind(entries: list[str], columns: str) -> str:
    """What plain --data entries hold: a prepared directory says so in its meta.json, raw files
    by their first record (or by the --columns mapping)."""
    plain = [e for e in entries if e.split(":")[0] not in KINDS]
    if len(plain) == 1 and Path(plain[0]).is_dir():
        return read_meta(plain[0])["kind"]
    return detect_kind(plain, columns) if plain else "pretrain"


def plan_run(cfg: Config, stage: Stage, world_size: int) -> RunPlan:
    """Check everything that can be checked on one process, fail early with a clear message."""
    from model.presets import preset_config
    from model.tokenizer import load_tokenizer

    if not cfg.train.output_dir:
        raise ZerotrainError("--output-dir is required (the run directory)")
    run = RunDir(Path(cfg.train.output_dir))
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    precision = resolve_precision(cfg.train.precision, device_type)
    raw_ds, ds_source = load_ds_config(cfg)
    ds_config = fill_ds_config(raw_ds, cfg, world_size=world_size, precision=precision, device_type=device_type,
                               source=ds_source)
    check_stage_sections(cfg, stage)
    sources = parse_data_sources(cfg.data.data, _default_kind(cfg.data.data, cfg.data.columns)
                                 if stage.data_kind == "auto" else stage.data_kind)
    if stage.data_kind == "pref" and (len(sources) > 1 or sources[0].kind != "pref"):
        raise ZerotrainError(f"{stage.name} trains on preference pairs only, from one source: got "
                             + ", ".join(f"{s.kind}:{' '.join(s.paths)}" for s in sources))
    for source in sources:
        raw = [p for p in source.paths if not Path(p).is_dir()]
        # --columns maps the conversation or pair sources; pretraining text is always read from "text"
        held = detect_kind(raw, cfg.data.columns if source.kind != "pretrain" else "") if raw else None
        if held and (stage.data_kind == "pref") != (held == "pref"):
            raise ZerotrainError(f"{' '.join(raw)}: preference pairs are for launcher/dpo.py, and it trains on "
                                 f"nothing else ({stage.name} was given {held} data)")
        if cfg.data.columns and not raw and source.kind != "pretrain":
            # A prepared directory is read as it was prepared: a mapping given now would be ignored.
            given, used = parse_columns(cfg.data.columns).spec(), read_meta(source.paths[0]).get("columns", "")
            if given != used:
                raise ZerotrainError(f"--columns {cfg.data.columns!r} does not apply to {source.paths[0]}, prepared "
                                     + (f"with --columns {used!r}" if used else "without --columns")
                                     + ": drop --columns, or prepare the raw files again with it")
    check_document_mask(cfg, sources)
    check_output_dir(cfg, run.root)
    resume_tag = checkpoint.find_resume_tag(run.checkpoints, cfg.checkpoint.resume)
    saved = checkpoint.saved_world_size(resume_tag) if resume_tag is not None else None
    if saved is not None and saved != world_size:
        ds_config.setdefault("checkpoint", {})["load_universal"] = True
    init_source = resolve_init_from(cfg.model.init_from)
    tokenizer = load_tokenizer(tokenizer_path(cfg, init_source))
    context = max(preset_config(cfg.model.preset).max_position_embeddings, cfg.data.seq_len)  # checks the name
    return RunPlan(stage, run, device_type, precision, ds_config, sources, init_source, tokenizer, context,
                   world_size, resume_tag, saved)


def resume_point(plan: RunPlan, world: World) -> Path | None:
    """The tag to resume from, converted to the universal format when the number of ranks changed."""
    if plan.resume_tag is None or not plan.reshape:
        return plan.resume_tag
    on_rank0(lambda: checkpoint.make_universal(plan.resume_tag), world.rank,
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


# --------------------------------------------------------------------------- data

@dataclass
class Data:
    """The run's datasets and this rank's batches."""

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


def prepare_sources(cfg: Config, sources: list[DataSource], tokenizer, local_rank: int) -> list[Path]:
    """A prepared directory per source: raw files are prepared once (local rank 0 of each node,
    the others wait) into a cache keyed by their contents and the tokenizer."""

    def prepared(source: DataSource, show_progress: bool) -> Path:
        if Path(source.paths[0]).is_dir():
            return Path(source.paths[0])
        return prepare_cached(source.kind, source.paths, tokenizer, cfg.data.cache_dir, seq_len=cfg.data.seq_len,
                              val_fraction=cfg.data.val_fraction, skip_bad_lines=cfg.data.skip_bad_lines,
                              show_progress=show_progress, num_proc=cfg.data.num_proc,
                              columns=cfg.data.columns if source.kind != "pretrain" else "")

    directories = on_rank0(lambda: [prepared(s, show_progress=True) for s in sources], local_rank, "data preparation")
    if local_rank != 0:
        directories = [prepared(s, show_progress=False) for s in sources]
    return directories


def build_data(cfg: Config, plan: RunPlan, world: World, log: Log) -> Data:
    """Prepared datasets (mixed by weight when there are several sources), the collate for their
    kind, and this rank's loader."""
    from model.tokenizer import tokenizer_fingerprint

    from model.tokenizer import DEFAULT_TOKENIZER

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
        if source.kind == "pretrain" and cfg.data.document_mask:
            dataset = partial(PretrainDataset, document_eos=tokenizer.eos_token_id)
        else:
            dataset = {"pretrain": PretrainDataset, "sft": SFTDataset, "pref": PrefDataset}[source.kind]
        trains.append(dataset(directory, "train", cfg.data.seq_len))
        vals.append(dataset(directory, "val", cfg.data.seq_len))
        skipped = {k: v for k, v in meta["stats"].items() if v}
        noun = "pairs" if source.kind == "pref" else "samples"
        log(f"{source.kind} data {directory}: {len(trains[-1])} training and {len(vals[-1])} validation {noun}, "
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
        collate = collate_stack
    elif sources[0].kind == "pref" and cfg.data.pack:
        collate = lambda ex: collate_pref_packed(ex, cfg.data.seq_len, tokenizer.pad_token_id)  # noqa: E731
    elif sources[0].kind == "pref":
        collate = lambda ex: collate_pref(ex, tokenizer.pad_token_id)  # noqa: E731
    elif cfg.data.pack:
        collate = lambda ex: collate_packed(ex, cfg.data.seq_len, tokenizer.pad_token_id)  # noqa: E731
    else:
        collate = lambda ex: collate_pad(ex, tokenizer.pad_token_id)  # noqa: E731
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


# --------------------------------------------------------------------------- model and engine

@dataclass
class Model:
    """The model to train, before DeepSpeed wraps it."""

    module: torch.nn.Module
    config: Any
    """Its transformers config (of the base model, for LoRA runs)."""
    lora: dict[str, Any] | None
    """The LoRA settings recorded in checkpoints; None for full training."""
    flops_per_token: float
    checkpoint_bytes: int
    """Estimated size of one checkpoint: module weights, plus fp32 masters and two Adam moments of
    what trains."""


def build_model(cfg: Config, plan: RunPlan) -> Model:
    from model.flops import flops_per_token

    tokenizer, source = plan.tokenizer, plan.init_source
    torch.manual_seed(cfg.train.seed)
    model = build_base_model(cfg, source, tokenizer, plan.context)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.config, name, getattr(tokenizer, name))
        setattr(model.generation_config, name, getattr(tokenizer, name))
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.lora.enabled:
            model.enable_input_require_grads()
    model_config = model.config
    flops = flops_per_token(model.config, cfg.data.seq_len)
    if cfg.lora.enabled:
        base_path = str(source.path.resolve()) if source is not None and source.kind == "hf" else None
        model = wrap_lora(cfg, model, base_path)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return Model(model, model_config, lora_record(model), flops, 4 * total + 12 * trainable)


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
