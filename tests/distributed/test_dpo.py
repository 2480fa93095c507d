"""Preference tuning in-process (world size 1 and 2, gloo, real DeepSpeed, the debug preset) and
through launcher/dpo.py: a step's loss and rewards are means over every pair of the global
batch whatever the split into micro-batches and ranks; a 2-rank ZeRO-3 run (reference
partitioned like the policy) takes the same steps as a 1-rank ZeRO-0 run; the LoRA-disabled and
precomputed references give the live copy's numbers; resume, adapters and the checkpoint
tools work on DPO runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.helpers import (
    PAIRS,
    REWARDS,
    SHAREGPT,
    dpo_args,
    dpo_trainer,
    metrics,
    peek,
    rewound_copy,
    run_cases,
    run_launcher,
    run_ranks_in_turn,
    same_records,
    selected_params,
    step_records,
    train_losses,
)

pytestmark = pytest.mark.distributed


def _steps(rank, world_size, out, base_model_dir, name, steps, flags):
    records = step_records(dpo_trainer(rank, world_size, out / name, base_model_dir, **flags), steps)
    if rank == 0:
        (out / f"{name}.json").write_text(json.dumps(records))


def _direct(rank, world_size, out, base_model_dir, name, flags):
    """The objective's step against pair_losses on log-probs computed straight from the module
    and from an independent frozen copy of the init model."""
    from transformers import AutoModelForCausalLM

    from engine.objectives.preference import PrefConfig, pair_losses, sequence_logps

    trainer = dpo_trainer(rank, world_size, out / name, base_model_dir, **flags)
    for _ in range(2):  # move the policy away from its reference first
        trainer.train_step()
    batch = peek(trainer.data.loader, 1)[0]
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "ref_logps")}
    reference = AutoModelForCausalLM.from_pretrained(flags.get("ref_from", base_model_dir)).eval()
    with torch.no_grad():
        logps, tokens = sequence_logps(trainer.engine.module(**inputs, use_cache=False).logits, batch["labels"])
        ref, _ = sequence_logps(reference(**inputs, use_cache=False).logits, batch["labels"])
    pref = PrefConfig(**{k.replace("-", "_"): v for k, v in flags.items() if k in ("pref_loss", "beta")})
    terms = pair_losses(pref, *logps.chunk(2), *tokens.chunk(2), *ref.chunk(2))
    result = trainer.train_step()
    (out / f"{name}.json").write_text(json.dumps({"loss": result["loss"], "expected": float(terms.loss.mean()),
                                                  "margin": result["rewards/margins"],
                                                  "expected_margin": float((terms.chosen_rewards
                                                                            - terms.rejected_rewards).mean())}))


REFERENCES = [pytest.param(dict(pref_loss="dpo", beta=0.2), id="dpo-frozen-copy"),
              pytest.param(dict(pref_loss="ipo", beta=0.5, lora_r=4, lora_alpha=8, lora_dropout=0.0),
                           id="ipo-lora-adapter-disabled"),
              pytest.param(dict(pref_loss="dpo", precompute_ref="true"), id="dpo-precomputed"),
              pytest.param(dict(pref_loss="dpo", lora_r=4, lora_alpha=8, lora_dropout=0.0, ref_from="OTHER"),
                           id="lora-ref-from")]
ZERO3_CASES = [pytest.param("false", {}, id="live-reference"), pytest.param("true", {}, id="precomputed-reference"),
               pytest.param("false", dict(loss_chunk_size=16, pack="true", seq_len=256),
                            id="chunked-packed-live-reference")]


@pytest.fixture(scope="module")
def in_process(request, base_model_dir, tmp_path_factory) -> Path:
    """This module's in-process runs that this session's tests need, made on one set of 1-rank and
    one of 2-rank processes (a set costs a start and the imports); run NAME's report is NAME.json
    here (records, or `_direct`'s report) and its run directory NAME/."""
    out = tmp_path_factory.mktemp("dpo_in_process")
    calls: dict[int, list] = {1: [], 2: []}

    def steps(name: str, world_size: int, count: int, **flags) -> None:
        calls[world_size].append((_steps, out, base_model_dir, name, count, flags))

    if selected_params(request, "test_the_step_is_the_mean_over_every_pair"):
        steps("mb1x4", 1, 2, micro_batch_size=1, grad_accum=4)
        steps("mb4x1", 1, 2, micro_batch_size=4, grad_accum=1)
        steps("2x2", 2, 2, micro_batch_size=2, grad_accum=1)
    for flags in selected_params(request, "test_the_reference_is_the_init_model_or_ref_from", "flags"):
        name = f"direct-{next(p.id for p in REFERENCES if p.values[0] == flags)}"
        if flags.get("ref_from") == "OTHER":  # another model of the same shape: the init model, perturbed
            from transformers import AutoModelForCausalLM

            other = AutoModelForCausalLM.from_pretrained(base_model_dir)
            with torch.no_grad():
                for p in other.parameters():
                    p.add_(0.02 * torch.randn_like(p))
            other.save_pretrained(out / "other")
            flags = {**flags, "ref_from": str(out / "other")}
        calls[1].append((_direct, out, base_model_dir, name, flags))
    for precompute, flags in selected_params(request, "test_zero3_on_two_ranks_takes_the_steps_of_zero0_on_one",
                                             "precompute", "flags"):
        case = next(p.id for p in ZERO3_CASES if p.values == (precompute, flags))
        steps(f"zero0-{case}", 1, 3, zero_stage=0, micro_batch_size=4,
              **{k: v for k, v in flags.items() if k == "seq_len"})
        steps(f"zero3-{case}", 2, 3, zero_stage=3, micro_batch_size=2, precompute_ref=precompute, **flags)
    for zero_stage in selected_params(request, "test_in_bf16_the_reference_is_the_policy_at_the_start", "zero_stage"):
        steps(f"bf16-z{zero_stage}", 1, 1, precision="bf16", zero_stage=zero_stage)  # last: bf16 after fp32
    for world_size, todo in calls.items():
        if todo:
            run_ranks_in_turn(world_size, todo)
    return out


def report(in_process: Path, name: str):
    return json.loads((in_process / f"{name}.json").read_text())


@pytest.mark.smoke
def test_the_step_is_the_mean_over_every_pair(in_process):
    """micro-batch 1 x accum 4 == micro-batch 4 x accum 1 == 2 ranks x micro-batch 2: the same
    loss, rewards and gradient (so the same next step). The first step's loss is log 2 (the
    policy is its reference) and its rewards 0."""
    one, four, ranks = (report(in_process, name) for name in ("mb1x4", "mb4x1", "2x2"))
    assert one[0]["loss"] == pytest.approx(math.log(2), rel=1e-6)
    assert one[0]["rewards/margins"] == pytest.approx(0, abs=1e-6)
    assert abs(one[1]["loss"] - math.log(2)) > 1e-3  # the policy has moved from its reference
    same_records(one, four, rel=1e-5)
    same_records(one, ranks, rel=1e-5)


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_in_bf16_the_reference_is_the_policy_at_the_start(in_process, zero_stage):
    """The frozen copy runs in the policy's precision with the policy's buffers (rotary
    frequencies stay fp32, as DeepSpeed leaves them): the first step's loss is log 2 exactly."""
    first = report(in_process, f"bf16-z{zero_stage}")[0]
    assert first["loss"] == pytest.approx(math.log(2), rel=1e-6)
    assert first["rewards/chosen"] == 0 and first["rewards/rejected"] == 0


@pytest.mark.parametrize("flags", REFERENCES)
def test_the_reference_is_the_init_model_or_ref_from(in_process, request, flags):
    result = report(in_process, f"direct-{request.node.callspec.id}")
    assert result["loss"] == pytest.approx(result["expected"], rel=1e-5)
    assert result["margin"] == pytest.approx(result["expected_margin"], rel=1e-5, abs=1e-6)
    assert abs(result["margin"]) > 1e-3  # the policy has moved: the reference matters


@pytest.mark.parametrize("precompute, flags", ZERO3_CASES)
def test_zero3_on_two_ranks_takes_the_steps_of_zero0_on_one(in_process, request, precompute, flags):
    """The frozen copy partitioned by ZeRO-3 over 2 ranks (live, or run once over the data and
    freed) gives a 1-rank ZeRO-0 run's steps; so do packed pairs with both models' partitioned
    heads called chunk by chunk (each call a gather: the ranks' call counts agree)."""
    case = request.node.callspec.id
    same_records(report(in_process, f"zero0-{case}"), report(in_process, f"zero3-{case}"), rel=1e-4)


# --------------------------------------------------------------------------- through the launcher

LORA_RUN = dict(zero_stage=3, lora_r=4, lora_alpha=8, lora_dropout=0.0, max_steps=6, save_interval=3, eval_interval=3)
"""The launcher tests' run: LoRA under ZeRO-3 on 2 ranks, a checkpoint at step 3 and at step 6."""


@pytest.fixture(scope="module")
def lora_dpo_run(base_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo_lora") / "run"
    proc = run_launcher("dpo.py", dpo_args(out, init_from=base_model_dir, **LORA_RUN))
    return out, proc


def test_a_lora_dpo_run_logs_trl_metrics_and_writes_hf_and_peft_outputs(lora_dpo_run, base_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, proc = lora_dpo_run
    records = metrics(out)
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 7))
    for r in train:
        assert set(REWARDS) <= set(r) and 0.0 <= r["rewards/accuracies"] <= 1.0
    val = [r for r in records if "val_loss" in r]
    assert val and {f"val_{k}" for k in REWARDS} <= set(val[-1]) and "val_ppl" not in val[-1]
    ids = torch.randint(3, 500, (2, 12))
    base = AutoModelForCausalLM.from_pretrained(base_model_dir).eval()
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model_dir), out / "final" / "adapter")
    with torch.no_grad():
        assert not torch.allclose(base(input_ids=ids).logits, tuned.eval()(input_ids=ids).logits, atol=1e-4)
    sidecar = json.loads((out / "checkpoints" / "global_step6" / "zerotrain.json").read_text())
    assert sidecar["kind"] == "dpo"


