import json
import os

import pytest
import torch

from common.errors import ZerotrainError
from engine.data.chat import encode_chat
from engine.data.files import ReadStats
from engine.data.format import IGNORE_INDEX
from engine.data.kinds import detect_kind
from engine.data.pairs import (
    PrefDataset,
    PrefPair,
    collate_pref,
    encode_pair,
    read_pairs,
)
from engine.data.prepare import prepare
from engine.data.sources import parse_data_sources
from tests.helpers import labelled_runs, write_jsonl

EN = {"system": "You are terse.", "user": "What colour is the sky?", "earlier": "Blue, mostly.",
      "follow": "And at night?", "chosen": "Black, with stars.", "rejected": "Green."}
ZH = {"system": "你是一个简洁的助手。", "user": "天空是什么颜色？", "earlier": "通常是蓝色。",
      "follow": "晚上呢？", "chosen": "黑色，有星星。", "rejected": "绿色。"}


def minimind(t, multi_turn=True):
    """MiniMind dpo.jsonl: message lists sharing the prompt turns."""
    prompt = [{"role": "user", "content": t["user"]}]
    if multi_turn:
        prompt += [{"role": "assistant", "content": t["earlier"]}, {"role": "user", "content": t["follow"]}]
    return {k: prompt + [{"role": "assistant", "content": t[k]}] for k in ("chosen", "rejected")}


def prompt_shape(t):
    return {"prompt": t["user"], "chosen": t["chosen"], "rejected": t["rejected"], "system": t["system"]}


def prompt_list_shape(t):
    return {"prompt": [{"role": "system", "content": t["system"]}, {"role": "user", "content": t["user"]},
                       {"role": "assistant", "content": t["earlier"]}, {"role": "user", "content": t["follow"]}],
            "chosen": t["chosen"], "rejected": t["rejected"]}


def ultrafeedback(t):
    """UltraFeedback-binarized: a string prompt beside message lists that start with it."""
    return {"prompt": t["user"], "prompt_id": "x", "score_chosen": 8.0, "score_rejected": 3.0,
            **{k: [{"role": "user", "content": t["user"]}, {"role": "assistant", "content": t[k]}]
               for k in ("chosen", "rejected")}}


def sharegpt(t):
    """LLaMA-Factory's ShareGPT preference shape."""
    return {"conversations": [{"from": "human", "value": t["user"]}, {"from": "gpt", "value": t["earlier"]},
                              {"from": "human", "value": t["follow"]}],
            "chosen": {"from": "gpt", "value": t["chosen"]}, "rejected": {"from": "gpt", "value": t["rejected"]},
            "system": t["system"]}


def expected_prompt(shape, t):
    system = [{"role": "system", "content": t["system"]}]
    user = [{"role": "user", "content": t["user"]}]
    multi = user + [{"role": "assistant", "content": t["earlier"]}, {"role": "user", "content": t["follow"]}]
    return {minimind: multi, prompt_shape: system + user, prompt_list_shape: system + multi,
            ultrafeedback: user, sharegpt: system + multi}[shape]


SHAPES = [minimind, prompt_shape, prompt_list_shape, ultrafeedback, sharegpt]


# ----------------------------------------------------------------------------- reading and labels

