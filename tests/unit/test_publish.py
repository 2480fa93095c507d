"""common.publish: a target is replaced only by a complete new version, and a crash at any point
leaves a loadable model at the target (the old one or the new one)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap

import pytest

from common import publish
from common.errors import ZerotrainError
from common.publish import publishing, write_text
from tests.helpers import ROOT


def test_a_directory_is_replaced_whole(tmp_path):
    target = tmp_path / "final"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with publishing(target, directory=True) as tmp:
        (tmp / "new.txt").write_text("new")
        assert (target / "old.txt").is_file()  # untouched until the new one is complete
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["final"]  # no temporary left


def test_an_error_while_writing_leaves_the_old_target(tmp_path):
    target = tmp_path / "out.txt"
    write_text(target, "old")
    with pytest.raises(RuntimeError):
        with publishing(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk gone")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


CRASH = textwrap.dedent("""
    import os, shutil, sys
    sys.path.insert(0, {root!r})
    from common import publish
    where = sys.argv[1]
    real_rename = os.rename
    if where == "before-swap":
        publish.exchange = lambda a, b: os._exit(9)
    elif where == "after-swap":
        publish.remove = lambda path: os._exit(9)  # the old one is deleted only after the swap
    elif where == "between-renames":  # a filesystem without exchange: the old one moves aside first
        publish.exchange = lambda a, b: False
        calls = []
        def rename(a, b):
            calls.append(a)
            real_rename(a, b)
            if len(calls) == 2:  # the old target moved aside; the new one not yet in place
                os._exit(9)
        publish.os.rename = rename
    with publish.publishing(sys.argv[2], directory=True) as tmp:
        shutil.copytree(sys.argv[3], tmp, dirs_exist_ok=True)
""")


@pytest.mark.parametrize("where, expect", [("before-swap", "old"), ("after-swap", "new"),
                                           ("between-renames", "old")])
@pytest.mark.slow
def test_a_crash_while_publishing_final_leaves_a_loadable_model(base_model_dir, tmp_path, where, expect):
    from transformers import AutoModelForCausalLM

    from model.build import build_model

    new = tmp_path / "new-model"
    model = build_model("debug", vocab_size=64)
    model.save_pretrained(new)
    final = tmp_path / "run" / "final"
    final.parent.mkdir()
    shutil.copytree(base_model_dir, final)
    proc = subprocess.run([sys.executable, "-c", CRASH.format(root=str(ROOT)), where, str(final), str(new)],
                          capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    if where == "between-renames":
        assert not final.exists()  # the one window where the target is missing ...
        publish.recover(final)  # ... which the next publish (or this) repairs
    loaded = AutoModelForCausalLM.from_pretrained(final)
    vocab = loaded.config.vocab_size
    assert (vocab == 64) == (expect == "new")


@pytest.mark.parametrize("output, relation", [("run", "contains"), ("run/checkpoints", "is"),
                                              ("run/checkpoints/hf", "lies inside")])
def test_an_output_over_its_own_input_is_refused(tmp_path, output, relation):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ZerotrainError, match=f"{relation} the checkpoint directory"):
        publish.check_apart(tmp_path / output, [("the checkpoint directory", tmp_path / "run" / "checkpoints")])


def test_an_output_beside_or_inside_a_folder_only_read_from_is_allowed(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "tokenizer").mkdir()
    publish.check_apart(tmp_path / "run" / "hf", [("the checkpoint directory", tmp_path / "run" / "checkpoints"),
                                                  ("no source", None)])
    publish.check_apart(tmp_path / "models" / "merged", [("the tokenizer", tmp_path / "models")], inside_ok=True)
    with pytest.raises(ZerotrainError, match="contains the tokenizer"):
        publish.check_apart(tmp_path / "run", [("the tokenizer", tmp_path / "run" / "tokenizer")], inside_ok=True)
    (tmp_path / "link").symlink_to(tmp_path / "run")  # the same place under another name
    with pytest.raises(ZerotrainError, match="is the checkpoint directory"):
        publish.check_apart(tmp_path / "link" / "checkpoints", [("the checkpoint directory", tmp_path / "run" / "checkpoints")])
