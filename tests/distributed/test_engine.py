"""The engine on 2 CPU ranks (gloo), debug preset: every ZeRO stage and precision trains; resume
and gradient accumulation are invariants; final/ loads and generates; NaN steps are skipped.

The runs that are only trained and then checked (the stage x precision matrix, the accumulation
pair, ZeRO-2 offload, the NaN runs) share one launch (`engine_runs`); the resume tests resume the
session's pretraining runs (conftest's `pretrained_runs`)."""

from __future__ import annotations

import shutil
import signal
import time

import pytest
import torch
from safetensors.torch import load_file

from engine.checkpoint.checksums import recorded_digests
from engine.checkpoint.resume import tag_problems
from engine.checkpoint.sidecar import Sidecar
from tests.helpers import (
    PRETRAIN_RUN,
    ROOT,
    launcher_env,
    metrics,
    pretrain_args,
    rewound_copy,
    run_cases,
    run_launcher,
    selected_params,
    train_losses,
)

pytestmark = pytest.mark.distributed


def base_args(tokenizer_dir, data, out, **overrides) -> list[str]:
    args = {"tokenizer": tokenizer_dir, "data": data, "output-dir": out, "preset": "debug", "seq-len": 32,
            "micro-batch-size": 4, "grad-accum": 1, "max-steps": 8, "warmup-steps": 2, "lr": 3e-3,
            "log-interval": 1, "eval-interval": 4, "eval-samples": 16, "save-interval": 4, "seed": 1}
    args.update({k.replace("_", "-"): v for k, v in overrides.items()})
    return [x for k, v in args.items() for x in (f"--{k}", str(v))]


def final_weights(run_dir):
    return load_file(run_dir / "final" / "model.safetensors")


MATRIX = [(stage, precision) for precision in ("fp32", "bf16") for stage in (0, 1, 2, 3)]
THROUGH_DEEPSPEED = (1, "bf16")
"""The matrix case that goes through the real deepspeed launcher and launcher/pretrain.py, on its own."""
NAN_RUN = dict(precision="fp32", max_steps=4, save_interval=1, keep_last=0, fault_nan_steps=3)


@pytest.fixture(scope="module")
def engine_runs(request, tokenizer_dir, pretrain_data, tmp_path_factory) -> dict[str, tuple]:
    """{name: (run dir, its CompletedProcess)} for the runs of this module's trained-then-checked
    tests that this session selects, made in one torchrun launch (tests/launch_cases.py) instead
    of one each, but THROUGH_DEEPSPEED's, which has its own launch."""
    out = tmp_path_factory.mktemp("engine_runs")
    cases, runs = {}, {}
    for stage, precision in selected_params(request, "test_every_stage_and_precision_trains", "stage", "precision"):
        extra = {"report_to": "csv"} if (stage, precision) == (0, "fp32") else {}
        name, flags = f"z{stage}-{precision}", dict(zero_stage=stage, precision=precision, max_steps=16,
                                                    save_interval=16, eval_interval=16, **extra)
        if (stage, precision) == THROUGH_DEEPSPEED:
            args = base_args(tokenizer_dir, pretrain_data, out / name, **flags)
            runs[name] = out / name, run_launcher("pretrain.py", args, launcher="deepspeed")
        else:
            cases[name] = "pretrain", base_args(tokenizer_dir, pretrain_data, out / name, **flags)
    if selected_params(request, "test_grad_accumulation_matches_a_bigger_micro_batch"):
        for micro, accum in ((1, 4), (4, 1)):
            cases[f"m{micro}a{accum}"] = "pretrain", base_args(
                tokenizer_dir, pretrain_data, out / f"m{micro}a{accum}", zero_stage=2, precision="fp32",
                micro_batch_size=micro, grad_accum=accum, max_steps=4, save_interval=4)
    if selected_params(request, "test_zero2_with_the_optimizer_offloaded_to_cpu_trains"):
        cases["offload"] = "pretrain", base_args(
            tokenizer_dir, pretrain_data, out / "offload", ds_config=ROOT / "ds_configs" / "zero2_offload.json",
            precision="bf16", max_steps=12, save_interval=12, eval_interval=12)
    for stage in selected_params(request, "test_nonfinite_loss_skips_the_step_and_is_counted", "stage"):
        cases[f"nan-z{stage}"] = "pretrain", base_args(tokenizer_dir, pretrain_data, out / f"nan-z{stage}",
                                                       zero_stage=stage, **NAN_RUN)
    if selected_params(request, "test_consecutive_nonfinite_steps_stop_the_run"):  # last: it fails on purpose
        cases["nan-streak"] = "pretrain", base_args(tokenizer_dir, pretrain_data, out / "nan-streak", zero_stage=2,
                                                    max_consecutive_nonfinite=3, fault_nan_steps="2,3,4")
    if cases:
        procs = run_cases(cases, out, may_fail=("nan-streak",))
        runs.update({name: (out / name, proc) for name, proc in procs.items()})
    return runs