@pytest.mark.parametrize("texts", [EN, ZH], ids=["english", "chinese"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda f: f.__name__)
def test_each_shape_reads_and_labels_only_the_final_reply(tokenizer, tmp_path, shape, texts):
    path = write_jsonl(tmp_path / "pairs.jsonl", [shape(texts)])
    [(where, pair)] = list(read_pairs(path))
    assert where.endswith("pairs.jsonl:1")
    assert pair == PrefPair(expected_prompt(shape, texts), texts["chosen"], texts["rejected"])
    assert detect_kind([str(path)]) == "pref"

    (chosen_ids, chosen_labels), (rejected_ids, rejected_labels), truncated = encode_pair(pair, tokenizer, 512)
    assert not truncated
    for ids, labels, reply in ((chosen_ids, chosen_labels, texts["chosen"]),
                               (rejected_ids, rejected_labels, texts["rejected"])):
        # one labelled run: the final reply and its end-of-turn token, never the earlier assistant turn
        assert [tokenizer.decode(run) for run in labelled_runs(ids, labels)] == [reply + "<|im_end|>"]
        messages = pair.prompt + [{"role": "assistant", "content": reply}]
        assert tokenizer.decode(ids) == tokenizer.apply_chat_template(messages, tokenize=False)
        # SFT's rule on the same conversation, restricted to its last assistant turn, gives the same labels
        sft_ids, sft_labels, _ = encode_chat(messages, tokenizer, 512)
        assert sft_ids == ids
        last_run = labelled_runs(sft_ids, sft_labels)[-1]
        start = len(ids) - len(last_run) - 1  # the newline after <|im_end|> is not labelled
        assert sft_labels[start:] == labels[start:] and set(labels[:start]) == {IGNORE_INDEX}
    prompt_len = len(chosen_ids) - len(labelled_runs(chosen_ids, chosen_labels)[0]) - 1
    assert chosen_ids[:prompt_len] == rejected_ids[:prompt_len]
    assert tokenizer.decode(chosen_ids[:prompt_len]) == tokenizer.apply_chat_template(
        pair.prompt, tokenize=False, add_generation_prompt=True)


def test_prompt_and_replies_agree_with_trl(tokenizer, tmp_path):
    """TRL's own helpers split a MiniMind-style pair and render the prompt and replies the same way."""
    from trl.data_utils import apply_chat_template, extract_prompt

    record = minimind(ZH)
    split = extract_prompt(record)
    [(_, path_pair)] = list(read_pairs(write_jsonl(tmp_path / "p.jsonl", [record])))
    assert split["prompt"] == path_pair.prompt
    assert split["chosen"] == [{"role": "assistant", "content": ZH["chosen"]}]
    rendered = apply_chat_template(split, tokenizer)
    (chosen_ids, chosen_labels), (rejected_ids, _), _ = encode_pair(path_pair, tokenizer, 512)
    assert tokenizer.decode(chosen_ids) == rendered["prompt"] + rendered["chosen"]
    assert tokenizer.decode(rejected_ids) == rendered["prompt"] + rendered["rejected"]
    assert tokenizer.decode([t for t in chosen_labels if t != IGNORE_INDEX]) == rendered["chosen"].rstrip()


def test_json_array_and_parquet_inputs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "p.json").write_text(json.dumps([prompt_shape(EN), prompt_shape(ZH)], ensure_ascii=False))
    assert [p.chosen for _, p in read_pairs(tmp_path / "p.json")] == [EN["chosen"], ZH["chosen"]]
    pq.write_table(pa.Table.from_pylist([ultrafeedback(EN), ultrafeedback(ZH)]), tmp_path / "p.parquet")
    pairs = list(read_pairs(tmp_path / "p.parquet"))
    assert pairs[1][0].endswith("p.parquet:row 2") and pairs[1][1].rejected == ZH["rejected"]
    assert detect_kind([str(tmp_path / "p.json"), str(tmp_path / "p.parquet")]) == "pref"


# ----------------------------------------------------------------------------- truncation and drops

