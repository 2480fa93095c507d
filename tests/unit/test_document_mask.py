"""--document-mask: a pretraining window's documents attend only to themselves, at the positions
they would have alone (Llama 3's document mask), and the run's trained tokens do not change."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import model.attention  # noqa: F401  registers zerotrain_sdpa
from common.errors import ZerotrainError
from engine.config.parse import parse_config
from engine.data.collate import collate_packed, collate_stack
from engine.data.prepare import prepare
from engine.data.text import PretrainDataset, document_positions
from model.presets import preset_config

EOS = 2


def test_positions_restart_after_every_end_of_document():
    window = torch.tensor([[7, 8, EOS, 9, 9, 9, EOS, EOS, 5],
                           [EOS, 4, 4, 4, 4, 4, 4, 4, 4]])
    assert document_positions(window, EOS).tolist() == [[0, 1, 2, 0, 1, 2, 3, 0, 0],
                                                         [0, 0, 1, 2, 3, 4, 5, 6, 7]]
    assert document_positions(window[1, 1:], EOS).tolist() == list(range(8))  # no boundary: plain positions


def small_model(arch: str, attn: str) -> torch.nn.Module:
    shape = {"llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2),
             "gpt2": dict(n_embd=64, n_layer=2, n_head=4)}[arch]
    preset = {"llama": "debug", "gpt2": "gpt2-124m"}[arch]
    config = preset_config(preset, vocab_size=97, max_seq_len=64, **shape)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager", "zerotrain_sdpa"])  # the last: model.attention, one document a call
def test_a_masked_window_gives_each_document_its_logits_alone(arch, attn):
    model = small_model(arch, attn)
    generator = torch.Generator().manual_seed(1)
    # a window cut from a stream: the tail of one document, two whole ones, the head of a fourth
    docs = [torch.cat([torch.randint(3, 97, (n - 1,), generator=generator), torch.tensor([EOS])]) for n in (6, 9, 4)]
    docs.append(torch.randint(3, 97, (5,), generator=generator))
    window = torch.cat(docs)[None]
    with torch.no_grad():
        masked = model(input_ids=window, position_ids=document_positions(window, EOS), use_cache=False).logits[0]
        unmasked = model(input_ids=window, use_cache=False).logits[0]
        at = 0
        for doc in docs:
            alone = model(input_ids=doc[None], use_cache=False).logits[0]
            torch.testing.assert_close(masked[at:at + len(doc)], alone, rtol=1e-5, atol=1e-5)
            at += len(doc)
    # without the mask the later documents see the earlier ones: the check above can fail
    assert not torch.allclose(unmasked[6:15], masked[6:15], atol=1e-3)


@pytest.fixture(scope="module")
def windows(tmp_path_factory, tokenizer):
    out = tmp_path_factory.mktemp("docmask") / "p"
    source = out.parent / "docs.txt"
    source.write_text("\n\n".join(f"document {i} " + "word " * (3 + i % 7) for i in range(60)))
    prepare("pretrain", [str(source)], tokenizer, out, show_progress=False)
    return out, tokenizer.eos_token_id


def test_the_dataset_marks_documents_and_the_collates_keep_them(windows):
    out, eos = windows
    plain, masked = PretrainDataset(out, "train", 16), PretrainDataset(out, "train", 16, document_eos=eos)
    items = [masked[i] for i in range(4)]
    assert all(torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
               for a, b in zip(items, (plain[i] for i in range(4))))  # the same tokens and targets
    assert any((item["input_ids"][:-1] == eos).any() for item in items)
    for item in items:
        assert torch.equal(item["position_ids"], document_positions(item["input_ids"], eos))
    assert torch.equal(collate_stack(items)["position_ids"], torch.stack([i["position_ids"] for i in items]))
    # mixed with SFT examples under --pack, a window keeps its own restarting positions
    sft = {"input_ids": torch.arange(3, 8), "labels": torch.arange(3, 8)}
    packed = collate_packed([items[0], sft], seq_len=32, pad_id=0)
    assert packed["position_ids"][0, :16].tolist() == items[0]["position_ids"].tolist()
    assert packed["position_ids"][0, 16:21].tolist() == list(range(5))


def test_document_mask_is_refused_where_it_cannot_apply(tmp_path, tokenizer_dir):
    from engine.objectives.causal_lm import PRETRAIN, SFT
    from engine.training.plan import plan_run

    text, chats = tmp_path / "a.txt", tmp_path / "c.jsonl"
    text.write_text("one document\n\nanother\n")
    chats.write_text('{"instruction": "hi", "output": "hello"}\n')
    base = ["--tokenizer", str(tokenizer_dir), "--seq-len", "16", "--output-dir", str(tmp_path / "run"),
            "--document-mask"]
    plan_run(parse_config(base + ["--data", str(text)]), PRETRAIN, 1)
    plan_run(parse_config(base + ["--pack", "--data", f"pretrain:{text}:0.5", f"sft:{chats}:0.5"]), PRETRAIN, 1)
    with pytest.raises(ZerotrainError, match="this run has sft data only.*drop --document-mask"):
        plan_run(parse_config(base + ["--data", str(chats)]), SFT, 1)
    with pytest.raises(ZerotrainError, match="mixed needs --pack"):
        plan_run(parse_config(base + ["--data", f"pretrain:{text}:0.5", f"sft:{chats}:0.5"]), PRETRAIN, 1)
