import pytest
import yaml

from common.errors import ZerotrainError
from engine.config.parse import parse_config
from engine.config.tree import Config


def test_flags_fill_every_section():
    cfg = parse_config(["--micro-batch-size", "4", "--lr", "3e-4", "--data", "a.txt", "b.txt", "--data", "c.txt",
                        "--pack", "--zero-stage", "3", "--local_rank=1", "--output-dir", "out"])
    assert cfg.train.micro_batch_size == 4 and cfg.optim.lr == 3e-4
    assert cfg.data.data == ["a.txt", "b.txt", "c.txt"] and cfg.data.pack is True
    assert cfg.distributed.zero_stage == 3 and cfg.train.output_dir == "out"


def test_yaml_nested_and_flat_then_flags_win(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  max_steps: 20\n  micro_batch_size: 2\nlr: 5e-4\nwarmup_steps: 5\n")
    cfg = parse_config(["--config", str(path), "--micro-batch-size", "3"])
    assert cfg.train.max_steps == 20 and cfg.train.micro_batch_size == 3
    assert cfg.optim.lr == pytest.approx(5e-4) and isinstance(cfg.optim.lr, float)


@pytest.mark.parametrize("argv, message", [
    (["--micro-batch", "3"], "unknown flag '--micro-batch'; did you mean '--micro-batch-size'?"),
    (["--max-step", "1"], "did you mean '--max-steps'?"),
    (["--warmup-steps", "2000", "--max-steps", "10"], "warmup_steps (2000) is larger than train.max_steps (10)"),
    (["--precision", "fp8"], "train.precision (--precision) must be one of auto, bf16, fp16, fp32, got 'fp8'"),
    (["--micro-batch-size", "0"], "train.micro_batch_size (--micro-batch-size) must be a positive number"),
    (["--zero-stage", "4"], "distributed.zero_stage (--zero-stage) must be one of 0, 1, 2, 3, got 4"),
    (["--seq-len", "abc"], "data.seq_len: expected int, got 'abc'"),
    (["--val-fraction", "0.7"], "data.val_fraction (--val-fraction) must be a number in [0, 0.5)"),
    (["stray"], "unexpected argument 'stray'"),
    (["--pref-loss", "kto"], "pref.pref_loss (--pref-loss) must be one of dpo, ipo, orpo, simpo, got 'kto'"),
    (["--beta", "0"], "pref.beta (--beta) must be a positive number"),
    (["--pref-loss", "ipo", "--label-smoothing", "0.1"], "must be 0 with --pref-loss ipo (dpo and simpo only)"),
    (["--label-smoothing", "0.5"], "pref.label_smoothing (--label-smoothing) must be a number in [0, 0.5)"),
    (["--pref-loss", "orpo", "--precompute-ref"], "--pref-loss orpo uses no reference model"),
    (["--pref-loss", "simpo", "--ref-from", "x"], "--pref-loss simpo uses no reference model"),
])
def test_bad_flags_are_named(argv, message):
    from engine.objectives.preference import DPO
    from engine.stages import config_for

    with pytest.raises(ZerotrainError) as e:
        config_for(DPO, argv)  # the common sections and DPO's own
    assert message in str(e.value)


def test_unknown_yaml_key_is_named_with_file_and_suggestion(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("train:\n  micro_bach_size: 3\n")
    with pytest.raises(ZerotrainError, match=r"x.yaml: unknown key 'train.micro_bach_size'; did you mean 'micro_batch_size'"):
        parse_config(["--config", str(path)])
    path.write_text("sequence_len: 3\n")
    with pytest.raises(ZerotrainError, match=r"unknown key 'sequence_len'"):
        parse_config(["--config", str(path)])
    with pytest.raises(ZerotrainError, match="does not exist"):
        parse_config(["--config", str(tmp_path / "missing.yaml")])


def test_global_batch_checked_against_world_size():
    cfg = parse_config(["--micro-batch-size", "2", "--grad-accum", "4", "--global-batch-size", "16"])
    assert cfg.check_world_size(2) == 16
    with pytest.raises(ZerotrainError, match=r"2 x 4 x 3 = 24.*--global-batch-size 24"):
        cfg.check_world_size(3)


def test_saved_config_reloads_identically(tmp_path):
    cfg = parse_config(["--lr", "1e-3", "--data", "x.jsonl", "--zero-stage", "1", "--output-dir", "o"])
    cfg.save(tmp_path / "config.yaml")
    again = Config.from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert again == cfg
    assert not list(tmp_path.glob("*.tmp"))


def test_no_flag_is_taken_by_torchrun_or_the_deepspeed_launcher():
    """Both launchers parse with argparse abbreviations even after the script name: a flag of
    ours that is a prefix of one of theirs (say --monitor of --monitor-interval) never arrives."""
    from unittest import mock

    import deepspeed.launcher.runner as ds_runner
    from torch.distributed.run import get_args_parser

    from engine.config.parse import build_parser

    theirs = {o for a in get_args_parser()._actions for o in a.option_strings}
    captured = {}
    with mock.patch("argparse.ArgumentParser.parse_args", lambda self, args=None: captured.setdefault("p", self)):
        ds_runner.parse_args([])
    theirs |= {o for a in captured["p"]._actions for o in a.option_strings}
    ours = {o for a in build_parser("x")._actions for o in a.option_strings if o not in ("-h", "--help")}
    clashes = {(o, t) for o in ours for t in theirs if t.startswith(o) and o not in ("--local_rank", "--local-rank")}
    assert not clashes


def test_boolean_flags_take_an_optional_value():
    assert parse_config(["--pack"]).data.pack is True
    assert parse_config(["--pack", "false"]).data.pack is False
    assert parse_config(["--no-pack"]).data.pack is False
    assert parse_config(["--lora-r", "4", "--merge-lora-at-end", "yes"]).lora.merge_lora_at_end is True
    with pytest.raises(ZerotrainError, match=r"data.pack: expected bool, got 'maybe'"):
        parse_config(["--pack", "maybe"])


def test_flags_of_another_stage_are_refused():
    from engine.objectives.causal_lm import SFT
    from engine.objectives.preference import DPO
    from engine.stages import config_for

    cfg = config_for(DPO, ["--beta", "0.2", "--precompute-ref"])
    assert cfg.section(DPO.section).beta == 0.2 and list(cfg.to_dict())[-1] == "pref"
    with pytest.raises(ZerotrainError, match=r"--beta, --precompute-ref: not a flag of sft \(pref section\); drop it, "
                                             r"or run the launcher it belongs to \(launcher/dpo.py\)"):
        config_for(SFT, ["--beta", "0.2", "--precompute-ref"])
    assert "pref" not in config_for(SFT, []).to_dict()  # an SFT run's config has no DPO section
    for stage in (SFT, DPO):  # a train-section flag: every stage has it
        config_for(stage, ["--loss-chunk-size", "512"])
    with pytest.raises(ZerotrainError, match=r"train.loss_chunk_size \(--loss-chunk-size\) must be"):
        parse_config(["--loss-chunk-size", "-1"])


def test_a_config_saved_with_every_stage_section_still_loads(tmp_path):
    """Earlier versions saved every stage's section in every run's config.yaml; they reload."""
    from engine.objectives.distill import DistillConfig
    from engine.objectives.preference import PrefConfig
    from engine.stages import load_config

    old = {**parse_config(["--lr", "1e-3"]).to_dict(), "pref": {"beta": 0.3}, "distill": {"kd_alpha": 0.2}}
    cfg = load_config(old, source="config.yaml")
    assert cfg.optim.lr == 1e-3 and cfg.section(PrefConfig).beta == 0.3 and cfg.section(DistillConfig).kd_alpha == 0.2


@pytest.mark.parametrize("argv, warmup", [
    (["--max-steps", "16"], 1), (["--max-steps", "500"], 50), (["--max-steps", "5000"], 100),
    (["--max-steps", "3"], 0), (["--max-steps", "16", "--warmup-steps", "16"], 16),
])
def test_the_default_warmup_fits_the_run(argv, warmup):
    """min(100, max_steps // 10) unless given; resolved in the config, so config.yaml records it."""
    cfg = parse_config(argv)
    assert cfg.optim.warmup_steps == warmup
    assert Config.from_dict(cfg.to_dict()).optim.warmup_steps == warmup


def test_a_retired_key_is_named_with_its_replacement_and_dropped_from_a_saved_config(tmp_path):
    from engine.stages import load_config

    with pytest.raises(ZerotrainError, match=r"--eval-batches was replaced by --eval-samples \(validation samples "
                                             r"in all, not micro-batches per rank\)"):
        parse_config(["--eval-batches", "2"])
    (tmp_path / "old.yaml").write_text("train:\n  eval_batches: 2\n")
    with pytest.raises(ZerotrainError, match=r"old.yaml: 'eval_batches' was replaced by 'eval_samples'"):
        parse_config(["--config", str(tmp_path / "old.yaml")])
    saved = load_config({"train": {"eval_batches": 2, "max_steps": 7}}, "RUN/config.yaml")  # an earlier run's
    assert saved.train.max_steps == 7 and saved.train.eval_samples == 160