def test_long_pairs_lose_prompt_from_the_left_then_replies_from_the_right(tokenizer):
    pair = PrefPair([{"role": "user", "content": "start " + "word " * 200 + "question?"}], "yes " * 10, "no " * 30)
    (c_ids, c_labels), (r_ids, r_labels), truncated = encode_pair(pair, tokenizer, 4096)
    assert not truncated
    prompt_len = len(c_ids) - sum(label != IGNORE_INDEX for label in c_labels) - 1
    prompt = c_ids[:prompt_len]
    rejected_reply = r_ids[prompt_len:]

    # room for the longer reply by cutting the prompt on the left only
    seq_len = prompt_len - 20 + len(rejected_reply)
    (c2, c2_labels), (r2, r2_labels), truncated = encode_pair(pair, tokenizer, seq_len)
    assert truncated and len(r2) == seq_len and r2[:-len(rejected_reply)] == prompt[20:]
    assert r2[-len(rejected_reply):] == rejected_reply and c2 == prompt[20:] + c_ids[prompt_len:]
    assert c2_labels[prompt_len - 20:] == c_labels[prompt_len:]

    # a short seq_len keeps seq_len // 2 prompt tokens (the end of the prompt), then cuts the replies
    (c3, c3_labels), (r3, r3_labels), truncated = encode_pair(pair, tokenizer, 40)
    assert truncated and len(r3) == 40 and c3[:20] == r3[:20] == prompt[-20:]
    assert r3[20:] == rejected_reply[:20] and r3_labels[20:] == rejected_reply[:20]
    assert c3[20:] == c_ids[prompt_len:][:20] and set(c3_labels[:20]) == {IGNORE_INDEX}

    # a prompt shorter than seq_len // 2 is kept whole
    short = PrefPair([{"role": "user", "content": "hi"}], "yes " * 50, "no " * 60)
    (c4, _), (r4, _), truncated = encode_pair(short, tokenizer, 64)
    assert truncated and len(r4) == 64 and tokenizer.decode(r4).startswith("<|im_start|>user\nhi<|im_end|>")


def test_prepare_counts_truncated_identical_and_bad_pairs(tokenizer, tmp_path):
    records = [prompt_shape(EN),
               {"prompt": "same?", "chosen": "same", "rejected": "same"},
               {"prompt": "long " * 300, "chosen": "short", "rejected": "also short"},
               {"prompt": "x", "chosen": 5, "rejected": "y"},
               prompt_shape(ZH)]
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    with pytest.raises(ZerotrainError, match=r"pairs.jsonl:4: 'chosen' must be a string .*--skip-bad-lines"):
        prepare("pref", [str(path)], tokenizer, tmp_path / "p", seq_len=64, show_progress=False)
    meta = prepare("pref", [str(path)], tokenizer, tmp_path / "p", seq_len=64, val_fraction=0.0,
                   skip_bad_lines=True, show_progress=False)
    assert meta["kind"] == "pref" and meta["seq_len"] == 64
    assert meta["stats"] == {"bad_lines": 1, "dropped_no_label": 0, "truncated": 1, "dropped_identical": 1}
    assert meta["splits"]["train"]["pairs"] == 3 and meta["splits"]["train"]["examples"] == 6
    dataset = PrefDataset(tmp_path / "p", "train", 64)
    assert len(dataset) == 3
    long_pair = dataset[1]
    assert len(long_pair["rejected_input_ids"]) <= 64
    trained = lambda item, side: item[f"{side}_input_ids"][item[f"{side}_labels"] != IGNORE_INDEX]
    assert tokenizer.decode(trained(long_pair, "chosen")) == "short<|im_end|>"
    assert tokenizer.decode(trained(dataset[2], "rejected")) == ZH["rejected"] + "<|im_end|>"

    identical = write_jsonl(tmp_path / "same.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "a"}])
    with pytest.raises(ZerotrainError, match=r"no usable preference pairs .*1 had identical replies"):
        prepare("pref", [str(identical)], tokenizer, tmp_path / "s", seq_len=64, show_progress=False)
    assert not (tmp_path / "s").exists()


def test_replies_that_differ_only_past_seq_len_count_as_identical(tokenizer, tmp_path):
    late = {"prompt": "q", "chosen": "same " * 50 + "A", "rejected": "same " * 50 + "B"}
    path = write_jsonl(tmp_path / "p.jsonl", [late, prompt_shape(EN)])
    meta = prepare("pref", [str(path)], tokenizer, tmp_path / "p", seq_len=32, val_fraction=0.0, show_progress=False)
    assert meta["stats"]["dropped_identical"] == 1 and meta["stats"]["truncated"] == 2
    assert meta["splits"]["train"]["pairs"] == 1


# ----------------------------------------------------------------------------- bad records

@pytest.mark.parametrize("record, message", [
    ({"prompt": "q", "chosen": "a"}, r"no 'rejected' \(found \['chosen', 'prompt'\]\)"),
    ({"prompt": "q", "chosen": ["a"], "rejected": "b"}, r"'chosen' must be a string"),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, r"'prompt' must be a string or a list"),
    ({"prompt": [{"role": "wizard", "content": "q"}], "chosen": "a", "rejected": "b"},
     r"prompt\[0\] has unknown role 'wizard'"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, r"'prompt' is empty"),
    ("not an object", r"a record must be a JSON object"),
])
def test_bad_prompt_shape_records_name_file_and_line(tmp_path, record, message):
    path = write_jsonl(tmp_path / "b.jsonl", [prompt_shape(EN), record, prompt_shape(ZH)])
    with pytest.raises(ZerotrainError, match=r"b.jsonl:2: " + message):
        list(read_pairs(path))
    stats = ReadStats()
    assert len(list(read_pairs(path, skip_bad_lines=True, stats=stats))) == 2 and stats.bad_lines == 1


