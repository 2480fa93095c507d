import json

import pytest

from common.errors import ZerotrainError
from engine.config.deepspeed import DS_CONFIG_DIR, fill_ds_config, load_ds_config
from engine.config.parse import parse_config
from engine.config.precision import resolve_precision
from engine.training.build import lr_lambda, param_groups


def filled(argv, world_size=2, precision="bf16", device_type="cpu", raw=None):
    cfg = parse_config(argv + ["--output-dir", "out"])
    raw = raw if raw is not None else load_ds_config(cfg)[0]
    return fill_ds_config(raw, cfg, world_size=world_size, precision=precision, device_type=device_type)


@pytest.mark.parametrize("path", sorted(DS_CONFIG_DIR.glob("*.json")), ids=lambda p: p.name)
def test_every_shipped_config_is_filled_from_the_run_config(path):
    ds = filled(["--ds-config", str(path), "--micro-batch-size", "3", "--grad-accum", "2", "--lr", "1e-3",
                 "--grad-clip", "0.5", "--weight-decay", "0.05"], world_size=2)
    assert "auto" not in json.dumps(ds)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (3, 2, 12)
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    params = ds["optimizer"]["params"]
    assert params["lr"] == 1e-3 and params["weight_decay"] == 0.05 and params["betas"] == [0.9, 0.95]
    offloaded = "offload" in path.name
    assert params.get("torch_adam", False) is (not offloaded)


def test_zero_stage_flag_overrides_the_file_and_picks_the_default_file():
    assert filled(["--zero-stage", "3"])["zero_optimization"]["stage"] == 3
    assert filled([])["zero_optimization"]["stage"] == 2  # default: ds_configs/zero2.json
    ds = filled(["--ds-config", str(DS_CONFIG_DIR / "zero3_offload.json"), "--zero-stage", "2"])
    assert ds["zero_optimization"]["stage"] == 2 and ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


def test_a_literal_that_disagrees_is_an_error_naming_the_key():
    raw = {"train_batch_size": 64, "train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 1}}
    with pytest.raises(ZerotrainError, match=r'"train_batch_size" is 64 but the run config gives 16'):
        filled(["--micro-batch-size", "8"], world_size=2, raw=raw)
    raw = {"train_batch_size": 16, "gradient_clipping": 1.0, "optimizer": {"type": "AdamW", "params": {"lr": 0.1}}}
    with pytest.raises(ZerotrainError, match=r'"optimizer.params.lr" is 0.1 but the run config gives 0.0005 \(--lr\)'):
        filled(["--micro-batch-size", "8"], world_size=2, raw=raw)
    agreeing = filled(["--micro-batch-size", "8"], world_size=2, raw={"train_batch_size": 16})
    assert agreeing["train_batch_size"] == 16
    with pytest.raises(ZerotrainError, match=r'"zero_optimization.stage" is 4|stages 0-3'):
        filled([], raw={"zero_optimization": {"stage": 4}})
    with pytest.raises(ZerotrainError, match=r'"scheduler.params.warmup" is "auto" but zerotrain has nothing'):
        filled([], raw={"scheduler": {"params": {"warmup": "auto"}}})


def test_global_batch_that_does_not_divide_fails_before_deepspeed():
    with pytest.raises(ZerotrainError, match=r"global_batch_size is 10 but .* = 4 x 1 x 3 = 12"):
        filled(["--micro-batch-size", "4", "--global-batch-size", "10"], world_size=3)


def test_precision_resolution():
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ZerotrainError, match="fp16 needs a GPU"):
        resolve_precision("fp16", "cpu")


def test_fp16_uses_dynamic_loss_scaling_and_bf16_no_scaler():
    fp16 = filled([], precision="fp16", device_type="cuda")
    assert fp16["fp16"]["enabled"] is True and fp16["fp16"]["loss_scale"] == 0  # 0 = dynamic
    assert fp16["bf16"]["enabled"] is False
    bf16 = filled([], precision="bf16")
    assert bf16["fp16"]["enabled"] is False and bf16["bf16"]["enabled"] is True  # no loss scaler with bf16
    assert fp16["optimizer"]["params"]["fused"] is True


def test_missing_ds_config_and_monitors(tmp_path):
    with pytest.raises(ZerotrainError, match=r"nope.json does not exist.*zero2.json"):
        filled(["--ds-config", str(tmp_path / "nope.json")])
    (tmp_path / "bad.json").write_text("{\n  'x': 1\n}")
    with pytest.raises(ZerotrainError, match=r"bad.json:2: invalid JSON"):
        filled(["--ds-config", str(tmp_path / "bad.json")])
    ds = filled(["--report-to", "csv", "tensorboard"])
    assert ds["csv_monitor"] == {"enabled": True, "output_path": "out/monitor", "job_name": "zerotrain"}
    assert ds["tensorboard"]["enabled"] is True


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = parse_config(["--max-steps", "100", "--warmup-steps", "10", "--min-lr-ratio", "0.1"])
    f = lr_lambda(cfg)
    assert [f(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.55) and f(100) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 120))


def test_no_weight_decay_on_norms_biases_and_embeddings():
    from transformers import GPT2Config, GPT2LMHeadModel

    from model.build import build_model

    llama = build_model("debug", vocab_size=128)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32))
    for model in (llama, gpt2):
        decay, no_decay = param_groups(model, 0.1)
        names = {id(p): n for n, p in model.named_parameters()}
        decayed = {names[id(p)] for p in decay["params"]}
        assert decayed and not any(word in n for n in decayed
                                   for word in ("norm", "ln_", "bias", "embed", "wte", "wpe")), decayed
        assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1
        assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
