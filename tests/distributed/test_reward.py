"""A reward model through launcher/reward.py on 2 ranks (ZeRO-2): trained on the shipped
preference pairs, it ranks held-out pairs it never saw above chance; final/ loads with
transformers' AutoModelForSequenceClassification and scores a conversation rendered with its own
chat template exactly as training scored it; the metrics carry TRL's names."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import PAIRS, metrics, run_launcher

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def reward_run(base_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("reward")
    run_launcher("reward.py", ["--init-from", base_model_dir, "--data", PAIRS, "--output-dir", out / "run",
                               "--seq-len", 128, "--micro-batch-size", 8, "--max-steps", 40, "--lr", "1e-3",
                               "--warmup-steps", 4, "--precision", "fp32", "--zero-stage", 2, "--log-interval", 5,
                               "--eval-interval", 20, "--eval-samples", 96, "--val-fraction", "0.1",
                               "--center-rewards-coefficient", "0.01", "--data-cache-dir", out / "cache"], nproc=2)
    return out / "run"


def test_it_ranks_held_out_pairs_above_chance(reward_run):
    records = metrics(reward_run)
    for name in ("loss", "accuracy", "margin", "rewards/chosen", "rewards/rejected"):
        assert name in records[0], name
    val = [r for r in records if "val_accuracy" in r]
    assert [r["step"] for r in val] == [20, 40]
    assert val[-1]["val_accuracy"] > 0.6 and val[-1]["val_margin"] > 0
    assert val[-1]["val_loss"] < 0.69  # below log 2, where it starts (every score 0 ranks nothing)


def test_final_loads_with_transformers_and_scores_as_training_did(reward_run):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from engine.data.pairs import PrefDataset, collate_pref

    final = reward_run / "final"
    model = AutoModelForSequenceClassification.from_pretrained(final).eval()
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id
    cache = next((reward_run.parent / "cache").glob("pref-*"))
    pairs = PrefDataset(cache, "val", 128)
    # A held-out pair as its raw record, rendered whole by final/'s chat template (one that
    # --seq-len 128 did not cut), and scored both ways.
    rendered = {}
    for line in open(PAIRS):
        text = tokenizer.apply_chat_template(json.loads(line)["chosen"], tokenize=False)
        rendered[tuple(tokenizer(text, add_special_tokens=False)["input_ids"])] = text
    index = next(i for i in range(len(pairs)) if tuple(pairs[i]["chosen_input_ids"].tolist()) in rendered)
    batch = collate_pref([pairs[index], pairs[0]], tokenizer.pad_token_id)  # padded, as in training
    ids = tokenizer(rendered[tuple(pairs[index]["chosen_input_ids"].tolist())], add_special_tokens=False,
                    return_tensors="pt")["input_ids"]
    with torch.no_grad():
        trained = float(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[0, 0])
        alone = float(model(input_ids=ids).logits[0, 0])
    assert alone == pytest.approx(trained, rel=1e-4, abs=1e-5)


def test_grpo_with_the_reward_model_logs_its_scores(reward_run, base_model_dir, tmp_path):
    """launcher/grpo.py --reward-model on 2 ZeRO-3 ranks (the reward model partitioned over them,
    as the policy is): the logged reward of each completion is the whole reward model's score of
    the conversation (prompt + completion) rendered by its own chat template."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"Say {w}."}]}) + "\n"
                               for w in ("hi", "yes", "no", "maybe", "thanks", "bye")))
    flags = ["--init-from", base_model_dir, "--data", prompts, "--output-dir", tmp_path / "grpo",
             "--reward-model", reward_run / "final", "--num-generations", 4, "--micro-batch-size", 8,
             "--max-new-tokens", 8, "--seq-len", 64, "--max-steps", 1, "--log-interval", 1,
             "--precision", "fp32", "--zero-stage", 3, "--data-cache-dir", tmp_path / "cache"]
    proc = run_launcher("grpo.py", flags, nproc=2)
    assert "tensors partitioned over 2 ranks (ZeRO-3)" in proc.stdout
    rows = [json.loads(line) for line in (tmp_path / "grpo" / "rollouts.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and metrics(tmp_path / "grpo")[0]["rewards/reward_model/mean"] is not None
    model = AutoModelForSequenceClassification.from_pretrained(reward_run / "final").eval()
    tokenizer = AutoTokenizer.from_pretrained(reward_run / "final")
    for row in rows[:3] + rows[-3:]:  # both ranks' completions
        text = tokenizer.apply_chat_template(row["prompt"] + [{"role": "assistant", "content": row["completion"]}],
                                             tokenize=False)
        with torch.no_grad():
            score = float(model(**tokenizer(text, add_special_tokens=False, return_tensors="pt")).logits[0, 0])
        assert row["rewards"]["reward_model"] == pytest.approx(score, rel=1e-4, abs=1e-5)