@pytest.mark.parametrize("change, message", [
    (lambda r: r["chosen"].__setitem__(-1, {"role": "user", "content": "x"}),
     r"the 'chosen' reply is a user message, not the assistant's"),
    (lambda r: r["rejected"].__setitem__(0, {"role": "user", "content": "another question"}),
     r"'chosen' and 'rejected' must share their prompt turns .* differ at message 0"),
    (lambda r: r["rejected"].insert(0, {"role": "user", "content": "extra"}),
     r"'chosen' and 'rejected' must share their prompt turns .* differ at message 0"),
    (lambda r: r.__setitem__("rejected", []), r"'rejected' must be a non-empty list"),
    (lambda r: r.__setitem__("chosen", [{"role": "assistant", "content": "a"}]),
     r"'chosen' and 'rejected' must share their prompt turns .* 'chosen' has 0 of them, 'rejected' 3"),
    (lambda r: r["rejected"].pop(0), r"'chosen' and 'rejected' must share their prompt turns"),
    (lambda r: r["chosen"][0].pop("content"), r"chosen\[0\] needs 'role' and 'content'"),
    (lambda r: r.pop("rejected"), r"no 'rejected'"),
])
def test_bad_minimind_records_name_file_and_line(tmp_path, change, message):
    bad = minimind(ZH)
    change(bad)
    path = write_jsonl(tmp_path / "dpo.jsonl", [minimind(EN), bad])
    with pytest.raises(ZerotrainError, match=r"dpo.jsonl:2: " + message):
        list(read_pairs(path))
    stats = ReadStats()
    assert len(list(read_pairs(path, skip_bad_lines=True, stats=stats))) == 1 and stats.bad_lines == 1


def test_bad_sharegpt_records_and_unknown_shapes(tmp_path):
    missing = sharegpt(EN)
    del missing["conversations"]
    wrong_role = dict(sharegpt(EN), chosen={"from": "human", "value": "x"})
    bad_turn = dict(sharegpt(EN), rejected={"from": "gpt"})
    path = write_jsonl(tmp_path / "s.jsonl", [sharegpt(ZH), missing, wrong_role, bad_turn])
    stats = ReadStats()
    assert len(list(read_pairs(path, skip_bad_lines=True, stats=stats))) == 1 and stats.bad_lines == 3
    for line, message in ((2, r"no 'conversations'"), (3, r"the 'chosen' reply is a user message"),
                          (4, r"rejected needs 'from' and 'value'")):
        write_jsonl(path, [sharegpt(ZH)] + [[missing, wrong_role, bad_turn][line - 2]])
        with pytest.raises(ZerotrainError, match=rf"s.jsonl:2: {message}"):
            list(read_pairs(path))
    no_prompt = write_jsonl(tmp_path / "n.jsonl", [{"chosen": [{"role": "assistant", "content": "a"}],
                                                   "rejected": [{"role": "assistant", "content": "b"}]}])
    with pytest.raises(ZerotrainError, match=r"n.jsonl:1: no prompt turns"):
        list(read_pairs(no_prompt))
    unknown = write_jsonl(tmp_path / "u.jsonl", [{"chosen": "a", "rejected": "b"}])
    with pytest.raises(ZerotrainError, match=r"u.jsonl:1: unknown preference format .*ShareGPT"):
        list(read_pairs(unknown))


