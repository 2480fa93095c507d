import pytest

from common.errors import ZerotrainError
from engine.checkpoint.resume import find_resume_tag
from engine.config.parse import parse_config
from engine.training.plan import check_output_dir


def run_dir_with_checkpoint(tmp_path, preset="tiny"):
    run = tmp_path / "run"
    (run / "checkpoints" / "global_step5").mkdir(parents=True)
    parse_config(["--preset", preset, "--output-dir", str(run)]).save(run / "config.yaml")
    return run


def test_output_dir_of_another_run_is_refused(tmp_path):
    run = run_dir_with_checkpoint(tmp_path, preset="tiny")
    with pytest.raises(ZerotrainError, match=r"holds checkpoints of another run \(model.preset = 'tiny', this run has "
                                             r"'debug'\); choose another --output-dir"):
        check_output_dir(parse_config(["--preset", "debug", "--output-dir", str(run)]), run)
    check_output_dir(parse_config(["--preset", "tiny", "--output-dir", str(run)]), run)  # the same run: fine


def test_resume_never_refuses_a_directory_with_checkpoints(tmp_path):
    run = run_dir_with_checkpoint(tmp_path)
    cfg = parse_config(["--preset", "tiny", "--output-dir", str(run), "--resume", "never"])
    with pytest.raises(ZerotrainError, match=r"already holds checkpoints \(global_step5\); pass --resume auto"):
        check_output_dir(cfg, run)


def test_resume_path_errors(tmp_path):
    with pytest.raises(ZerotrainError, match="no such checkpoint folder"):
        find_resume_tag(tmp_path / "ckpts", str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ZerotrainError, match="no global_stepN checkpoint there"):
        find_resume_tag(tmp_path / "ckpts", str(tmp_path / "empty"))
    assert find_resume_tag(tmp_path / "ckpts", "auto") is None and find_resume_tag(tmp_path, "never") is None
    half = tmp_path / "ckpts" / "global_step3"
    half.mkdir(parents=True)
    # only an unfinished save (the job died in its first save): a warning, and the run starts over
    with pytest.warns(UserWarning, match="only unfinished save.s. global_step3; starting from the beginning"):
        assert find_resume_tag(tmp_path / "ckpts", "auto") is None
    broken = tmp_path / "ckpts" / "global_step2"
    broken.mkdir()
    (broken / "zerotrain.json").write_text("{}")  # a tag that finished, then was damaged: never skipped silently
    with pytest.raises(ZerotrainError, match=r"no complete checkpoint .*global_step3 \(.*zerotrain.json is missing"
                                             r".*global_step2 \(no \*_model_states.pt file"):
        find_resume_tag(tmp_path / "ckpts", "auto")


# --------------------------------------------------------------------------- what a path stands for

def fake_tag(ckpt_dir, step=4):
    tag = ckpt_dir / f"global_step{step}"
    tag.mkdir(parents=True)
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"")
    (ckpt_dir / "latest").write_text(tag.name)
    return tag


def test_resolve_run_directories_and_what_they_hold(tmp_path):
    from engine.checkpoint.run_dir import resolve

    run = tmp_path / "run"
    tag = fake_tag(run / "checkpoints")
    (run / "tokenizer").mkdir()
    (run / "tokenizer" / "tokenizer.json").write_text("{}")
    # no final/ yet: --init-from takes the checkpoints, with the run's tokenizer
    found = resolve(run, ("hf", "state_dict", "deepspeed"), "--init-from")
    assert (found.kind, found.path, found.tag, found.tokenizer) == ("deepspeed", run / "checkpoints", None,
                                                                    run / "tokenizer")
    found = resolve(tag, ("deepspeed",), "CKPT_DIR")
    assert (found.path, found.tag) == (run / "checkpoints", "global_step4")
    with pytest.raises(ZerotrainError, match="no final/ model yet.*zerotrain consolidate"):
        resolve(run, ("hf",), "--model")
    # a finished LoRA run: final/ holds the model and final/adapter/ the adapter
    (run / "final" / "adapter").mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (run / "final" / name).write_text("{}")
    (run / "final" / "adapter" / "adapter_config.json").write_text("{}")
    assert resolve(run, ("hf", "state_dict", "deepspeed"), "--init-from").path == run / "final"
    assert resolve(run, ("adapter",), "ADAPTER").path == run / "final" / "adapter"
    assert resolve(run / "final", ("adapter",), "ADAPTER").path == run / "final" / "adapter"
    with pytest.raises(ZerotrainError, match=r"ADAPTER .* is not a PEFT adapter directory .*it is a \.pth/\.pt/"):
        resolve(run / "final" / "model.safetensors", ("adapter",), "ADAPTER")


def test_resolve_foreign_layouts(tmp_path):
    from engine.checkpoint.run_dir import resolve

    # HF Trainer's checkpoint-N/: config.json beside DeepSpeed's shards and no weights file
    trainer_ckpt = tmp_path / "checkpoint-10"
    fake_tag(trainer_ckpt, 10)
    (trainer_ckpt / "config.json").write_text("{}")
    assert resolve(trainer_ckpt, ("hf", "state_dict", "deepspeed"), "--init-from").kind == "deepspeed"
    # a directory of weights without config.json is a model for merge-adapter, not for --init-from
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "model.safetensors").write_bytes(b"")
    assert resolve(weights, ("hf", "weights", "state_dict"), "BASE").kind == "weights"
    with pytest.raises(ZerotrainError, match="--init-from .* is not a model directory"):
        resolve(weights, ("hf", "state_dict", "deepspeed"), "--init-from")
    with pytest.raises(ZerotrainError, match="does not exist"):
        resolve(tmp_path / "nowhere", ("hf",), "--model")


def test_checkpoint_tools_take_a_run_directory(tmp_path):
    from engine.checkpoint.run_dir import checkpoint_dir, resolve_tag

    run = tmp_path / "run"
    tag = fake_tag(run / "checkpoints", 6)
    assert checkpoint_dir(run) == run / "checkpoints"
    assert resolve_tag(run) == tag
    assert resolve_tag(run / "checkpoints") == tag and resolve_tag(tag) == tag


def test_a_checkpoint_with_per_rank_rollouts_resumes_on_its_own_number_of_ranks_only(tmp_path):
    from engine.checkpoint.resume import check_reshapable
    from engine.checkpoint.sidecar import Sidecar

    tag = tmp_path / "global_step3"
    tag.mkdir()
    Sidecar(step=3, tokens_seen=0, kind="grpo", zero_stage=2, world_size=2, precision="fp32", config={},
            model_config={}).write(tag)
    check_reshapable(tag, 4)  # nothing carried: any number of ranks
    (tag / "objective_state_0.pt").write_bytes(b"")
    check_reshapable(tag, 2)
    with pytest.raises(ZerotrainError, match=r"saved on 2 ranks in the middle of reusing each rank's rollouts "
                                             r"\(--num-iterations\), which cannot be shared out to 4: resume on 2"):
        check_reshapable(tag, 4)
