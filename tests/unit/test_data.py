import json
import os

import numpy as np
import pytest
import torch

from common.errors import ZerotrainError
from engine.data.chat import encode_chat
from engine.data.collate import collate_packed, collate_pad, collate_stack
from engine.data.conversations import SFTDataset, read_conversations
from engine.data.files import ReadStats
from engine.data.format import IGNORE_INDEX
from engine.data.loader import BatchLoader, ShardedSampler, eval_batches
from engine.data.prepare import prepare
from engine.data.text import PretrainDataset, read_documents
from tests.helpers import SAMPLES, labelled_runs, write_jsonl

SHAREGPT = SAMPLES / "sharegpt_identity_500.json"
ALPACA_SEED = SAMPLES / "alpaca_seed_tasks.jsonl"


# ----------------------------------------------------------------------------- label masks

@pytest.mark.parametrize("system", [None, "You are a helpful assistant."])
def test_only_assistant_tokens_are_labelled_in_multi_turn_sharegpt(tokenizer, tmp_path, system):
    record = next(r for r in json.loads(SHAREGPT.read_text()) if len(r["conversations"]) == 6)
    if system:
        record = dict(record, system=system)
    path = tmp_path / "chat.json"
    path.write_text(json.dumps([record]))
    [(where, messages)] = list(read_conversations(path))
    assert [m["role"] for m in messages] == ["system"] * bool(system) + ["user", "assistant"] * 3
    ids, labels, truncated = encode_chat(messages, tokenizer, 4096)
    assert not truncated and len(ids) == len(labels)
    expected = [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
    assert [tokenizer.decode(run) for run in labelled_runs(ids, labels)] == expected
    # the whole rendered conversation is the template's text, token for token
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(messages, tokenize=False)


def test_alpaca_and_seed_task_labels(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "alpaca.jsonl", [
        {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
        {"instruction": "Name a colour.", "input": "", "output": "Blue"},
    ])
    conversations = [m for _, m in read_conversations(path)]
    assert conversations[0][0] == {"role": "user", "content": "Translate to French.\n\nGood morning"}
    assert conversations[1][0] == {"role": "user", "content": "Name a colour."}
    ids, labels, _ = encode_chat(conversations[0], tokenizer, 512)
    assert [tokenizer.decode(r) for r in labelled_runs(ids, labels)] == ["Bonjour<|im_end|>"]

    seed = [m for _, m in read_conversations(ALPACA_SEED)]
    instances = sum(len(json.loads(line)["instances"]) for line in ALPACA_SEED.open())
    assert len(seed) == instances
    first = json.loads(ALPACA_SEED.open().readline())
    assert seed[0][-1] == {"role": "assistant", "content": first["instances"][0]["output"]}


def test_openai_and_minimind_shapes(tmp_path):
    openai = write_jsonl(tmp_path / "o.jsonl", [{"messages": [{"role": "system", "content": "S"},
                                                             {"role": "user", "content": "U"},
                                                             {"role": "assistant", "content": "A"}]}])
    minimind = write_jsonl(tmp_path / "m.jsonl", [{"conversations": [{"role": "user", "content": "你好"},
                                                                    {"role": "assistant", "content": "您好"}]}])
    assert [m["role"] for m in list(read_conversations(openai))[0][1]] == ["system", "user", "assistant"]
    assert list(read_conversations(minimind))[0][1][1] == {"role": "assistant", "content": "您好"}


def test_truncation_and_dropping_conversations_without_trainable_tokens(tokenizer, tmp_path):
    long_prompt = "word " * 400
    path = write_jsonl(tmp_path / "sft.jsonl", [
        {"instruction": long_prompt, "output": "late answer"},  # the answer falls past seq_len
        {"instruction": "hi", "output": "hello there"},
        {"instruction": "short", "output": "ok"},
    ])
    meta = prepare("sft", [str(path)], tokenizer, tmp_path / "prep", seq_len=64, val_fraction=0.0,
                   show_progress=False)
    assert meta["stats"]["dropped_no_label"] == 1 and meta["stats"]["truncated"] == 1
    ds = SFTDataset(tmp_path / "prep", "train", 64)
    assert len(ds) == 2
    sample = ds[0]
    assert tokenizer.decode(sample["input_ids"][sample["labels"] != IGNORE_INDEX]) == "hello there<|im_end|>"
    with pytest.raises(ZerotrainError, match="prepared with seq_len 64, the run uses 128"):
        SFTDataset(tmp_path / "prep", "train", 128)


def test_sft_with_no_assistant_turn_is_dropped_and_counted(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": "question only"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
    ])
    meta = prepare("sft", [str(path)], tokenizer, tmp_path / "p", seq_len=128, val_fraction=0.0, show_progress=False)
    assert meta["stats"]["dropped_no_label"] == 1 and meta["splits"]["train"]["examples"] == 1
    only_questions = write_jsonl(tmp_path / "q.jsonl", [{"messages": [{"role": "user", "content": "q"}]}])
    with pytest.raises(ZerotrainError, match="no usable conversations"):
        prepare("sft", [str(only_questions)], tokenizer, tmp_path / "q", seq_len=128, show_progress=False)
    assert not (tmp_path / "q").exists()


# ----------------------------------------------------------------------------- pretraining prep

def test_pretrain_tokens_are_documents_with_eos_and_reused_when_unchanged(tokenizer, tmp_path):
    docs = ["First document.\nTwo lines.", "第二篇文章，春眠不觉晓。", "third"]
    src = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in docs])
    out = tmp_path / "prep"
    meta = prepare("pretrain", [str(src)], tokenizer, out, val_fraction=0.0, show_progress=False)
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == len(tokenizer)
    tokens = np.fromfile(out / "train.bin", dtype=np.uint16)
    expected = [t for d in docs for t in tokenizer.encode(d, add_special_tokens=False) + [tokenizer.eos_token_id]]
    assert tokens.tolist() == expected
    assert meta["splits"]["train"] == {"tokens": len(expected), "documents": 3}
    assert meta["sources"][0]["sha256"] and meta["tokenizer_fingerprint"]

    stamp = os.stat(out / "train.bin").st_mtime_ns
    assert prepare("pretrain", [str(src)], tokenizer, out, val_fraction=0.0, show_progress=False) == meta
    assert os.stat(out / "train.bin").st_mtime_ns == stamp
    write_jsonl(src, [{"text": d} for d in docs[:2]])
    changed = prepare("pretrain", [str(src)], tokenizer, out, val_fraction=0.0, show_progress=False)
    assert changed["key"] != meta["key"] and changed["splits"]["train"]["documents"] == 2
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_text_files_split_into_paragraphs_and_validation_split(tokenizer, tmp_path):
    src = tmp_path / "t.txt"
    src.write_text("".join(f"Para {i} line one.\nline two.\n\n" for i in range(40)))
    docs = list(read_documents(src))
    assert len(docs) == 40 and docs[0] == "Para 0 line one.\nline two."
    meta = prepare("pretrain", [str(src)], tokenizer, tmp_path / "p", val_fraction=0.1, show_progress=False)
    assert meta["splits"]["val"]["documents"] == 4 and meta["splits"]["train"]["documents"] == 36
    train = PretrainDataset(tmp_path / "p", "train", 16)
    assert len(train) == meta["splits"]["train"]["tokens"] // 16
    assert torch.equal(train[1]["input_ids"], train[1]["labels"]) and train[1]["input_ids"].shape == (16,)


