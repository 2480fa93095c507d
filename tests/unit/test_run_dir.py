import pytest

from engine.checkpoint import find_resume_tag
from engine.config import parse_config
from common.errors import ZerotrainError
from engine.builders import check_output_dir


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
    with pytest.raises(ZerotrainError, match=r"no complete checkpoint .*global_step3 \(.*zerotrain.json is missing"):
        find_resume_tag(tmp_path / "ckpts", "auto")
