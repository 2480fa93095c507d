"""Distillation in-process (gloo, real DeepSpeed, the debug preset): a teacher partitioned by
ZeRO-3 over 2 ranks gives the steps of a 1-rank run with the teacher whole; a teacher with
another tokenizer is refused before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from common.errors import ZerotrainError
from tests.helpers import SAMPLES, cli_flags, run_ranks, run_ranks_in_turn, step_records

pytestmark = pytest.mark.distributed
KEYS = ("loss", "ce", "kd")


def distill_args(out: Path, base_model_dir: Path, teacher_dir: Path, **flags) -> list[str]:
    values = {"init-from": base_model_dir, "teacher": teacher_dir, "data": SAMPLES / "sharegpt_identity_500.json",
              "output-dir": out, "seq-len": 64, "micro-batch-size": 2, "warmup-steps": 0, "lr": 2e-3,
              "precision": "fp32", "seed": 3, "data-cache-dir": Path(out).parent / "cache",
              "pack": "false"}  # padded rows, as these tests were written for (distill packs by default)
    return cli_flags(values, **flags)


@pytest.fixture(scope="module")
def teacher_dir(base_model_dir, tmp_path_factory) -> Path:
    """Another model over the same tokenizer: the base, perturbed."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_model_dir)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = tmp_path_factory.mktemp("teacher") / "model"
    model.save_pretrained(out)
    return out


def _steps(rank, world_size, out, base_model_dir, teacher_dir, name, flags):
    from engine.distributed import World
    from engine.objectives.distill import DISTILL, DistillConfig
    from engine.stages import config_for
    from engine.training.main import setup

    cfg = config_for(DISTILL, distill_args(out / name, base_model_dir, teacher_dir, max_steps=3, kd_loss="reverse_kl",
                                           kd_temperature=1.5, **flags))
    trainer = setup(cfg, DISTILL, World(rank, rank, world_size))
    assert (trainer.objective.teacher is None) == bool(cfg.section(DistillConfig).teacher_top_k)  # offline: no teacher loaded
    records = step_records(trainer, 3)
    if rank == 0:
        (out / f"{name}.json").write_text(json.dumps(records))


def test_a_zero3_teacher_on_two_ranks_gives_the_one_rank_steps(base_model_dir, teacher_dir, tmp_path):
    models = (tmp_path, base_model_dir, teacher_dir)
    run_ranks(_steps, 1, *models, "one", dict(zero_stage=0, micro_batch_size=4))
    run_ranks_in_turn(2, [(_steps, *models, "two", dict(zero_stage=2, teacher_zero_stage=3)),
                          # both LM heads partitioned and called chunk by chunk: each call gathers, the ranks' counts agree
                          (_steps, *models, "chunked", dict(zero_stage=3, loss_chunk_size=16))])
    one, two, chunked = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two", "chunked"))
    for a, b, c in zip(one, two, chunked, strict=True):
        for key in KEYS:
            assert a[key] == pytest.approx(b[key], rel=1e-4), key
            assert a[key] == pytest.approx(c[key], rel=1e-4), key
    assert one[0]["kd"] > 0.01  # the teacher differs from the student
    assert one[0]["loss"] == pytest.approx(0.5 * one[0]["ce"] + 0.5 * 1.5 ** 2 * one[0]["kd"], rel=1e-6)


