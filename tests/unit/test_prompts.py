"""engine.data.prompts: RL prompt files in TRL's, MiniMind's rlaif and a --columns shape, their
extra columns kept for the reward functions, bad records named by file:line, and the prepared
directory read back (tokens, records, left-padded batches)."""

from __future__ import annotations

import json

import pytest
import torch

from common.errors import ZerotrainError
from engine.data.columns import columns_for
from engine.data.prepare import prepare
from engine.data.prompts import PromptDataset, collate_prompts, encode_prompt, read_prompts


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_trl_rlaif_and_mapped_shapes(tmp_path):
    trl = write_jsonl(tmp_path / "trl.jsonl", [
        {"prompt": "What is 2+3?", "solution": "5", "level": 1},
        {"prompt": [{"role": "user", "content": "And 4+4?"}], "solution": "8", "level": 2},
        {"prompt": "Why?", "system": "Be brief.", "solution": None}])
    got = [p for _, p in read_prompts(trl)]
    assert got[0] == ("What is 2+3?", {"solution": "5", "level": 1})
    assert got[1] == ([{"role": "user", "content": "And 4+4?"}], {"solution": "8", "level": 2})
    assert got[2] == ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}],
                      {"solution": None})
    rlaif = write_jsonl(tmp_path / "rlaif.jsonl", [{"conversations": [
        {"role": "user", "content": "Tell me a joke"}, {"role": "assistant", "content": "无"}]}])
    assert [p for _, p in read_prompts(rlaif)] == [([{"role": "user", "content": "Tell me a joke"}], {})]
    mapped = write_jsonl(tmp_path / "mapped.jsonl", [{"question": "1+1?", "gt": "2"}])
    columns = columns_for("prompt", "prompt=question")
    assert [p for _, p in read_prompts(mapped, columns=columns)] == [("1+1?", {"gt": "2"})]


@pytest.mark.parametrize("record, message", [
    ({"prompt": ""}, "bad.jsonl:2: 'prompt' is empty"),
    ({"prompt": 5}, "bad.jsonl:2: 'prompt' must be a string or a list of {role, content} messages, not int"),
    ({"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
     "bad.jsonl:2: 'prompt' must end with a user turn"),
    ({"question": "x"}, r"bad.jsonl:2: no 'prompt' \(found \['question'\]\)"),
])
def test_bad_records_are_named_by_file_and_line(tmp_path, record, message):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "fine"}, record])
    with pytest.raises(ZerotrainError, match=message):
        list(read_prompts(bad))
    assert len(list(read_prompts(bad, skip_bad_lines=True))) == 1


def test_columns_for_prompts_need_a_prompt_field():
    with pytest.raises(ZerotrainError, match="missing 'prompt': a prompt mapping needs prompt"):
        columns_for("prompt", "system=sys")
    with pytest.raises(ZerotrainError, match="'response' is not a key of a prompt mapping"):
        columns_for("prompt", "prompt=q,response=a")


def test_prepared_prompts_read_back_with_their_records(tmp_path, tokenizer):
    records = [{"prompt": f"What is {i}+{i}?", "solution": str(2 * i)} for i in range(9)]
    records.append({"prompt": [{"role": "user", "content": "Hi"}], "solution": "hello"})
    raw = write_jsonl(tmp_path / "p.jsonl", records)
    prepare("prompt", [str(raw)], tokenizer, tmp_path / "prep", seq_len=32, val_fraction=0.2, show_progress=False)
    train, val = (PromptDataset(tmp_path / "prep", split, 32) for split in ("train", "val"))
    assert len(train) + len(val) == 10 and len(val) == 2
    seen = {}
    for dataset in (train, val):
        for i in range(len(dataset)):
            prompt, columns = dataset.record(i)
            assert dataset[i]["prompt_ids"].tolist() == encode_prompt(prompt, tokenizer)
            seen[json.dumps(prompt)] = columns["solution"]
    assert seen == {json.dumps(r["prompt"]): r["solution"] for r in records}
    chat = encode_prompt([{"role": "user", "content": "Hi"}], tokenizer)
    assert tokenizer.decode(chat).endswith("<|im_start|>assistant\n")  # the generation prompt
    batch = collate_prompts([train[0], train[1]], pad_id=tokenizer.pad_token_id)
    lengths = [len(train[i]["prompt_ids"]) for i in (0, 1)]
    assert batch["prompt_mask"].sum(-1).tolist() == lengths
    assert batch["prompt_mask"][:, -1].tolist() == [1, 1]  # left-padded: every prompt ends at the edge
    assert torch.equal(batch["prompt_ids"][0, -lengths[0]:], train[0]["prompt_ids"])
    assert batch["index"].tolist() == [0, 1]


@pytest.mark.parametrize("ranks, accum, mbs, g", [(2, 2, 3, 4), (2, 1, 8, 4), (1, 4, 2, 8), (3, 1, 4, 2)])
def test_an_rl_step_shares_its_prompts_out_in_trls_order(monkeypatch, ranks, accum, mbs, g):
    """The step's completions are the G samples of each of its prompts in turn; micro-batch i of
    rank r is their (i x ranks + r)-th block: every rank together holds each prompt exactly G
    times, and where G divides the micro-batch each micro-batch holds whole groups, the prompts
    of the loader's per-rank blocks."""
    from engine.data.loader import BatchLoader, ShardedSampler
    from engine.objectives.grpo import GroupRelative, RLConfig

    prompts = [{"prompt_ids": torch.tensor([i]), "index": torch.tensor(i)} for i in range(50)]
    collate = lambda rows: {"index": torch.stack([r["index"] for r in rows])}  # noqa: E731
    taken = {}
    for rank in range(ranks):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(ranks))
        objective = GroupRelative(RLConfig(reward_fn=["length"], num_generations=g), seed=0, seq_len=64)
        objective.loader = BatchLoader(prompts, ShardedSampler(50, rank, ranks, seed=7), 1, collate)
        objective.prompts, objective.collate, objective.micro_batch_size, objective.grad_accum = \
            prompts, collate, mbs, accum
        taken[rank] = [b["index"].tolist() for b in objective.step_prompts()]
        assert objective.loader.sampler.cursor == ranks * accum * mbs // g
    every = [i for rank in taken.values() for batch in rank for i in batch]
    assert all(every.count(i) == g for i in set(every)) and len(set(every)) == ranks * accum * mbs // g
    if mbs % g == 0:  # what the loader would have given rank r's micro-batch i, each prompt G times
        for rank in range(ranks):
            sampler = ShardedSampler(50, rank, ranks, seed=7)
            assert taken[rank] == [[i for i in sampler.next_indices(mbs // g) for _ in range(g)]
                                   for _ in range(accum)]
