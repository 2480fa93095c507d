"""Dolly and Alpaca-with-history SFT files, and --columns mappings for any other shape."""

import pytest

from common.errors import ZerotrainError
from engine.config.parse import parse_config
from engine.data.chat import encode_chat
from engine.data.columns import parse_columns
from engine.data.conversations import read_conversations
from engine.data.files import ReadStats
from engine.data.kinds import detect_kind
from engine.data.pairs import read_pairs
from engine.data.prepare import prepare, prepare_cached
from tests.helpers import labelled_runs, write_jsonl

DOLLY = [
    {"instruction": "Summarise the passage.", "context": "Llamas are camelids from South America.",
     "response": "Llamas are South American camelids.", "category": "summarization"},
    {"instruction": "Name a primary colour.", "context": "", "response": "Red.", "category": "open_qa"},
    {"instruction": "把这句话翻译成英文。", "context": "你好，世界", "response": "Hello, world.", "category": "zh"},
    {"instruction": "What is 2 + 2?", "context": "", "response": "4", "category": "open_qa"},
]
OPENAI = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Sky colour?"},
                  {"role": "assistant", "content": "Blue."}]},
    {"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "您好"}]},
]
SPEAKERS = {"system": "instructions", "user": "human", "assistant": "bot"}
MESSAGE_LIST_COLUMNS = "messages=dialog,role=speaker,content=text,user=human,assistant=bot,system=instructions"
PAIRS = [
    {"prompt": "What colour is the sky?", "chosen": "Blue.", "rejected": "Green.", "system": "Be brief."},
    {"prompt": "天空是什么颜色？", "chosen": "蓝色。", "rejected": "绿色。", "system": ""},
]
PAIR_COLUMNS = "chosen=good,rejected=bad,prompt=question,system=sys"


def renamed_dolly(record):
    return {"q": record["instruction"], "ctx": record["context"], "a": record["response"], "tag": record["category"]}


def dialog(record):
    return {"dialog": [{"speaker": SPEAKERS[m["role"]], "text": m["content"]} for m in record["messages"]]}


def renamed_pair(record):
    return {"question": record["prompt"], "good": record["chosen"], "bad": record["rejected"], "sys": record["system"]}


