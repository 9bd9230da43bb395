"""Adapters in `fastsft train`: the trainer builds them from the `adapter` section, checkpoints hold only the
trainable tensors and their optimizer state, resume is bitwise exact on CPU, and a run can start from a PEFT adapter
directory."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import (
    assert_generate_with_adapter_equals_checkpoint,
    assert_same_weights,
    final_weights,
    save_tiny_base,
    stop_after,
    tiny_config,
    write_tiny_data,
)

from fastsft.train import checkpoint as ckpt
from fastsft.train.trainer import Trainer



@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_tiny_data(tmp_path_factory.mktemp("data"))[0].parent


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_tiny_base(tmp_path_factory.mktemp("base") / "hf")


def adapter_config(out, data_dir, base_dir, method="lora", **extra):
    return tiny_config(out, data_dir, model__path=str(base_dir), adapter__method=method, adapter__rank=4,
                       log__save_steps=2, log__save_total_limit=5, **extra)


@pytest.mark.parametrize("method", ["lora", "dora", "qlora"])
def test_adapter_checkpoints_hold_only_adapters_and_resume_is_exact(method, tmp_path, data_dir, base_dir):
    straight = tmp_path / "straight"
    Trainer(adapter_config(straight, data_dir, base_dir, method,
                           adapter__modules_to_save=json.dumps(["lm_head"]))).fit()
    resumed = tmp_path / "resumed"
    first = stop_after(Trainer(adapter_config(resumed, data_dir, base_dir, method,
                                              adapter__modules_to_save=json.dumps(["lm_head"]))), 3).fit()
    assert first["steps"] == 3
    second = Trainer(adapter_config(resumed, data_dir, base_dir, method,
                                    adapter__modules_to_save=json.dumps(["lm_head"]))).fit()
    assert second["steps"] == 6

    weights = final_weights(straight)
    kinds = {name.rsplit(".", 1)[-1] for name in weights}
    expected = {"lora_A", "lora_B", "weight"} | ({"lora_magnitude"} if method == "dora" else set())
    assert kinds == expected
    assert [n for n in weights if n.endswith(".weight")] == ["lm_head.weight"]  # the only full module saved
    assert all(t.dtype == torch.float32 for t in weights.values())
    assert any(t.abs().max() > 0 for n, t in weights.items() if n.endswith("lora_B"))  # it trained
    assert_same_weights(final_weights(resumed), weights)
    from safetensors.torch import load_file

    a = load_file(ckpt.latest_checkpoint(resumed) / "state-rank0.safetensors")
    b = load_file(ckpt.latest_checkpoint(straight) / "state-rank0.safetensors")
    assert a.keys() == b.keys() and "rng/torch" in a
    moments = sorted(k for k in a if k.endswith("/exp_avg_sq"))
    assert len(moments) == len(weights)  # the optimizer holds exactly the trainable tensors
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_train_from_peft_adapter_dir_and_bad_options(tmp_path, data_dir, base_dir, capsys):
    import peft
    from transformers import AutoModelForCausalLM

    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                                peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
    model.save_pretrained(tmp_path / "peft")
    trainer = Trainer(adapter_config(tmp_path / "run", data_dir, base_dir, adapter__init_from=str(tmp_path / "peft"),
                                     train__max_steps=1))
    trainer.close()
    adapted = [n for n, m in trainer.model.named_modules() if hasattr(m, "lora_A")]
    assert len(adapted) == 4 and all(n.endswith(("q_proj", "v_proj")) for n in adapted)
    assert trainer.model.layers[1].self_attn.v_proj.lora_A.shape == (2, 32)
    ref = dict(model.named_parameters())["base_model.model.model.layers.1.self_attn.v_proj.lora_B.default.weight"]
    assert torch.equal(trainer.model.layers[1].self_attn.v_proj.lora_B, ref)

    from fastsft.train.run import train

    assert train(adapter_config(tmp_path / "bad", data_dir, base_dir, adapter__target_modules='["qq_proj"]')) == 1
    assert "adapter.target_modules" in capsys.readouterr().err


def test_export_peft_dir_merge_and_generate_with_adapter(tmp_path, data_dir, base_dir, capsys):
    """A trained DoRA run -> `fastsft export` (PEFT directory: PEFT gives the checkpoint's logits) and
    `fastsft export --merge` (full bf16 model: transformers gives them to bf16 rounding); `fastsft generate --model
    BASE --adapter DIR` prints what `fastsft generate --model CHECKPOINT` prints."""
    import peft
    from transformers import AutoModelForCausalLM

    from fastsft.cli import main
    from fastsft.train.generate_command import load_model

    run = tmp_path / "run"
    Trainer(adapter_config(run, data_dir, base_dir, "dora", optim__learning_rate=3e-2)).fit()
    checkpoint = ckpt.latest_checkpoint(run)
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "adapter")]) == 0
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "merged"), "--merge"]) == 0
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] and config["base_model_name_or_path"] == str(base_dir)

    ids = list(range(5, 40))
    ours = load_model(checkpoint)
    with torch.no_grad():
        expected = ours.logits(input_ids=torch.tensor(ids), position_ids=torch.arange(len(ids), dtype=torch.int32),
                               cu_seqlens=torch.tensor([0, len(ids)], dtype=torch.int32), max_seqlen=len(ids))
        base_logits = AutoModelForCausalLM.from_pretrained(base_dir)(torch.tensor([ids])).logits[0]
        reference = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "adapter")
        peft_logits = reference(torch.tensor([ids])).logits[0]
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
        merged_logits = merged(torch.tensor([ids])).logits[0]
    assert (expected - base_logits).abs().max() > 1e-3  # training moved the model
    assert torch.allclose(peft_logits, expected, rtol=1e-5, atol=1e-5)
    assert (merged_logits - expected).abs().max() < 0.05 * expected.abs().max()  # bf16 weights
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["torch_dtype"] == "bfloat16"

    assert_generate_with_adapter_equals_checkpoint(checkpoint, base_dir, tmp_path / "adapter", capsys)