# ----------------------------------------------------------------------------- kinds, prepare, dataset

def test_detect_kind_and_data_sources(tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [sharegpt(EN)])  # has "conversations" too
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"conversations": [{"from": "human", "value": "q"},
                                                                   {"from": "gpt", "value": "a"}]}])
    (tmp_path / "pairs.json").write_text(json.dumps([minimind(ZH)], ensure_ascii=False))
    assert detect_kind([str(pairs), str(tmp_path / "pairs.json")]) == "pref"
    assert detect_kind([str(chat)]) == "sft"
    with pytest.raises(ZerotrainError, match="mix SFT conversations and preference pairs"):
        detect_kind([str(chat), str(pairs)])
    [source] = parse_data_sources([f"pref:{pairs}"], "sft")
    assert source.kind == "pref" and source.paths == [str(pairs)] and source.weight is None
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(ZerotrainError, match=r"unsupported preference input type '.txt'"):
        parse_data_sources([f"pref:{tmp_path / 'x.txt'}"], "sft")


def test_prepare_is_reused_by_key_and_split_by_pair(tokenizer, tmp_path):
    records = [prompt_shape(EN if i % 2 else ZH) | {"chosen": f"reply {i}"} for i in range(20)]
    src = write_jsonl(tmp_path / "pairs.jsonl", records)
    out = tmp_path / "p"
    meta = prepare("pref", [str(src)], tokenizer, out, seq_len=128, val_fraction=0.1, show_progress=False)
    assert meta["splits"]["val"]["pairs"] == 2 and meta["splits"]["train"]["pairs"] == 18
    assert meta["splits"]["val"]["examples"] == 4
    val = PrefDataset(out, "val", 128)
    chosen = tokenizer.decode(val[0]["chosen_input_ids"][val[0]["chosen_labels"] != IGNORE_INDEX])
    assert chosen == "reply 1<|im_end|>"  # pair 1 went to validation, whole
    assert val[0]["rejected_labels"][-1] == IGNORE_INDEX  # the newline after <|im_end|>

    stamp = os.stat(out / "train.bin").st_mtime_ns
    assert prepare("pref", [str(src)], tokenizer, out, seq_len=128, val_fraction=0.1, show_progress=False) == meta
    assert os.stat(out / "train.bin").st_mtime_ns == stamp
    again = prepare("pref", [str(src)], tokenizer, out, seq_len=64, val_fraction=0.1, show_progress=False)
    assert again["key"] != meta["key"] and again["seq_len"] == 64

    with pytest.raises(ZerotrainError, match="prepared with seq_len 64, the run uses 128"):
        PrefDataset(out, "train", 128)
    sft = write_jsonl(tmp_path / "chat.jsonl", [{"instruction": "q", "output": "a"}])
    prepare("sft", [str(sft)], tokenizer, tmp_path / "sft", seq_len=64, val_fraction=0.0, show_progress=False)
    with pytest.raises(ZerotrainError, match="holds sft data, not preference-pair data"):
        PrefDataset(tmp_path / "sft", "train", 64)


