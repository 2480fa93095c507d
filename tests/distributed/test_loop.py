"""The loop in-process: world size 1 and 2 (gloo, real DeepSpeed), the debug preset, built with
engine.training.main.setup and driven step by step. What the launcher tests see only through logs is
checked here against the model itself: a step's loss is the mean over every trained token of
every micro-batch on every rank; one rank and two ranks take the same step; validation is the
token-weighted mean; an exception on rank 0 reaches the other ranks at once.

The runs that only train and report share their processes (`in_process`): one set of 1-rank and
one of 2-rank processes for the module instead of a set a run."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import (
    SAMPLES,
    build_trainer,
    peek,
    run_ranks,
    run_ranks_in_turn,
    selected_params,
)

pytestmark = pytest.mark.distributed


def direct_sums(module, batches) -> tuple[float, float, list[float]]:
    """(summed token NLL, trained tokens, per-micro-batch mean losses) computed straight from the
    module, without the trainer."""
    from engine.data.format import IGNORE_INDEX

    nll, tokens, means = 0.0, 0.0, []
    with torch.no_grad():
        for b in batches:
            inputs = {k: v for k, v in b.items() if k != "labels"}
            logits = module(**inputs, use_cache=False).logits[:, :-1]
            labels = b["labels"][:, 1:]
            total = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum",
                                                      ignore_index=IGNORE_INDEX)
            n = int((labels != IGNORE_INDEX).sum())
            nll, tokens = nll + float(total), tokens + n
            means.append(float(total) / n)
    return nll, tokens, means


ACCUM = 3


@pytest.fixture(scope="module")
def in_process(request, base_model_dir, tmp_path_factory) -> Path:
    """The runs of this module's selected tests that only train and report, each writing to its
    test's folder here, on one set of 1-rank and one of 2-rank processes."""
    out = tmp_path_factory.mktemp("loop")
    calls: dict[int, list] = {1: [], 2: []}

    def call(folder: str, world_size: int, fn, *args) -> None:
        (out / folder).mkdir(exist_ok=True)
        calls[world_size].append((fn, out / folder, base_model_dir, *args))

    for world_size in selected_params(request, "test_step_loss_is_the_mean_over_every_trained_token", "world_size"):
        call(f"step_loss{world_size}", world_size, _step_loss, "sft", ACCUM)
    if selected_params(request, "test_one_rank_and_two_ranks_take_the_same_step"):
        call("same_step", 1, _same_step, 4)
        call("same_step", 2, _same_step, 2)
    for zero_stage in selected_params(request, "test_chunked_loss_takes_the_same_steps_under_deepspeed", "zero_stage"):
        for chunk in (0, 16):
            call("chunked", 2, _chunked_loss_steps, zero_stage, chunk)
    if selected_params(request, "test_a_document_masked_step_trains_on_each_document_alone"):
        call("docmask", 1, _document_mask_step)
    for world_size, todo in calls.items():
        if todo:
            run_ranks_in_turn(world_size, todo)
    return out


def _step_loss(rank, world_size, out, base_model_dir, stage, accum):
    from engine.distributed import all_reduce_sums

    trainer = build_trainer(rank, world_size, out, base_model_dir, stage, grad_accum=accum, micro_batch_size=2)
    batches = peek(trainer.data.loader, accum)
    nll, tokens, means = direct_sums(trainer.engine.module, batches)
    sums = all_reduce_sums({"nll": nll, "tokens": tokens}, torch.device("cpu"))
    result = trainer.train_step()
    evaluation = trainer.evaluate()
    from engine.data.loader import eval_batches

    val = [batch for batch, counted in eval_batches(trainer.data.val, rank, world_size, 2, 8, trainer.data.collate)
           if counted]
    vnll, vtokens, _ = direct_sums(trainer.engine.module, val)
    vsums = all_reduce_sums({"nll": vnll, "tokens": vtokens}, torch.device("cpu"))
    state = {n: p.detach().clone() for n, p in trainer.engine.module.named_parameters()}
    if rank == 0:
        torch.save(state, out / f"weights{world_size}.pt")
    (out / f"rank{rank}-of-{world_size}.json").write_text(json.dumps({
        "loss": result["loss"], "expected": sums["nll"] / sums["tokens"], "means": means,
        "tokens_local": tokens, "val_loss": evaluation["val_loss"], "val_expected": vsums["nll"] / vsums["tokens"]}))