@pytest.mark.parametrize("stage, precision", [pytest.param(*case, marks=pytest.mark.smoke) if case == (2, "fp32")
                                              else case for case in MATRIX])
def test_every_stage_and_precision_trains(engine_runs, stage, precision):
    out, _ = engine_runs[f"z{stage}-{precision}"]
    if (stage, precision) == (0, "fp32"):  # DeepSpeed's CSV monitor got zerotrain's metrics too
        assert {p.name for p in (out / "monitor").rglob("*.csv")} >= {"zerotrain_loss.csv", "zerotrain_lr.csv"}
    losses = train_losses(out)
    assert sorted(losses) == list(range(1, 17))
    assert sum(losses[s] for s in (14, 15, 16)) / 3 < losses[1] - 0.3, losses
    assert (out / "checkpoints" / "latest").read_text() == "global_step16"
    tag = out / "checkpoints" / "global_step16"  # --verify-checkpoints full: every file hashed before the exit
    assert set(recorded_digests(tag)[1]) == set(Sidecar.read(tag).files) and tag_problems(tag) == []
    assert any("val_loss" in r for r in metrics(out))
    assert final_weights(out)["model.embed_tokens.weight"].dtype == torch.float32


@pytest.mark.parametrize("stage", [2, 3])
def test_resume_is_bit_identical(tokenizer_dir, pretrain_data, tmp_path, pretrained_runs, stage):
    straight = pretrained_runs[stage]
    steps = PRETRAIN_RUN["max-steps"]
    # the state after step 4 of the same run: drop everything later, then resume
    resumed = rewound_copy(straight, tmp_path / "run", 4, later=tuple(f"global_step{s}" for s in range(5, steps + 1)))
    lines = (resumed / "metrics.jsonl").read_text().splitlines(keepends=True)
    (resumed / "metrics.jsonl").write_text("".join(l for l in lines if '"step": 4,' in l or '"step": 3,' in l))
    proc = run_launcher("pretrain.py", pretrain_args(tokenizer_dir, pretrain_data, resumed, zero_stage=stage))
    assert "resumed from" in proc.stdout and "at step 4" in proc.stdout
    expected, got = train_losses(straight), train_losses(resumed)
    assert [got[s] for s in range(5, steps + 1)] == [expected[s] for s in range(5, steps + 1)]
    a, b = final_weights(straight), final_weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_grad_accumulation_matches_a_bigger_micro_batch(engine_runs):
    runs = {(micro, accum): engine_runs[f"m{micro}a{accum}"][0] for micro, accum in ((1, 4), (4, 1))}
    la, lb = train_losses(runs[(1, 4)]), train_losses(runs[(4, 1)])
    for step in la:
        assert la[step] == pytest.approx(lb[step], rel=1e-5)
    a, b = final_weights(runs[(1, 4)]), final_weights(runs[(4, 1)])
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


def test_final_dir_loads_with_transformers_and_generates(pretrained_runs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = pretrained_runs[2] / "final"
    model = AutoModelForCausalLM.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    ids = tok("To be, or not", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] == ids.shape[1] + 5
    assert model.config.eos_token_id == tok.eos_token_id


@pytest.mark.faults
@pytest.mark.parametrize("stage", [0, 2])
def test_nonfinite_loss_skips_the_step_and_is_counted(engine_runs, stage):
    out, _ = engine_runs[f"nan-z{stage}"]
    records = {r["step"]: r for r in metrics(out) if "loss" in r}
    assert records[3]["loss"] is None  # a skipped step has no loss
    assert records[4]["nonfinite_steps"] == 1 and records[4]["skipped_steps"] == 1
    import math

    assert math.isfinite(records[4]["loss"])
    # the skipped step changed no weight
    from engine.offline.ds_layout import safe_load

    def module(step):
        return safe_load(out / "checkpoints" / f"global_step{step}" / "mp_rank_00_model_states.pt")["module"]

    before, after, later = module(2), module(3), module(4)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not all(torch.equal(after[k], later[k]) for k in after)


@pytest.mark.faults
def test_consecutive_nonfinite_steps_stop_the_run(engine_runs):
    _, proc = engine_runs["nan-streak"]
    assert proc.returncode != 0
    assert "3 steps in a row had a NaN/inf loss (up to step 4)" in proc.stderr


@pytest.mark.faults
def test_sigusr1_on_one_rank_saves_on_all_and_exits_cleanly(tokenizer_dir, pretrain_data, tmp_path):
    import subprocess
    import time

    import psutil

    from tests.helpers import ROOT, launcher_command

    out = tmp_path / "run"
    cmd = launcher_command("pretrain.py", base_args(tokenizer_dir, pretrain_data, out, zero_stage=2, max_steps=2000,
                                                    save_interval=1000, eval_interval=1000))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=launcher_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, errors="replace")
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not ((out / "metrics.jsonl").is_file() and len(metrics(out)) >= 3):
            time.sleep(0.2)
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "pretrain.py" in " ".join(p.cmdline())]
        assert len(workers) == 2
        workers[1].send_signal(signal.SIGUSR1)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    assert "stopped by signal SIGUSR1" in stdout
    tag = (out / "checkpoints" / "latest").read_text()
    step = int(tag.removeprefix("global_step"))
    assert 3 <= step < 2000 and (out / "checkpoints" / tag / "zerotrain.json").is_file()
    assert not (out / "final").exists()
    # and the run picks up from there by itself
    proc = run_launcher("pretrain.py", base_args(tokenizer_dir, pretrain_data, out, zero_stage=2, max_steps=step + 2,
                                                 warmup_steps=0))
    assert f"at step {step}" in proc.stdout and max(train_losses(out)) == step + 2