def test_collate_puts_chosen_rows_first_and_pads_like_transformers(tokenizer, tmp_path):
    from transformers import DataCollatorWithPadding

    sources = [write_jsonl(tmp_path / f"{shape.__name__}.jsonl", [shape(EN), shape(ZH)]) for shape in SHAPES]
    prepare("pref", list(map(str, sources)), tokenizer, tmp_path / "p", seq_len=256, val_fraction=0.0,
            show_progress=False)
    dataset = PrefDataset(tmp_path / "p", "train", 256)
    assert len(dataset) == 2 * len(SHAPES)
    examples = [dataset[i] for i in (0, 3, 7)]
    batch = collate_pref(examples, tokenizer.pad_token_id)
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    rows = [e[f"{side}_input_ids"] for side in ("chosen", "rejected") for e in examples]
    assert batch["input_ids"].shape == (6, max(len(r) for r in rows))
    assert len({len(r) for r in rows}) > 1  # padding is exercised
    for row, ids in enumerate(rows):
        assert batch["input_ids"][row, :len(ids)].tolist() == ids.tolist()
    labels = [e[f"{side}_labels"] for side in ("chosen", "rejected") for e in examples]
    for row, lab in enumerate(labels):
        assert batch["labels"][row, :len(lab)].tolist() == lab.tolist()
        assert set(batch["labels"][row, len(lab):].tolist()) <= {IGNORE_INDEX}
    reference = DataCollatorWithPadding(tokenizer, padding="longest")([{"input_ids": r.tolist()} for r in rows])
    assert torch.equal(batch["input_ids"], reference["input_ids"])
    assert torch.equal(batch["attention_mask"], reference["attention_mask"])


def test_collate_carries_reference_logps_chosen_then_rejected():
    examples = [{"chosen_input_ids": torch.tensor([1, 2, 3]), "chosen_labels": torch.tensor([-100, 2, 3]),
                 "rejected_input_ids": torch.tensor([1, 4]), "rejected_labels": torch.tensor([-100, 4]),
                 "ref_chosen_logps": torch.tensor(-1.5, dtype=torch.float64), "ref_rejected_logps": torch.tensor(-2.5)},
                {"chosen_input_ids": torch.tensor([5]), "chosen_labels": torch.tensor([5]),
                 "rejected_input_ids": torch.tensor([6, 7, 8, 9]), "rejected_labels": torch.tensor([6, 7, 8, 9]),
                 "ref_chosen_logps": torch.tensor(-3.0), "ref_rejected_logps": torch.tensor(-4.0)}]
    batch = collate_pref(examples, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 0], [5, 0, 0, 0], [1, 4, 0, 0], [6, 7, 8, 9]]
    assert batch["labels"].tolist() == [[-100, 2, 3, -100], [5, -100, -100, -100], [-100, 4, -100, -100],
                                        [6, 7, 8, 9]]
    assert batch["attention_mask"].sum(1).tolist() == [3, 1, 2, 4]
    assert batch["ref_logps"].dtype == torch.float32 and batch["ref_logps"].tolist() == [-1.5, -3.0, -2.5, -4.0]
    assert set(batch) == {"input_ids", "labels", "attention_mask", "ref_logps"}


# ----------------------------------------------------------------------------- command line

def test_cli_prepare_pref_and_eval_refuses_pairs(tokenizer_dir, tmp_path, capsys):
    from engine.apps.cli import main

    src = write_jsonl(tmp_path / "dpo.jsonl", [minimind(ZH), minimind(EN)])
    out = tmp_path / "prepared"
    assert main(["prepare", "--kind", "pref", "--input", str(src), "--tokenizer", str(tokenizer_dir),
                 "--output", str(out), "--seq-len", "128", "--val-fraction", "0"]) == 0
    assert "pref data in" in capsys.readouterr().out
    meta = json.loads((out / "meta.json").read_text())
    assert meta["kind"] == "pref" and meta["splits"]["train"]["pairs"] == 2
    assert len(PrefDataset(out, "train", 128)) == 2
    assert main(["eval", "--model", str(tmp_path / "no-model"), "--data", str(src)]) == 2
    assert "preference pairs" in capsys.readouterr().err