def test_stored_top_k_log_probs_replace_the_live_teacher(base_model_dir, teacher_dir, tmp_path, tokenizer):
    """`zerotrain teacher-logits` with k covering the vocabulary gives the live teacher's steps with no
    teacher loaded; a smaller k, computed at start on 2 ranks, gives a smaller divergence and the same CE."""
    import subprocess
    import sys

    from tests.helpers import ROOT

    vocab = len(tokenizer)
    cli = distill_args(tmp_path / "cli", base_model_dir, teacher_dir, kd_loss="reverse_kl", kd_temperature=1.5)
    proc = subprocess.run([sys.executable, "-m", "engine.apps.cli", "teacher-logits", "--top-k", str(vocab), *cli],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    store = Path(proc.stdout.strip().splitlines()[-1])
    meta = json.loads((store / "meta.json").read_text())
    assert meta["top_k"] == vocab and meta["splits"]["train"]["tokens"] > 0
    assert not (tmp_path / "cli").exists()  # nothing but the store is written
    models = (tmp_path, base_model_dir, teacher_dir)
    run_ranks_in_turn(1, [(_steps, *models, "live", dict(zero_stage=0, micro_batch_size=4)),
                          (_steps, *models, "stored", dict(zero_stage=0, micro_batch_size=4, teacher_top_k=vocab))])
    run_ranks(_steps, 2, tmp_path, base_model_dir, teacher_dir, "top8", dict(zero_stage=2, teacher_zero_stage=3,
                                                                             teacher_top_k=8))
    live, stored, top8 = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("live", "stored", "top8"))
    for a, b in zip(live, stored, strict=True):
        for key in KEYS:
            assert a[key] == pytest.approx(b[key], rel=1e-4), key
    assert top8[0]["ce"] == pytest.approx(live[0]["ce"], rel=1e-5)  # the same model and batch at step 1
    assert 0 < top8[0]["kd"] < live[0]["kd"]  # merging outcomes only lowers a divergence
    assert len(list(store.parent.iterdir())) == 2  # one store per k: read, not recomputed, by the k = vocab run


def _on_policy_steps(rank, world_size, out, base_model_dir, teacher_dir):
    from engine.distributed import World
    from engine.objectives.distill import DISTILL
    from engine.stages import config_for
    from engine.training.main import setup

    cfg = config_for(DISTILL, distill_args(out / "run", base_model_dir, teacher_dir, max_steps=2, zero_stage=3,
                                           on_policy_ratio=1, on_policy_max_new_tokens=6, kd_temperature=2))
    trainer = setup(cfg, DISTILL, World(rank, rank, world_size))
    data = trainer.data.loader.next_batch()
    rng = torch.get_rng_state()
    sampled = [trainer.objective.step_batches(trainer.engine, [data], 7)[0] for _ in range(2)]
    assert torch.equal(rng, torch.get_rng_state())  # the run's own random stream is left alone
    records = [trainer.train_step() for _ in range(2)]
    if rank == 0:
        (out / "on_policy.json").write_text(json.dumps({"records": records, "data": {k: v.tolist() for k, v in data.items()},
                                                        "sampled": [{k: v.tolist() for k, v in b.items()} for b in sampled]}))


def test_on_policy_steps_train_on_the_students_own_samples_under_zero3(base_model_dir, teacher_dir, tmp_path):
    from engine.data.format import IGNORE_INDEX

    run_ranks(_on_policy_steps, 2, tmp_path, base_model_dir, teacher_dir)
    got = json.loads((tmp_path / "on_policy.json").read_text())
    first, again = got["sampled"]
    assert first == again  # seeded by the step: a resumed run samples the same
    data = {k: torch.tensor(v) for k, v in got["data"].items()}
    sample = {k: torch.tensor(v) for k, v in first.items() if k != "on_policy"}
    for r in range(len(data["input_ids"])):
        labels = data["labels"][r]
        start = int((labels != IGNORE_INDEX).nonzero().max())
        while labels[start - 1] != IGNORE_INDEX:
            start -= 1
        assert torch.equal(sample["input_ids"][r, :start], data["input_ids"][r, :start])  # the prompt, kept
        trained = (sample["labels"][r] != IGNORE_INDEX).nonzero().flatten()
        assert 1 <= len(trained) <= 6 and int(trained[0]) == start  # only the sampled reply is trained
    for record in got["records"]:
        assert record["on_policy"] == 1.0 and record.get("ce") is None
        assert record["loss"] == pytest.approx(0.5 * 2.0 ** 2 * record["kd"], rel=1e-5)


def test_a_teacher_with_another_tokenizer_is_refused(base_model_dir, tmp_path, tokenizer_dir):
    import shutil

    from tests.helpers import run_launcher

    teacher = tmp_path / "teacher"
    shutil.copytree(base_model_dir, teacher)
    (teacher / "tokenizer.json").write_text((teacher / "tokenizer.json").read_text().replace('"<|im_end|>"', '"<|end|>"'))
    proc = run_launcher("distill.py", ["--init-from", base_model_dir, "--teacher", teacher, "--data",
                                       SAMPLES / "sharegpt_identity_500.json", "--output-dir", tmp_path / "run"],
                        nproc=1, launcher="python", check=False)
    assert proc.returncode == 2 and "uses another tokenizer" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "run").exists()  # refused before any work