@pytest.mark.parametrize("world_size", [1, pytest.param(2, marks=pytest.mark.smoke)])
def test_step_loss_is_the_mean_over_every_trained_token(in_process, world_size):
    out = in_process / f"step_loss{world_size}"  # ACCUM micro-batches a step
    reports = [json.loads((out / f"rank{r}-of-{world_size}.json").read_text()) for r in range(world_size)]
    for report in reports:
        assert report["loss"] == pytest.approx(report["expected"], rel=1e-6)
        assert report["val_loss"] == pytest.approx(report["val_expected"], rel=1e-6)
    # the test has teeth: padded SFT micro-batches hold different token counts, so a mean of
    # per-micro-batch means (or of per-rank means) would be measurably off
    all_means = [m for r in reports for m in r["means"]]
    assert abs(sum(all_means) / len(all_means) - reports[0]["expected"]) > 1e-4
    if world_size == 2:
        assert reports[0]["tokens_local"] != reports[1]["tokens_local"]


def test_one_rank_and_two_ranks_take_the_same_step(in_process):
    """Pretraining, global batch 4: one rank x micro-batch 4 == two ranks x micro-batch 2 (the
    sampler gives them the same samples), in loss, gradient norm (Adam would hide a gradient
    scaled by a constant) and the updated weights; and in validation loss, before and after, over
    7 samples (--eval-samples: the same samples on any number of ranks, one rank's share a sample
    short)."""
    out = in_process / "same_step"
    one, two = (json.loads((out / f"losses{n}.json").read_text()) for n in (1, 2))
    assert one == pytest.approx(two, rel=1e-5)
    w1, w2 = torch.load(out / "weights1.pt"), torch.load(out / "weights2.pt")
    for name in w1:
        # float summation order differs; Adam magnifies that where its second moment is tiny
        torch.testing.assert_close(w1[name], w2[name], rtol=1e-4, atol=1e-5)


def _same_step(rank, world_size, out, base_model_dir, micro):
    trainer = build_trainer(rank, world_size, out, base_model_dir, "pretrain", micro_batch_size=micro, seq_len=32,
                            data=SAMPLES / "tinyshakespeare.txt", eval_samples=7)
    losses = [trainer.evaluate()["val_loss"]]
    for _ in range(2):
        losses += [trainer.train_step()["loss"], float(trainer.engine.get_global_grad_norm())]
    losses.append(trainer.evaluate()["val_loss"])
    if rank == 0:
        (out / f"losses{world_size}.json").write_text(json.dumps(losses))
        torch.save({n: p.detach().clone() for n, p in trainer.engine.module.named_parameters()},
                   out / f"weights{world_size}.pt")


def _failing_rank0(rank, world_size, out):
    from common.errors import ZerotrainError
    from engine.distributed import World, init_distributed, on_rank0

    init_distributed(rank, 60)
    start = time.monotonic()

    def work():
        raise KeyError("not a ZerotrainError")

    try:
        on_rank0(work, rank, "the work")
        outcome = "returned"
    except ZerotrainError as e:
        outcome = f"ZerotrainError: {e}"
    except KeyError as e:
        outcome = f"KeyError: {e}"
    assert World(rank, rank, world_size).size == 2
    (out / f"rank{rank}.json").write_text(json.dumps({"outcome": outcome, "seconds": time.monotonic() - start}))


def test_any_exception_on_rank0_reaches_every_rank_at_once(tmp_path):
    run_ranks(_failing_rank0, 2, tmp_path)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["outcome"].startswith("KeyError")  # rank 0 raises its own exception
    assert r1["outcome"] == "ZerotrainError: the work failed on another rank; its log has the error"
    assert r1["seconds"] < 30  # not the process-group timeout