@pytest.mark.faults
def test_a_notice_after_the_final_model_is_ignored(tokenizer_dir, pretrain_data, tmp_path):
    """SLURM's notice (--signal=B:USR1@300) can come while a finished run is shutting down: the
    ranks must still exit 0, or torchrun reports the finished run as failed and the batch script
    requeues it. Python restores the default action (terminate) during interpreter shutdown."""
    import subprocess

    import psutil

    from tests.helpers import ROOT, launcher_command

    out = tmp_path / "run"
    cmd = launcher_command("pretrain.py", base_args(tokenizer_dir, pretrain_data, out, max_steps=2, eval_interval=100,
                                                    save_interval=100))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=launcher_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace")
    try:
        workers, output = [], []
        for line in proc.stdout:
            output.append(line)
            workers = workers or [p for p in psutil.Process(proc.pid).children() if "pretrain.py" in " ".join(p.cmdline())]
            if "final model in" in line:
                break
        assert len(workers) == 2
        # from now until they exit, every 10 ms
        while proc.poll() is None:
            for worker in workers:
                try:
                    worker.send_signal(signal.SIGUSR1)
                except psutil.NoSuchProcess:
                    pass
            time.sleep(0.01)
        output.append(proc.stdout.read())
    finally:
        proc.kill()
    assert proc.returncode == 0, "".join(output)[-3000:]


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_resume_on_another_world_size(tokenizer_dir, pretrain_data, tmp_path, before, after):
    """Saved on `before` ranks, resumed on `after` (DeepSpeed's universal format), keeping the
    data position: the samples seen after the resume are the ones an unbroken run would see."""
    out = tmp_path / "run"
    args = dict(zero_stage=2, precision="fp32", micro_batch_size=4 // before, grad_accum=1, max_steps=6,
                save_interval=3, eval_interval=100)
    first = base_args(tokenizer_dir, pretrain_data, out, **args)
    run_launcher("pretrain.py", first, nproc=before, launcher="torchrun" if before > 1 else "python")
    straight = train_losses(out)
    shutil.rmtree(out / "checkpoints" / "global_step6")
    shutil.rmtree(out / "final")
    (out / "checkpoints" / "latest").write_text("global_step3")
    args["micro_batch_size"] = 4 // after  # the same global batch on the new world size
    proc = run_launcher("pretrain.py", base_args(tokenizer_dir, pretrain_data, out, **args), nproc=after,
                        launcher="torchrun" if after > 1 else "python")
    assert f"saved on {before} ranks, now {after}" in proc.stdout
    assert (out / "checkpoints" / "global_step3_universal").is_dir()
    records = [r for r in metrics(out) if "loss" in r]
    assert [r["step"] for r in records][-3:] == [4, 5, 6]
    # same global batch, same samples, same weights: the losses are the unbroken run's (up to
    # the order of float sums over another number of ranks)
    resumed = train_losses(out)
    assert [resumed[s] for s in (4, 5, 6)] == pytest.approx([straight[s] for s in (4, 5, 6)], rel=1e-4)
    assert {r["step"]: r["tokens_seen"] for r in records}[6] == 6 * 4 * 32
    assert (out / "final" / "model.safetensors").is_file()


def test_zero2_with_the_optimizer_offloaded_to_cpu_trains(engine_runs):
    """ds_configs/zero2_offload.json: DeepSpeedCPUAdam (JIT-built once, then cached) keeps the optimizer."""
    out, _ = engine_runs["offload"]
    losses = train_losses(out)
    assert sum(losses[s] for s in (10, 11, 12)) / 3 < losses[1] - 0.3, losses
    assert (out / "final" / "model.safetensors").is_file()
