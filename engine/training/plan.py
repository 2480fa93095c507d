"""Planning a run: every check that needs no process group, made before any expensive work, so a
bad flag, a wrong data file or a run directory of another run fails in seconds with a clear
message. Its result is the RunPlan the other steps of setup build from."""

from __future__ import annotations

from pathlib import Path

import yaml

from common.errors import ZerotrainError
from engine.checkpoint.resume import check_reshapable, find_resume_tag, saved_world_size
from engine.checkpoint.run_dir import RunDir, zerotrain_tags
from engine.config.deepspeed import fill_ds_config, load_ds_config
from engine.config.precision import resolve_precision
from engine.config.tree import Config
from engine.data.kinds import data_kind
from engine.data.sources import DataSource, run_sources
from engine.distributed import device_type
from engine.objectives.base import Stage
from engine.stages import launchers_for, load_config
from engine.training.init_from import resolve_init_from, run_context, tokenizer_path
from engine.training.parts import RunPlan


def check_output_dir(cfg: Config, run_dir: Path) -> None:
    """Refuse a run directory that holds another run's checkpoints (or any, with --resume never)."""
    run = RunDir(run_dir)
    ckpts = zerotrain_tags(run.checkpoints)
    if not ckpts:
        return
    if cfg.checkpoint.resume == "never":
        raise ZerotrainError(f"{run.root} already holds checkpoints ({ckpts[-1]}); pass --resume auto to continue "
                             "that run, or choose an empty --output-dir")
    if run.config.is_file():
        old = load_config(yaml.safe_load(run.config.read_text()), source=str(run.config))
        for section, key in (("model", "preset"), ("model", "tokenizer"), ("data", "seq_len")):
            a, b = getattr(getattr(old, section), key), getattr(getattr(cfg, section), key)
            if a != b:
                raise ZerotrainError(f"{run.root} holds checkpoints of another run ({section}.{key} = {a!r}, this run "
                                     f"has {b!r}); choose another --output-dir")


def check_stage_data(stage: Stage, sources: list[DataSource]) -> None:
    """Every source is of a kind the stage trains on (as given, and as its raw files' records
    hold), and there are as many sources as the stage takes."""
    if not stage.mixes and len(sources) > 1:
        raise ZerotrainError(f"{stage.name} trains on one data source, got "
                             + ", ".join(f"{s.kind}:{' '.join(s.paths)}" for s in sources))
    trains_on = " and ".join(data_kind(k).title for k in stage.data_kinds)
    for source in sources:
        for kind in dict.fromkeys(k for k in (source.kind, source.held) if k is not None):
            if kind not in stage.data_kinds and kind not in data_kind(source.kind).also_reads:
                elsewhere = " or ".join(launchers_for(kind)) or "no launcher"
                raise ZerotrainError(f"{' '.join(source.paths)}: {data_kind(kind).title} are for {elsewhere} "
                                     f"({stage.name} was given {kind} data; it trains on {trains_on})")


def plan_run(cfg: Config, stage: Stage, world_size: int) -> RunPlan:
    """Check everything that can be checked on one process, fail early with a clear message."""
    from model.tokenizer import load_tokenizer

    if not cfg.train.output_dir:
        raise ZerotrainError("--output-dir is required (the run directory)")
    run = RunDir(Path(cfg.train.output_dir))
    device = device_type()
    precision = resolve_precision(cfg.train.precision, device)
    raw_ds, ds_source = load_ds_config(cfg)
    ds_config = fill_ds_config(raw_ds, cfg, world_size=world_size, precision=precision, device_type=device,
                               source=ds_source)
    sources = run_sources(cfg.data, stage.plain_data)
    check_stage_data(stage, sources)
    check_output_dir(cfg, run.root)
    resume_tag = find_resume_tag(run.checkpoints, cfg.checkpoint.resume)
    saved = saved_world_size(resume_tag) if resume_tag is not None else None
    if saved is not None and saved != world_size:
        check_reshapable(resume_tag, world_size)
        ds_config.setdefault("checkpoint", {})["load_universal"] = True
    init_source = resolve_init_from(cfg.model.init_from)
    tokenizer = load_tokenizer(tokenizer_path(cfg, init_source))
    context = run_context(cfg)
    return RunPlan(run, device, precision, ds_config, sources, init_source, tokenizer, context, world_size,
                   resume_tag, saved)