def _late_signal(rank, world_size, out, base_model_dir):
    import signal

    import engine.training.trainer

    trainer = build_trainer(rank, world_size, out, base_model_dir, "pretrain", seq_len=32, max_steps=5,
                            save_interval=100, eval_interval=100, data=SAMPLES / "tinyshakespeare.txt")
    reduce = engine.training.trainer.all_reduce_sums

    def signal_after_the_step_reduction(sums, device):
        totals = reduce(sums, device)
        # rank 1's notice lands just after step 2's reduction: rank 0 cannot know of it yet
        if rank == 1 and "signalled" in sums and trainer.state.step == 1:
            trainer.stop_signal = signal.SIGUSR1
        return totals

    engine.training.trainer.all_reduce_sums = signal_after_the_step_reduction
    status = trainer.fit()
    (out / f"rank{rank}.json").write_text(json.dumps({"status": status, "step": trainer.state.step}))


def test_a_signal_after_the_step_reduction_stops_every_rank_at_the_next_step(base_model_dir, tmp_path):
    """A notice is acted on only once every rank knows of it: one that lands on rank 1 after step
    2's reduction stops both ranks after step 3, the same step, with one checkpoint. (Acting on the
    local flag at once made rank 1 save step 2 while rank 0 trained step 3: its collectives met
    rank 0's training ones and a CI run aborted.)"""
    run_ranks(_late_signal, 2, tmp_path, base_model_dir)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert reports == [{"status": 0, "step": 3}] * 2
    tags = sorted(p.name for p in (tmp_path / "run2" / "checkpoints").iterdir() if p.name.startswith("global_step"))
    assert tags == ["global_step3"]


def _chunked_loss_steps(rank, world_size, out, base_model_dir, zero_stage, chunk):
    from engine.objectives.tokens import fusable_head

    trainer = build_trainer(rank, world_size, out / f"z{zero_stage}c{chunk}", base_model_dir, "sft",
                            zero_stage=zero_stage, loss_chunk_size=chunk, max_steps=2)
    fused = fusable_head(trainer.engine.module.get_output_embeddings())
    steps = [[trainer.train_step()["loss"], float(trainer.engine.get_global_grad_norm())] for _ in range(2)]
    if rank == 0:
        (out / f"z{zero_stage}c{chunk}.json").write_text(json.dumps({"fused": fused, "steps": steps}))


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_chunked_loss_takes_the_same_steps_under_deepspeed(in_process, zero_stage):
    """--loss-chunk-size on 2 ranks: ZeRO-2 takes the fused path (the whole head on every rank),
    ZeRO-3 the checkpointed one (the head gathered by DeepSpeed's hooks); both give the losses and
    gradient norms of the full logits."""
    full, chunked = (json.loads((in_process / "chunked" / f"z{zero_stage}c{c}.json").read_text()) for c in (0, 16))
    assert chunked["fused"] == (zero_stage == 2)
    assert sum(chunked["steps"], []) == pytest.approx(sum(full["steps"], []), rel=1e-5)


def _document_mask_step(rank, world_size, out, base_model_dir):
    trainer = build_trainer(rank, world_size, out, base_model_dir, "pretrain", seq_len=64, micro_batch_size=4,
                            data=SAMPLES / "tinyshakespeare.txt", document_mask="true")
    batches = peek(trainer.data.loader, 1)
    masked = direct_sums(trainer.engine.module, batches)[0]
    unmasked = direct_sums(trainer.engine.module, [{k: v for k, v in b.items() if k != "position_ids"}
                                                   for b in batches])[0]
    result = trainer.train_step()
    (out / "docmask.json").write_text(json.dumps({
        "loss": result["loss"], "tokens": result["tokens"], "masked": masked, "unmasked": unmasked,
        "boundaries": int((batches[0]["position_ids"][:, 1:] == 0).sum())}))


def test_a_document_masked_step_trains_on_each_document_alone(in_process):
    """--document-mask end to end: the loader's windows carry restarting positions and the step's
    loss is the one the model gives with them (not the unmasked window's), over the same tokens."""
    report = json.loads((in_process / "docmask" / "docmask.json").read_text())
    assert report["boundaries"] > 0
    assert report["tokens"] == 4 * 64
    trained = 4 * 63  # every next token of every window, boundaries included: the targets do not change
    assert report["loss"] == pytest.approx(report["masked"] / trained, rel=1e-6)
    assert abs(report["masked"] - report["unmasked"]) / trained > 1e-4