def prepared_bytes(directory):
    """Every token, mask and offset file of a prepared directory (meta.json aside), by name."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.name != "meta.json"}


# ----------------------------------------------------------------------------- detected shapes

def test_dolly_is_detected_and_its_context_follows_the_instruction(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "dolly.jsonl", DOLLY)
    conversations = [m for _, m in read_conversations(path)]
    assert conversations[0] == [
        {"role": "user", "content": "Summarise the passage.\n\nLlamas are camelids from South America."},
        {"role": "assistant", "content": "Llamas are South American camelids."}]
    assert conversations[1] == [{"role": "user", "content": "Name a primary colour."},
                                {"role": "assistant", "content": "Red."}]
    assert detect_kind([str(path)]) == "sft"
    ids, labels, _ = encode_chat(conversations[2], tokenizer, 512)
    assert [tokenizer.decode(r) for r in labelled_runs(ids, labels)] == ["Hello, world.<|im_end|>"]


def test_alpaca_history_is_a_multi_turn_conversation_with_every_reply_trained(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "belle.jsonl", [
        {"instruction": "And at night?", "input": "", "output": "Black, with stars.", "system": "Be brief.",
         "history": [["What colour is the sky?", "Blue."], ["Why?", "Rayleigh scattering."]]},
        {"instruction": "翻译", "input": "早上好", "output": "Good morning.", "history": []},
    ])
    conversations = [m for _, m in read_conversations(path)]
    assert conversations == [
        [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": "What colour is the sky?"}, {"role": "assistant", "content": "Blue."},
         {"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Rayleigh scattering."},
         {"role": "user", "content": "And at night?"}, {"role": "assistant", "content": "Black, with stars."}],
        [{"role": "user", "content": "翻译\n\n早上好"}, {"role": "assistant", "content": "Good morning."}]]
    ids, labels, _ = encode_chat(conversations[0], tokenizer, 512)
    assert [tokenizer.decode(r) for r in labelled_runs(ids, labels)] == [
        "Blue.<|im_end|>", "Rayleigh scattering.<|im_end|>", "Black, with stars.<|im_end|>"]

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "q", "output": "a", "history": [["only user"]]}])
    with pytest.raises(ZerotrainError, match=r"bad.jsonl:1: 'history\[0\]' must be a \[user, assistant\] pair"):
        list(read_conversations(bad))


# ----------------------------------------------------------------------------- --columns equals the native shape

def test_a_single_turn_mapping_prepares_dolly_bit_identically(tokenizer, tmp_path):
    native = write_jsonl(tmp_path / "native.jsonl", DOLLY)
    renamed = write_jsonl(tmp_path / "renamed.jsonl", [renamed_dolly(r) for r in DOLLY])
    columns = "prompt=q,input=ctx,response=a"
    a = prepare("sft", [str(native)], tokenizer, tmp_path / "a", seq_len=128, val_fraction=0.25, show_progress=False)
    b = prepare("sft", [str(renamed)], tokenizer, tmp_path / "b", seq_len=128, val_fraction=0.25,
                show_progress=False, columns=columns)
    assert a["splits"] == b["splits"] and a["splits"]["val"]["examples"] == 1
    assert prepared_bytes(tmp_path / "a") == prepared_bytes(tmp_path / "b")
    assert b["columns"] == "input=ctx,prompt=q,response=a"

    # The mapping is part of the cache key: the same mapping in another order is the same
    # preparation, another mapping (here: without the context) prepares again, differently.
    cache = tmp_path / "cache"
    same = prepare_cached("sft", [str(renamed)], tokenizer, cache, seq_len=128, val_fraction=0.25,
                          skip_bad_lines=False, show_progress=False, columns=columns)
    reordered = prepare_cached("sft", [str(renamed)], tokenizer, cache, seq_len=128, val_fraction=0.25,
                               skip_bad_lines=False, show_progress=False, columns="response=a, input=ctx, prompt=q")
    other = prepare_cached("sft", [str(renamed)], tokenizer, cache, seq_len=128, val_fraction=0.25,
                           skip_bad_lines=False, show_progress=False, columns="prompt=q,response=a")
    assert same == reordered and other != same
    assert prepared_bytes(same) == prepared_bytes(tmp_path / "a") != prepared_bytes(other)


def test_a_message_list_mapping_equals_the_openai_shape(tokenizer, tmp_path):
    native = write_jsonl(tmp_path / "openai.jsonl", OPENAI)
    renamed = write_jsonl(tmp_path / "dialog.jsonl", [dialog(r) for r in OPENAI])
    columns = parse_columns(MESSAGE_LIST_COLUMNS)
    assert columns.shape == "message-list" and detect_kind([str(renamed)], MESSAGE_LIST_COLUMNS) == "sft"
    assert list(read_conversations(renamed, columns=columns)) == [
        (where.replace("openai", "dialog"), messages) for where, messages in read_conversations(native)]
    prepare("sft", [str(native)], tokenizer, tmp_path / "a", seq_len=128, val_fraction=0.0, show_progress=False)
    prepare("sft", [str(renamed)], tokenizer, tmp_path / "b", seq_len=128, val_fraction=0.0, show_progress=False,
            columns=MESSAGE_LIST_COLUMNS)
    assert prepared_bytes(tmp_path / "a") == prepared_bytes(tmp_path / "b")


def test_pair_mappings_equal_the_native_pair_shapes(tokenizer, tmp_path):
    native = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    renamed = write_jsonl(tmp_path / "renamed.jsonl", [renamed_pair(r) for r in PAIRS])
    assert detect_kind([str(renamed)], PAIR_COLUMNS) == "pref"
    mapped = [p for _, p in read_pairs(renamed, columns=parse_columns(PAIR_COLUMNS))]
    assert mapped == [p for _, p in read_pairs(native)]
    prepare("pref", [str(native)], tokenizer, tmp_path / "a", seq_len=64, val_fraction=0.0, show_progress=False)
    prepare("pref", [str(renamed)], tokenizer, tmp_path / "b", seq_len=64, val_fraction=0.0, show_progress=False,
            columns=PAIR_COLUMNS)
    assert prepared_bytes(tmp_path / "a") == prepared_bytes(tmp_path / "b")

    # Message lists that share their prompt turns (MiniMind's dpo.jsonl), with their own role names.
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
             {"role": "user", "content": "Sky colour?"}]
    minimind = {k: turns + [{"role": "assistant", "content": reply}]
                for k, reply in (("chosen", "Blue."), ("rejected", "Green."))}
    spoken = {k[0]: [{"speaker": SPEAKERS[t["role"]], "text": t["content"]} for t in v] for k, v in minimind.items()}
    pair = parse_columns("chosen=c,rejected=r,role=speaker,content=text,user=human,assistant=bot")
    [(_, mapped)] = list(read_pairs(write_jsonl(tmp_path / "spoken.jsonl", [spoken]), columns=pair))
    [(_, expected)] = list(read_pairs(write_jsonl(tmp_path / "minimind.jsonl", [minimind])))
    assert mapped == expected and mapped.prompt == turns


def test_columns_is_a_config_key_and_a_prepare_flag(tokenizer_dir, tmp_path):
    from engine.apps.cli import main

    assert parse_config(["--columns", "prompt=q,response=a"]).data.columns == "prompt=q,response=a"
    renamed = write_jsonl(tmp_path / "renamed.jsonl", [renamed_dolly(r) for r in DOLLY])
    main(["prepare", "--kind", "sft", "--input", str(renamed), "--tokenizer", str(tokenizer_dir), "--output",
          str(tmp_path / "p"), "--seq-len", "64", "--columns", "prompt=q,input=ctx,response=a"])
    assert '"columns": "input=ctx,prompt=q,response=a"' in (tmp_path / "p" / "meta.json").read_text()


# ----------------------------------------------------------------------------- bad mappings and records

@pytest.mark.parametrize("columns, error", [
    ("prompt=q", r"missing 'response': a single-turn mapping needs prompt and response"),
    ("prompt=q,response=a,answer=b", r"unknown key 'answer' \(valid keys: assistant, chosen, content, .*\)"),
    ("prompt=q,response=a,prompt=x", r"'prompt' is given twice"),
    ("prompt=q,response", r"'response' is not KEY=VALUE"),
    ("messages=dialog,response=a", r"'response' is not a key of a message-list mapping \(its keys: messages, role"),
    ("chosen=good,prompt=q", r"missing 'rejected': a pair mapping needs chosen and rejected"),
])
def test_a_bad_mapping_is_named_before_any_data_is_read(tokenizer, tmp_path, columns, error):
    # The input does not exist: the mapping is checked first.
    with pytest.raises(ZerotrainError, match=r"--columns '.*': " + error):
        prepare("sft", [str(tmp_path / "missing.jsonl")], tokenizer, tmp_path / "p", columns=columns)


def test_a_mapping_for_another_kind_is_refused(tokenizer, tmp_path):
    with pytest.raises(ZerotrainError, match=r"is a single-turn mapping, for sft data, but the data is pref"):
        prepare("pref", [str(tmp_path / "x.jsonl")], tokenizer, tmp_path / "p", columns="prompt=q,response=a")
    with pytest.raises(ZerotrainError, match=r"pretraining records are read from their \"text\" field"):
        prepare("pretrain", [str(tmp_path / "x.jsonl")], tokenizer, tmp_path / "p", columns="prompt=q,response=a")


def test_a_record_without_a_mapped_field_names_file_line_and_the_fields_present(tokenizer, tmp_path):
    records = [renamed_dolly(r) for r in DOLLY]
    del records[1]["a"]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    columns = "prompt=q,input=ctx,response=a"
    with pytest.raises(ZerotrainError, match=r"d.jsonl:2: the record has no field 'a' \(named by --columns\); it has "
                                             r"\['ctx', 'q', 'tag'\].*--skip-bad-lines"):
        prepare("sft", [str(path)], tokenizer, tmp_path / "p", seq_len=64, show_progress=False, columns=columns)
    meta = prepare("sft", [str(path)], tokenizer, tmp_path / "p", seq_len=64, val_fraction=0.0,
                   skip_bad_lines=True, show_progress=False, columns=columns)
    assert meta["stats"]["bad_lines"] == 1 and meta["splits"]["train"]["examples"] == 3

    turns = dialog(OPENAI[0])
    turns["dialog"][1] = {"speaker": "human", "words": "Hi"}
    path = write_jsonl(tmp_path / "m.jsonl", [dialog(OPENAI[1]), turns])
    columns = parse_columns(MESSAGE_LIST_COLUMNS)
    with pytest.raises(ZerotrainError, match=r"m.jsonl:2: dialog\[1\] has no field 'text' \(named by --columns\); "
                                             r"it has \['speaker', 'words'\]"):
        list(read_conversations(path, columns=columns))
    stats = ReadStats()
    assert len(list(read_conversations(path, skip_bad_lines=True, stats=stats, columns=columns))) == 1
    assert stats.bad_lines == 1

    pairs = [renamed_pair(r) for r in PAIRS]
    del pairs[0]["bad"]
    path = write_jsonl(tmp_path / "p.jsonl", pairs)
    with pytest.raises(ZerotrainError, match=r"p.jsonl:1: the record has no field 'bad' \(named by --columns\); it "
                                             r"has \['good', 'question', 'sys'\]"):
        list(read_pairs(path, columns=parse_columns(PAIR_COLUMNS)))
    path = write_jsonl(tmp_path / "s.jsonl", [renamed_pair(PAIRS[0])])
    with pytest.raises(ZerotrainError, match=r"s.jsonl:1: 'good' holds a str, not a message list.*add prompt=FIELD"):
        list(read_pairs(path, columns=parse_columns("chosen=good,rejected=bad")))


def test_eval_reads_a_mapped_file_as_training_does(base_model_dir, tmp_path, capsys):
    import json

    from engine.apps.cli import main

    native = write_jsonl(tmp_path / "dolly.jsonl", DOLLY)
    renamed = write_jsonl(tmp_path / "renamed.jsonl", [renamed_dolly(r) for r in DOLLY])
    results = []
    for path, flags in ((native, []), (renamed, ["--columns", "prompt=q,input=ctx,response=a"])):
        assert main(["eval", "--model", str(base_model_dir), "--data", str(path), "--seq-len", "64", "--json",
                     *flags]) == 0
        results.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert results[0]["kind"] == results[1]["kind"] == "sft"
    assert results[0]["tokens"] == results[1]["tokens"] > 0 and results[0]["loss"] == results[1]["loss"]


def test_a_mapping_given_with_a_prepared_directory_must_be_the_one_it_was_prepared_with(tokenizer_dir, tmp_path):
    from engine.objectives.causal_lm import SFT
    from engine.training.plan import plan_run
    from model.tokenizer import load_tokenizer

    renamed = write_jsonl(tmp_path / "renamed.jsonl", [renamed_dolly(r) for r in DOLLY])
    columns = "prompt=q,input=ctx,response=a"
    prepare("sft", [str(renamed)], load_tokenizer(str(tokenizer_dir)), tmp_path / "p", seq_len=64,
            show_progress=False, columns=columns)
    argv = ["--data", str(tmp_path / "p"), "--tokenizer", str(tokenizer_dir), "--seq-len", "64",
            "--output-dir", str(tmp_path / "run")]
    for same in ([], ["--columns", "response=a,prompt=q,input=ctx"]):  # none, or the same in another order
        plan_run(parse_config(argv + same), SFT, 1)
    with pytest.raises(ZerotrainError, match="prepared with --columns 'input=ctx,prompt=q,response=a': drop"):
        plan_run(parse_config(argv + ["--columns", "prompt=q,response=a"]), SFT, 1)
