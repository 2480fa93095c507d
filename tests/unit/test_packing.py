"""SFT packing (`--pack`, engine.data.collate.collate_packed) changes no math: a packed row's logits are
each example's logits alone, and a packed run's loss curve is the padded run's."""

from __future__ import annotations

import json

import pytest
import torch

from engine.data.collate import collate_packed
from engine.data.format import IGNORE_INDEX

# Both architectures the presets offer, shrunk to the debug preset's size; GPT-2 takes its
# positions from a learned table (position_ids index it), Llama from RoPE.
ARCHITECTURES = {"llama": ("debug", {}), "gpt2": ("gpt2-124m", dict(n_layer=2, n_embd=64, n_head=4))}
VOCAB = 64


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_packed_row_logits_equal_each_example_alone(arch, attn_implementation):
    from model.build import build_from_config
    from model.presets import preset_config

    preset, overrides = ARCHITECTURES[arch]
    torch.manual_seed(0)
    model = build_from_config(preset_config(preset, vocab_size=VOCAB, max_seq_len=64, **overrides), preset,
                              dtype=torch.float32, attn_implementation=attn_implementation).eval()
    lengths = (7, 12, 5, 27)  # the 27 opens a second row and makes the first (24 tokens) end in padding
    examples = [{"input_ids": ids, "labels": ids} for ids in (torch.randint(3, VOCAB, (n,)) for n in lengths)]
    batch = collate_packed(examples, seq_len=27, pad_id=0)
    assert batch["input_ids"].shape == (2, 27) and batch["input_ids"][0, 24:].eq(0).all()
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        alone = [model(input_ids=e["input_ids"][None], use_cache=False).logits[0] for e in examples]
    starts = [(0, 0), (0, 7), (0, 19), (1, 0)]
    for (row, at), e, expected in zip(starts, examples, alone):
        torch.testing.assert_close(packed[row, at:at + len(e["input_ids"])], expected, rtol=1e-5, atol=1e-5)
    assert (batch["labels"][0, [0, 7, 19]] == IGNORE_INDEX).all()  # no example is trained to predict the next one


def _loss_curves(rank, world_size, out, base_model_dir, steps):
    from tests.helpers import build_trainer

    curves = {}
    for pack in ("true", "false"):
        trainer = build_trainer(rank, world_size, out / f"pack-{pack}", base_model_dir, "sft", pack=pack, seq_len=256,
                                micro_batch_size=4, grad_accum=2, max_steps=steps)
        curves[pack] = [trainer.train_step()["loss"] for _ in range(steps)]
    (out / "curves.json").write_text(json.dumps(curves))


@pytest.mark.distributed
def test_packed_and_padded_runs_have_the_same_loss_curve(base_model_dir, tmp_path):
    """One rank, real DeepSpeed (ZeRO-2, fp32), the debug preset on the shipped ShareGPT sample:
    the same seed, so the same examples every step, packed (rows of up to 256 tokens) or padded.
    Observed: the curves agree to 5e-8 relative or better (float summation order); with packing
    broken (position_ids dropped, so examples in a row attend to each other) the first step's
    loss is 4e-4 off and later ones up to 5e-3. The bound sits between the two."""
    from tests.helpers import run_ranks

    steps = 4
    run_ranks(_loss_curves, 1, tmp_path, base_model_dir, steps)
    curves = json.loads((tmp_path / "curves.json").read_text())
    assert len(curves["true"]) == steps
    assert curves["true"] == pytest.approx(curves["false"], rel=1e-5)
    assert curves["true"][-1] < curves["true"][0]  # it trains


def test_zerotrain_sdpa_attends_each_packed_example_alone_with_transformers_sdpa_math(monkeypatch):
    """model.attention: the models zerotrain builds for "sdpa" attend the examples of a packed row
    one at a time (sum of squared lengths, not the row's square), with transformers' sdpa's logits
    and gradients; a padded batch goes to transformers' sdpa as it is."""
    import copy

    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    import model.attention as attention
    from engine.data.collate import collate_pad
    from model.build import build_from_config
    from model.presets import preset_config

    config = preset_config("debug", vocab_size=VOCAB, max_seq_len=64)
    assert config.num_key_value_heads < config.num_attention_heads  # grouped-query attention is covered
    torch.manual_seed(0)
    ours = build_from_config(config, "debug", dtype=torch.float32, attn_implementation="sdpa")
    assert ours.config._attn_implementation == attention.NAME
    theirs = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="sdpa")
    theirs.load_state_dict(ours.state_dict())
    lengths = (7, 12, 5, 27, 9)
    examples = [{"input_ids": ids, "labels": ids} for ids in (torch.randint(3, VOCAB, (n,)) for n in lengths)]
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, *a, **k: calls.append(q.shape[2]) or sdpa(q, *a, **k))
    for batch in (collate_packed(examples, seq_len=27, pad_id=0), collate_pad(examples, pad_id=0)):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        calls.clear()
        got = ours(**inputs, use_cache=False).logits
        split = list(calls)
        expected = theirs(**inputs, use_cache=False).logits
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        got.square().mean().backward()
        expected.square().mean().backward()
        for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)
        ours.zero_grad()
        theirs.zero_grad()
        if "position_ids" in batch:  # rows [7, 12, 5 | pad 3] and [27] and [9 | pad 18]: segment by segment
            assert split == [7, 12, 5, 3, 27, 9, 18] * config.num_hidden_layers
        else:  # padded: one masked call per layer, as transformers makes it
            assert split == [27] * config.num_hidden_layers


def test_one_packed_row_is_what_transformers_flattening_collator_makes():
    """With room for the whole micro-batch, collate_packed makes the row of transformers'
    DataCollatorWithFlattening: the same tokens, restarting positions and first labels masked."""
    from transformers import DataCollatorWithFlattening

    lengths = (7, 12, 5, 27)
    examples = [{"input_ids": ids, "labels": ids.clone()} for ids in (torch.randint(3, VOCAB, (n,)) for n in lengths)]
    ours = collate_packed(examples, seq_len=sum(lengths), pad_id=0)
    theirs = DataCollatorWithFlattening(return_tensors="pt")(
        [{k: v.tolist() for k, v in e.items()} for e in examples])
    for key in ("input_ids", "labels", "position_ids"):
        assert torch.equal(ours[key], theirs[key]), key