def test_parquet_input(tokenizer, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["alpha beta", "gamma"]}), tmp_path / "d.parquet")
    assert list(read_documents(tmp_path / "d.parquet")) == ["alpha beta", "gamma"]
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(ZerotrainError, match=r"bad.parquet:row 1: no \"text\" field \(found \['body'\]\)"):
        list(read_documents(tmp_path / "bad.parquet"))


# ----------------------------------------------------------------------------- bad input

def test_malformed_json_line_names_file_and_line_or_is_skipped(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "broken"\n{"text": "fine"}\n')
    with pytest.raises(ZerotrainError, match=r"d.jsonl:2: invalid JSON .*--skip-bad-lines"):
        list(read_documents(path))
    stats = ReadStats()
    assert list(read_documents(path, skip_bad_lines=True, stats=stats)) == ["ok", "fine"]
    assert stats.bad_lines == 1


@pytest.mark.parametrize("content, message", [
    ('{"text": "a"}\n{"body": "b"}\n', r"d.jsonl:2: no \"text\" field \(found \['body'\]\)"),
    ('{"text": "a"}\n{"text": 5}\n', r"d.jsonl:2: \"text\" is int, not a string"),
    ('{"text": "a"}\n{"text": "  "}\n', r"d.jsonl:2: empty document"),
])
def test_missing_wrong_or_empty_text_field(tmp_path, content, message):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(ZerotrainError, match=message):
        list(read_documents(path))


def test_invalid_utf8_empty_missing_and_unsupported_files(tmp_path):
    bad = tmp_path / "d.txt"
    bad.write_bytes(b"fine line\n\xff\xfe broken\n")
    with pytest.raises(ZerotrainError, match=r"d.txt:2: invalid UTF-8"):
        list(read_documents(bad))
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(ZerotrainError, match=r"e.jsonl: the file is empty"):
        list(read_documents(tmp_path / "e.jsonl"))
    with pytest.raises(ZerotrainError, match=r"nope.txt does not exist"):
        list(read_documents(tmp_path / "nope.txt"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ZerotrainError, match=r"unsupported pretraining input type '.csv'"):
        list(read_documents(tmp_path / "x.csv"))


def test_unknown_sft_shape_and_mixed_shapes(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(ZerotrainError, match=r"s.jsonl:1: unknown SFT format \(keys \['completion', 'prompt'\]\).*ShareGPT"):
        list(read_conversations(path))
    path = write_jsonl(tmp_path / "m.jsonl", [{"instruction": "a", "output": "b"},
                                             {"messages": [{"role": "user", "content": "x"}]}])
    with pytest.raises(ZerotrainError, match=r"m.jsonl:2: record does not match this file's format \(alpaca"):
        list(read_conversations(path))
    path = write_jsonl(tmp_path / "r.jsonl", [{"messages": [{"role": "wizard", "content": "x"}]}])
    with pytest.raises(ZerotrainError, match=r"r.jsonl:1: messages\[0\] has unknown role 'wizard'"):
        list(read_conversations(path))


def test_prepared_files_are_checked(tokenizer, tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": "some words here"}] * 20)
    out = tmp_path / "p"
    prepare("pretrain", [str(src)], tokenizer, out, val_fraction=0.0, show_progress=False)
    tokens = np.fromfile(out / "train.bin", dtype=np.uint16)
    tokens[3] = len(tokenizer) + 5
    tokens.tofile(out / "train.bin")
    with pytest.raises(ZerotrainError, match=rf"token id {len(tokenizer) + 5} is outside the vocabulary"):
        PretrainDataset(out, "train", 4)
    tokens[:-1].tofile(out / "train.bin")
    with pytest.raises(ZerotrainError, match="truncated or changed"):
        PretrainDataset(out, "train", 4)
    with pytest.raises(ZerotrainError, match="not a prepared data directory"):
        PretrainDataset(tmp_path, "train", 4)


# ----------------------------------------------------------------------------- batching

def test_packing_keeps_examples_whole_and_boundaries_masked():
    examples = [{"input_ids": torch.arange(10, 10 + n), "labels": torch.arange(10, 10 + n)} for n in (5, 4, 6, 3)]
    batch = collate_packed(examples, seq_len=10, pad_id=0)
    assert "attention_mask" not in batch
    assert batch["input_ids"].shape == (2, 9)
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3]
    assert batch["position_ids"][1].tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2]
    assert batch["input_ids"][1].tolist() == list(range(10, 16)) + [10, 11, 12]
    # the first token of every packed example is never a target (no cross-example prediction)
    assert batch["labels"][0].tolist() == [-100, 11, 12, 13, 14, -100, 11, 12, 13]
    too_long = collate_packed([{"input_ids": torch.arange(12), "labels": torch.arange(12)}], 10, 0)
    assert too_long["input_ids"].shape == (1, 12)  # a single over-long example keeps its own row


def test_padding_collate():
    examples = [{"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([-100, 6, 7])},
                {"input_ids": torch.tensor([8]), "labels": torch.tensor([8])}]
    batch = collate_pad(examples, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_sampler_shards_neither_overlap_nor_miss(world_size):
    n, micro = 24, 2
    samplers = [ShardedSampler(n, r, world_size, seed=7) for r in range(world_size)]
    steps = n // (micro * world_size)
    per_rank = [[i for _ in range(steps) for i in s.next_indices(micro)] for s in samplers]
    seen = [i for shard in per_rank for i in shard]
    assert sorted(seen) == list(range(n))
    assert per_rank[0] != sorted(per_rank[0]) or world_size == 3  # shuffled
    # the same seed gives the same order on every rank count; the union of one epoch is the permutation
    single = ShardedSampler(n, 0, 1, seed=7)
    order = single.next_indices(n)
    interleaved = [i for step in range(steps) for shard in per_rank for i in shard[step * micro:(step + 1) * micro]]
    assert interleaved == order
    assert ShardedSampler(n, 0, 1, seed=8).next_indices(n) != order


def test_sampler_keeps_going_across_epochs_with_a_new_order():
    s = ShardedSampler(6, 0, 1, seed=1)
    first, second = s.next_indices(6), s.next_indices(6)
    assert sorted(first) == sorted(second) == list(range(6)) and first != second
    assert s.epoch == 2.0


def test_loader_resumes_at_the_same_position_even_on_another_world_size():
    dataset = [{"input_ids": torch.tensor([i]), "labels": torch.tensor([i])} for i in range(50)]
    loader = BatchLoader(dataset, ShardedSampler(50, 0, 2, seed=3), 4, collate_stack)
    for _ in range(5):
        loader.next_batch()
    state = loader.state_dict()
    after = [loader.next_batch()["input_ids"].tolist() for _ in range(4)]
    resumed = BatchLoader(dataset, ShardedSampler(50, 0, 2, seed=3), 4, collate_stack)
    resumed.load_state_dict(state)
    assert [resumed.next_batch()["input_ids"].tolist() for _ in range(4)] == after
    # one rank continuing the same stream sees rank 0's and rank 1's next samples in turn
    single = BatchLoader(dataset, ShardedSampler(50, 0, 1, seed=3), 4, collate_stack)
    single.load_state_dict(state)
    assert single.next_batch()["input_ids"].flatten().tolist() == [x[0] for x in after[0]]
    with pytest.raises(ZerotrainError, match="same data and seed"):
        BatchLoader(dataset[:40], ShardedSampler(40, 0, 2, seed=3), 4, collate_stack).load_state_dict(state)


@pytest.mark.parametrize("world_size, samples, rounds", [(1, 7, 4), (2, 7, 2), (3, 7, 2), (2, 10, 3), (4, 30, 2),
                                                         (2, 3, 1)])
def test_validation_scores_the_same_samples_on_any_number_of_ranks_in_as_many_rounds_each(world_size, samples,
                                                                                           rounds):
    dataset = [{"input_ids": torch.tensor([i]), "labels": torch.tensor([i])} for i in range(11)]
    per_rank = [list(eval_batches(dataset, r, world_size, 2, samples, collate_stack)) for r in range(world_size)]
    assert all(len(batches) == rounds for batches in per_rank)  # a collective pass stays in step
    counted = sorted(int(x) for batches in per_rank for b, counts in batches if counts for x in b["input_ids"].flatten())
    assert counted == list(range(min(samples, len(dataset))))  # each once, whatever the ranks