def test_a_dpo_run_resumes_bit_identical(lora_dpo_run, base_model_dir, tmp_path):
    """The run's step-3 checkpoint, resumed to step 6: the same losses and adapter, bit for bit."""
    from safetensors.torch import load_file

    out, _ = lora_dpo_run
    resumed = rewound_copy(out, tmp_path / "run", 3, later=("global_step6",))
    proc = run_launcher("dpo.py", dpo_args(resumed, init_from=base_model_dir, **LORA_RUN))
    assert "at step 3" in proc.stdout
    assert train_losses(resumed) == train_losses(out)
    a = load_file(out / "final" / "adapter" / "adapter_model.safetensors")
    b = load_file(resumed / "final" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resuming_on_other_pairs_of_the_same_size_is_refused_and_the_run_kept(lora_dpo_run, base_model_dir,
                                                                              tmp_path):
    """Resume once compared the sample count and seed only: other pairs of the same size (here the
    same pairs, chosen and rejected swapped) resumed without a word and config.yaml was rewritten
    to name them. The preparation keys differ, so the start is refused before any model is built,
    with a hint that works, and the run directory is left as it was."""
    out, _ = lora_dpo_run
    resumed = rewound_copy(out, tmp_path / "run", 3, later=("global_step6",))
    swapped = tmp_path / "swapped.jsonl"
    with open(PAIRS) as f, open(swapped, "w") as g:
        for line in f:
            pair = json.loads(line)
            pair["chosen"], pair["rejected"] = pair["rejected"], pair["chosen"]
            g.write(json.dumps(pair) + "\n")
    before = {p: p.read_bytes() for p in resumed.rglob("*") if p.is_file()}
    proc = run_launcher("dpo.py", dpo_args(resumed, init_from=base_model_dir, **LORA_RUN, data=swapped,
                                           micro_batch_size=4), nproc=1, launcher="python", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "was trained on other data" in proc.stderr and str(swapped) in proc.stderr and "--init-from" in proc.stderr
    assert "resumed" not in proc.stdout and not (resumed / "checkpoints" / "global_step3_universal").exists()
    assert {p: p.read_bytes() for p in resumed.rglob("*") if p.is_file()} == before


def test_a_dpo_run_resumes_on_another_world_size(lora_dpo_run, base_model_dir, tmp_path):
    """Saved on 2 ranks, resumed on 1 (DeepSpeed's universal format), the same global batch: the
    losses after the resume are the unbroken run's up to float summation order."""
    out, _ = lora_dpo_run
    resumed = rewound_copy(out, tmp_path / "run", 3, later=("global_step6",))
    proc = run_launcher("dpo.py", dpo_args(resumed, init_from=base_model_dir, **LORA_RUN, micro_batch_size=4),
                        nproc=1, launcher="python")
    assert "saved on 2 ranks, now 1" in proc.stdout
    straight, after = train_losses(out), train_losses(resumed)
    assert [after[s] for s in (4, 5, 6)] == pytest.approx([straight[s] for s in (4, 5, 6)], rel=1e-4)


def test_checkpoint_tools_work_on_a_dpo_run(lora_dpo_run, base_model_dir, tmp_path, capsys):
    from engine.apps.cli import (
        main as zerotrain,  # in this process, as test_consolidate runs them
    )

    out, _ = lora_dpo_run
    for cmd in (["extract-adapter", str(out), str(tmp_path / "adapter")],
                ["consolidate", str(out), str(tmp_path / "merged")],
                ["inspect", str(out)],
                ["generate", "--model", str(base_model_dir), "--adapter", str(out / "final" / "adapter"),
                 "--prompt", "Who are you?", "--max-new-tokens", "4"]):
        assert zerotrain(cmd) == 0, (cmd, capsys.readouterr())
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "merged" / "config.json").is_file()


def test_pretrain_and_sft_refuse_preference_flags(tmp_path, base_model_dir):
    """Three refused starts, one after another in one launch."""
    out = ["--init-from", base_model_dir, "--output-dir", tmp_path / "run"]
    procs = run_cases({"beta": ("sft", [*out, "--data", SHAREGPT, "--beta", "0.2"]),
                       "pairs": ("sft", [*out, "--data", PAIRS]),
                       "sft-data": ("dpo", [*out, "--data", SHAREGPT])}, tmp_path / "cases", nproc=1,
                      may_fail=("beta", "pairs", "sft-data"))
    proc = procs["beta"]
    assert proc.returncode == 2 and "--beta: not a flag of sft" in proc.stderr
    proc = procs["pairs"]
    assert proc.returncode == 2 and "preference pairs are for launcher/dpo.py" in proc.stderr
    proc = procs["sft-data"]
    assert proc.returncode == 2 and "SFT conversations are for launcher/pretrain.py or launcher/sft.py" in proc.stderr
    assert "(dpo was given sft data; it trains on preference pairs)" in proc.stderr