@pytest.mark.parametrize("flags, message", [
    (dict(on_policy_ratio=0.5, data=SAMPLES / "tinyshakespeare.txt"), "it needs SFT conversations, got pretrain data"),
    (dict(on_policy_ratio=0.5, pack="true"), "drop --pack"),
    (dict(teacher_top_k=4, data=f"sft:{SAMPLES / 'sharegpt_identity_500.json'}:1"), "one prepared data source"),
])
def test_what_on_policy_and_stored_teachers_cannot_do_is_named_first(flags, message, base_model_dir, teacher_dir,
                                                                     tmp_path):
    from engine.objectives.distill import DISTILL
    from engine.stages import config_for
    from engine.training.plan import plan_run

    argv = distill_args(tmp_path / "run", base_model_dir, teacher_dir, **flags)
    if "teacher_top_k" in flags:  # a mixture: two sources
        argv += ["--data", f"pretrain:{SAMPLES / 'tinyshakespeare.txt'}:1"]
    cfg = config_for(DISTILL, argv)
    with pytest.raises(ZerotrainError, match=message):
        DISTILL.objective(cfg).check(cfg, plan_run(cfg, DISTILL, 1))


# --------------------------------------------------------------------------- through the launcher

LORA_RUN = dict(max_steps=4, zero_stage=2, lora_r=4, lora_alpha=8, lora_dropout=0.0, log_interval=1, eval_interval=2,
                eval_samples=8, save_interval=2, on_policy_ratio=0.7, on_policy_max_new_tokens=6)
"""The launcher tests' run: LoRA under ZeRO-2 on 2 ranks, a checkpoint at step 2 and at step 4. With seed 3,
steps 1, 2 and 4 are on-policy, step 3 is not."""
ON_POLICY_STEPS = {1, 2, 4}


@pytest.fixture(scope="module")
def lora_distill_run(base_model_dir, teacher_dir, tmp_path_factory):
    from tests.helpers import run_launcher

    out = tmp_path_factory.mktemp("distill_lora") / "run"
    run_launcher("distill.py", distill_args(out, base_model_dir, teacher_dir, **LORA_RUN))
    return out


def test_a_distill_run_logs_its_terms_and_resumes_exactly_and_on_one_rank(lora_distill_run, base_model_dir,
                                                                         teacher_dir, tmp_path):
    from safetensors.torch import load_file

    from tests.helpers import metrics, rewound_copy, run_launcher, train_losses

    out = lora_distill_run
    records = [r for r in metrics(out) if "loss" in r]
    assert {r["step"] for r in records if r.get("on_policy") == 1.0} == ON_POLICY_STEPS
    assert all(set(KEYS) <= set(r) for r in records if r["step"] not in ON_POLICY_STEPS)
    assert {"val_loss", "val_ce", "val_kd"} <= set([r for r in metrics(out) if "val_loss" in r][-1])
    for nproc, launcher in ((2, "torchrun"), (1, "python")):
        resumed = rewound_copy(out, tmp_path / f"run{nproc}", 2, later=("global_step4",))
        proc = run_launcher("distill.py", distill_args(resumed, base_model_dir, teacher_dir, **LORA_RUN,
                                                       micro_batch_size=4 // nproc), nproc=nproc, launcher=launcher)
        assert "at step 2" in proc.stdout
        straight, after = train_losses(out), train_losses(resumed)
        if nproc == 2:  # the same ranks: bit for bit
            assert after == straight
            a = load_file(out / "final" / "adapter" / "adapter_model.safetensors")
            b = load_file(resumed / "final" / "adapter" / "adapter_model.safetensors")
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        else:  # through the universal format: up to float summation order; samples are drawn per rank, so
            # only the data step is the same on one rank
            assert after[3] == pytest.approx(straight[3], rel=1e-4)


def test_checkpoint_tools_work_on_a_distill_run(lora_distill_run, tmp_path, capsys):
    from engine.apps.cli import (
        main as zerotrain,  # in this process, as test_consolidate runs them
    )

    for cmd in (["extract-adapter", str(lora_distill_run), str(tmp_path / "adapter")],
                ["consolidate", str(lora_distill_run), str(tmp_path / "merged")]):
        assert zerotrain(cmd) == 0, (cmd, capsys.readouterr())
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "merged" / "config.json").is_file()
