"""Prompt tuning, P-tuning and prefix tuning in `fastsft train`: the loader reserves the slots, checkpoints hold only
the prompt parameters, resume is bitwise exact on CPU, the evaluation runs with the adapter, `fastsft export` writes
a PEFT directory that PEFT loads with the checkpoint's logits, and `fastsft generate --adapter` agrees."""

from __future__ import annotations

import json
import warnings

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

OPTIONS = {
    "prompt_tuning": dict(adapter__num_virtual_tokens=4),
    "p_tuning": dict(adapter__num_virtual_tokens=3, adapter__encoder_type="lstm", adapter__encoder_hidden_size=8),
    "prefix_tuning": dict(adapter__num_virtual_tokens=5, adapter__prefix_projection="true"),
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_tiny_data(tmp_path_factory.mktemp("data"))[0].parent


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_tiny_base(tmp_path_factory.mktemp("base") / "hf", max_position_embeddings=256)


def prompt_config(out, data_dir, base_dir, method, **extra):
    return tiny_config(out, data_dir, model__path=str(base_dir), adapter__method=method, log__save_steps=2,
                       log__save_total_limit=5, optim__learning_rate=3e-2, **OPTIONS[method], **extra)


@pytest.mark.parametrize("method", list(OPTIONS))
def test_prompt_adapter_run_resumes_exactly(method, tmp_path, data_dir, base_dir):
    straight = tmp_path / "straight"
    summary = Trainer(prompt_config(straight, data_dir, base_dir, method)).fit()
    resumed = tmp_path / "resumed"
    assert stop_after(Trainer(prompt_config(resumed, data_dir, base_dir, method)), 3).fit()["steps"] == 3
    assert Trainer(prompt_config(resumed, data_dir, base_dir, method)).fit()["steps"] == summary["steps"]
    weights = final_weights(straight)
    assert weights and all(name.startswith("prompt_adapter.") for name in weights)
    assert_same_weights(final_weights(resumed), weights)


def test_prompt_run_exports_to_peft_and_generates(tmp_path, data_dir, base_dir, capsys):
    import peft
    from transformers import AutoModelForCausalLM

    from fastsft.cli import main
    from fastsft.train.generate_command import load_model

    run = tmp_path / "run"
    Trainer(prompt_config(run, data_dir, base_dir, "prefix_tuning")).fit()
    checkpoint = ckpt.latest_checkpoint(run)
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "adapter")]) == 0
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PREFIX_TUNING" and config["base_model_name_or_path"] == str(base_dir)
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "merged"), "--merge"]) == 2
    assert "nothing to merge" in capsys.readouterr().err

    ids = list(range(5, 40))
    ours = load_model(checkpoint)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = ours.logits(input_ids=torch.tensor(ids), position_ids=torch.arange(len(ids), dtype=torch.int32),
                               cu_seqlens=torch.tensor([0, len(ids)], dtype=torch.int32), max_seqlen=len(ids))
        base_logits = AutoModelForCausalLM.from_pretrained(base_dir)(torch.tensor([ids])).logits[0]
        reference = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "adapter")
        peft_logits = reference(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids))).logits[0]
    assert (expected - base_logits).abs().max() > 1e-3  # training moved the model
    assert torch.allclose(peft_logits, expected, rtol=1e-5, atol=1e-5)

    assert_generate_with_adapter_equals_checkpoint(checkpoint, base_dir, tmp_path / "adapter", capsys)
