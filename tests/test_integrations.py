"""fastsft.integrations.transformers: a patched transformers model must train exactly like the unpatched one.

The reference is always transformers itself: the same tiny random model, deep-copied before patching, run with its
own RMSNorm and its own ForCausalLMLoss on materialized logits (fp32). Padding-free batches are also checked
against each sequence run on its own, and gradient accumulation against one big batch.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from transformers import (
    DataCollatorWithFlattening,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from fastsft.integrations import transformers as fit
from fastsft.ops import RMSNorm

VOCAB = 96
ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}
TOL = dict(rtol=1e-5, atol=1e-6)


def tiny_model(arch: str = "llama", tie_word_embeddings: bool = False):
    config_class, model_class = ARCHS[arch]
    config = config_class(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, tie_word_embeddings=tie_word_embeddings,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    model = model_class(config)
    # Norm weights start at exactly 1: make them random so a wrongly wired norm cannot pass.
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__.endswith("RMSNorm"):
                module.weight.uniform_(0.5, 1.5)
    return model.float().train()


def reference_and_patched(arch: str = "llama", **kw):
    reference = tiny_model(arch, **kw)
    patched = fit.apply(copy.deepcopy(reference))
    return reference, patched


def random_features(lengths, prompt_lengths):
    """Tokenized examples as a collator sees them: labels = input_ids with the prompt masked."""
    features = []
    for length, prompt in zip(lengths, prompt_lengths, strict=True):
        ids = torch.randint(3, VOCAB, (length,)).tolist()
        features.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return features


def padded_batch(features):
    """Right-padded batch: attention_mask 0 and labels -100 on padding."""
    width = max(len(f["input_ids"]) for f in features)
    input_ids = torch.zeros(len(features), width, dtype=torch.long)
    labels = torch.full((len(features), width), -100, dtype=torch.long)
    attention_mask = torch.zeros(len(features), width, dtype=torch.long)
    for row, f in enumerate(features):
        n = len(f["input_ids"])
        input_ids[row, :n] = torch.tensor(f["input_ids"])
        labels[row, :n] = torch.tensor(f["labels"])
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    return out, {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_same_loss_and_grads(reference, patched, batch):
    ref_out, ref_grads = loss_and_grads(reference, batch)
    out, grads = loss_and_grads(patched, batch)
    assert out.logits is None  # the point: no [tokens x vocab] tensor on the training path
    assert ref_out.logits is not None
    torch.testing.assert_close(out.loss, ref_out.loss, **TOL)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **TOL, msg=lambda m, n=name: f"grad of {n}: {m}")
    return out.loss


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_patched_model_uses_fastsft_norms_with_the_same_parameters(arch):
    reference, patched = reference_and_patched(arch)
    norms = [name for name, m in patched.named_modules() if isinstance(m, RMSNorm)]
    expected = [name for name, m in reference.named_modules() if type(m).__name__.endswith("RMSNorm")]
    assert norms == expected and norms  # every norm swapped, in place (Qwen3 includes the q/k head norms)
    assert [n for n, _ in patched.named_parameters()] == [n for n, _ in reference.named_parameters()]


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_padded_batch_same_loss_and_grads(arch):
    reference, patched = reference_and_patched(arch)
    batch = padded_batch(random_features([11, 7, 9], [3, 2, 4]))
    assert_same_loss_and_grads(reference, patched, batch)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_padding_free_batch_same_loss_and_grads(arch):
    reference, patched = reference_and_patched(arch)
    batch = DataCollatorWithFlattening()(random_features([9, 6, 12], [2, 3, 1]))
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
    # transformers finds the sequences in position_ids only without a KV cache (the Trainer sets use_cache=False).
    assert_same_loss_and_grads(reference, patched, {**batch, "use_cache": False})


def test_padding_free_equals_sequences_run_one_by_one():
    """Independent of the packing: the flattened row's loss is the token-weighted mean of each sequence alone,
    so no target crosses a sequence boundary and no attention leaks across one. The patched model gets no
    use_cache argument: its training forward defaults it to False, so a hand-written loop is right too."""
    reference, patched = reference_and_patched("llama")
    features = random_features([8, 13, 5], [3, 1, 2])
    packed = patched(**DataCollatorWithFlattening()(features)).loss
    total, count = 0.0, 0
    for f in features:
        ids = torch.tensor([f["input_ids"]])
        labels = torch.tensor([f["labels"]])
        n = int((labels[:, 1:] != -100).sum())
        total = total + reference(input_ids=ids, labels=labels).loss * n
        count += n
    torch.testing.assert_close(packed, total / count, **TOL)


def test_num_items_in_batch_gives_the_big_batch_loss_and_grads():
    """Two micro-batches of different token counts, each divided by the step's count, add up to the one big
    batch: the loss and the gradients the Trainer's gradient accumulation relies on."""
    reference, patched = reference_and_patched("qwen3")
    features = random_features([12, 5, 9, 7], [2, 1, 4, 3])
    big = padded_batch(features)
    micro = [padded_batch(features[:1]), padded_batch(features[1:])]
    num_items = sum((b["labels"][:, 1:] != -100).sum() for b in micro)
    ref_out, ref_grads = loss_and_grads(reference, big)

    patched.zero_grad(set_to_none=True)
    accumulated = 0.0
    for b in micro:
        loss = patched(**b, num_items_in_batch=num_items).loss
        loss.backward()
        accumulated = accumulated + loss.detach()
    torch.testing.assert_close(accumulated, ref_out.loss, **TOL)
    for name, p in patched.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name], **TOL)
    # An int works too (custom loops pass one).
    one = patched(**micro[0], num_items_in_batch=int(num_items)).loss
    assert one.item() < ref_out.loss.item()


def test_tied_embeddings_and_shift_labels():
    reference, patched = reference_and_patched("llama", tie_word_embeddings=True)
    assert patched.lm_head.weight is patched.model.embed_tokens.weight
    batch = padded_batch(random_features([10, 6], [2, 2]))
    assert_same_loss_and_grads(reference, patched, batch)
    # Pre-shifted labels (as context-parallel setups pass) are used as given, not shifted again.
    shift = torch.nn.functional.pad(batch["labels"], (0, 1), value=-100)[:, 1:]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    torch.testing.assert_close(
        patched(**inputs, shift_labels=shift).loss, reference(**batch).loss, **TOL
    )


def test_custom_loss_function_or_wrapped_lm_head_fall_back_to_transformers():
    reference, patched = reference_and_patched("llama")
    batch = padded_batch(random_features([7, 5], [2, 1]))
    patched.loss_function = lambda logits, labels, vocab_size, **kw: logits.float().square().mean()
    out = patched(**batch)
    assert out.logits is not None
    torch.testing.assert_close(out.loss, reference(**batch).logits.float().square().mean(), **TOL)
    del patched._loss_function
    patched.lm_head = torch.nn.Sequential(patched.lm_head)  # stands in for an adapter wrapped around the head
    out = patched(**batch)
    assert out.logits is not None
    torch.testing.assert_close(out.loss, reference(**batch).loss, **TOL)


def test_batch_with_every_target_ignored_gives_zero_not_nan():
    reference, patched = reference_and_patched("llama")
    batch = padded_batch(random_features([6, 5], [6, 5]))  # prompts only: nothing to learn
    assert torch.isnan(reference(**batch).loss)  # transformers: 0 / 0
    loss = patched(**batch).loss
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is None or not p.grad.any() for p in patched.parameters())


def test_logits_when_not_training_with_labels():
    reference, patched = reference_and_patched("mistral")
    batch = padded_batch(random_features([9, 6], [2, 1]))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    torch.testing.assert_close(patched(**inputs).logits, reference(**inputs).logits, **TOL)
    # Eval mode keeps the logits even with labels (compute_metrics needs them); the loss is the same.
    reference.eval(), patched.eval()
    with torch.no_grad():
        out, ref = patched(**batch), reference(**batch)
    torch.testing.assert_close(out.logits, ref.logits, **TOL)
    torch.testing.assert_close(out.loss, ref.loss, **TOL)
    # return_dict=False on the fused path: a tuple starting with the loss.
    patched.train()
    as_tuple = patched(**batch, return_dict=False, use_cache=False)
    assert isinstance(as_tuple, tuple) and as_tuple[0].ndim == 0


def test_generation_unchanged():
    reference, patched = reference_and_patched("qwen2")
    reference.eval(), patched.eval()
    prompt = torch.randint(3, VOCAB, (2, 5))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(prompt))
    torch.testing.assert_close(patched.generate(prompt, **kw), reference.generate(prompt, **kw), rtol=0, atol=0)


def test_save_pretrained_unchanged(tmp_path):
    from safetensors.torch import load_file

    reference, patched = reference_and_patched("qwen3")
    reference.save_pretrained(tmp_path / "reference")
    patched.save_pretrained(tmp_path / "patched")
    saved_ref = load_file(tmp_path / "reference" / "model.safetensors")
    saved = load_file(tmp_path / "patched" / "model.safetensors")
    assert saved.keys() == saved_ref.keys()
    for key in saved_ref:
        torch.testing.assert_close(saved[key], saved_ref[key], rtol=0, atol=0)
    reloaded = Qwen3ForCausalLM.from_pretrained(tmp_path / "patched")
    assert type(reloaded.model.norm).__name__ == "Qwen3RMSNorm"  # a plain checkpoint, nothing of fastsft in it


def test_apply_twice_is_harmless_and_revert_restores():
    reference, patched = reference_and_patched("llama")
    forward = patched.forward
    fit.apply(patched)
    assert patched.forward is forward
    batch = padded_batch(random_features([8, 5], [2, 2]))
    assert_same_loss_and_grads(reference, patched, batch)

    norm_weight = patched.model.norm.weight
    fit.revert(patched)
    assert not fit.is_applied(patched) and "forward" not in patched.__dict__
    assert type(patched.model.norm).__name__ == "LlamaRMSNorm" and patched.model.norm.weight is norm_weight
    out = patched(**batch)
    assert out.logits is not None
    torch.testing.assert_close(out.loss, reference(**batch).loss, **TOL)


def test_patch_survives_pickling_and_deepcopy():
    import pickle

    reference, patched = reference_and_patched("qwen2")
    batch = padded_batch(random_features([8, 6], [2, 3]))
    expected = reference(**batch).loss
    for copied in (pickle.loads(pickle.dumps(patched)), copy.deepcopy(patched)):
        out = copied(**batch)
        assert out.logits is None and copied.forward.model is copied
        torch.testing.assert_close(out.loss, expected, **TOL)
        assert copied(input_ids=batch["input_ids"]).logits is not None  # the original forward, not a loop
        fit.revert(copied)
        assert copied(**batch).logits is not None


def test_rms_norm_only_and_loss_only():
    reference = tiny_model("llama")
    norms_only = fit.apply(copy.deepcopy(reference), loss=False)
    loss_only = fit.apply(copy.deepcopy(reference), rms_norm=False)
    batch = padded_batch(random_features([7, 9], [1, 3]))
    assert norms_only(**batch).logits is not None and isinstance(norms_only.model.norm, RMSNorm)
    assert loss_only(**batch).logits is None and not isinstance(loss_only.model.norm, RMSNorm)
    expected = reference(**batch).loss
    torch.testing.assert_close(norms_only(**batch).loss, expected, **TOL)
    torch.testing.assert_close(loss_only(**batch).loss, expected, **TOL)


def test_unsupported_models_are_refused_with_the_supported_list():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=32))
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel.*LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"):
        fit.apply(gpt2)
    decoder_only = LlamaModel(tiny_model("llama").config)
    with pytest.raises(ValueError, match="expected a LlamaForCausalLM"):
        fit.apply(decoder_only)


# ---------------------------------------------------------------------------------------------------------------
# The transformers Trainer: a few optimizer steps, gradient accumulation on.


def trainer_losses(model, tmp_path, batch_size, accumulation, steps=4):
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(1)
    dataset = random_features(torch.randint(5, 14, (batch_size * accumulation * steps,)).tolist(),
                              torch.randint(1, 4, (batch_size * accumulation * steps,)).tolist())
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
        max_steps=steps, learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=1, report_to="none",
        save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=DataCollatorWithFlattening())
    assert trainer.model_accepts_loss_kwargs  # so the Trainer passes num_items_in_batch to the forward
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_trainer_loss_curve_same_as_unpatched(tmp_path):
    reference, patched = reference_and_patched("llama")
    expected = trainer_losses(reference, tmp_path / "reference", batch_size=2, accumulation=2)
    got = trainer_losses(patched, tmp_path / "patched", batch_size=2, accumulation=2)
    assert len(got) == 4
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-4, atol=1e-5)


def test_trainer_accumulation_equals_one_big_batch(tmp_path):
    """2 micro-batches x 2 sequences per step vs 1 x 4 over the same sampled order: the same losses, only if
    num_items_in_batch reaches the fused loss (micro-batches differ in token count)."""
    model = tiny_model("qwen2")
    accumulated = trainer_losses(fit.apply(copy.deepcopy(model)), tmp_path / "a", batch_size=2, accumulation=2)
    big = trainer_losses(fit.apply(copy.deepcopy(model)), tmp_path / "b", batch_size=4, accumulation=1)
    torch.testing.assert_close(torch.tensor(accumulated), torch.tensor(big), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# The examples: each runs end to end on the demo data, and the patch does not change its loss curve.

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str):
    sys.path.insert(0, str(EXAMPLES))  # trl_sft.py imports hf_trainer.py beside it
    try:
        spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(EXAMPLES))


def test_hf_trainer_example_same_losses_as_unpatched(tmp_path):
    pytest.importorskip("accelerate")
    example = load_example("hf_trainer")
    argv = ["--steps", "3", "--batch-size", "3", "--accumulation", "2", "--output-dir", str(tmp_path)]
    fused = example.main(argv)  # padding-free batches
    plain = example.main([*argv, "--no-fastsft", "--padded"])  # transformers alone, padded batches
    assert len(fused) == 3 and fused[-1] < fused[0]
    torch.testing.assert_close(torch.tensor(fused), torch.tensor(plain), rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="trl not installed (optional)")
def test_trl_example_same_losses_as_unpatched(tmp_path):
    example = load_example("trl_sft")
    argv = ["--steps", "2", "--batch-size", "3", "--accumulation", "2", "--output-dir", str(tmp_path)]
    fused = example.main(argv)
    plain = example.main([*argv, "--no-fastsft"])
    assert len(fused) == 2
    torch.testing.assert_close(torch.tensor(fused), torch.tensor(plain), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# The real kernels: under the Triton interpreter on CPU, and on a GPU in bf16.


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "padding_free"])
def test_triton_kernels_same_loss_and_grads(triton_interpret, padding_free):
    reference, patched = reference_and_patched("qwen3")  # qwen3: also the per-head q/k norms on 4-d inputs
    features = random_features([9, 6, 7], [2, 3, 1])
    batch = {**DataCollatorWithFlattening()(features), "use_cache": False} if padding_free else padded_batch(features)
    num_items = (batch["labels"][:, 1:] != -100).sum() + 5  # as if part of a bigger accumulated step
    batch["num_items_in_batch"] = num_items
    ref_out, ref_grads = loss_and_grads(reference, batch)
    out, grads = loss_and_grads(patched, batch)
    torch.testing.assert_close(out.loss, ref_out.loss, rtol=1e-4, atol=1e-5)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-3, atol=1e-5,
                                   msg=lambda m, n=name: f"grad of {n}: {m}")


@pytest.mark.gpu
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_gpu_bf16_close_to_transformers(arch):
    """bf16 on CUDA: the kernels against transformers' own bf16 forward. Tolerances are those of bf16 rounding
    (fastsft normalizes and scales in fp32 before one rounding; transformers rounds twice)."""
    reference, patched = reference_and_patched(arch)
    reference, patched = reference.to("cuda", torch.bfloat16), patched.to("cuda", torch.bfloat16)
    features = random_features([200, 130, 170], [20, 40, 10])
    batch = {**DataCollatorWithFlattening()(features), "use_cache": False}
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
    ref_out, ref_grads = loss_and_grads(reference, batch)
    out, grads = loss_and_grads(patched, batch)
    assert out.logits is None
    torch.testing.assert_close(out.loss.float(), ref_out.loss.float(), rtol=2e-2, atol=2e-2)
    for name in ref_grads:
        g, r = grads[name].float(), ref_grads[name].float()
        cosine = torch.nn.functional.cosine_similarity(g.flatten(), r.flatten(), dim=0)
        assert cosine > 0.99, f"grad of {name}: cosine {cosine.item():.4f} to transformers' bf16 gradient"


@pytest.mark.gpu
def test_gpu_patched_training_step_needs_less_memory():
    """The reason to patch: no [tokens x vocab] logits (transformers keeps bf16 logits and their fp32 copy for
    backward). Peak memory of one forward+backward above the weights, patched vs unpatched, same batch."""
    config = LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    reference = LlamaForCausalLM(config).to("cuda", torch.bfloat16).train()
    patched = fit.apply(copy.deepcopy(reference))
    input_ids = torch.randint(0, config.vocab_size, (1, 4096), device="cuda")
    batch = {"input_ids": input_ids, "labels": input_ids, "use_cache": False}

    def peak_bytes(model):
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        model(**batch).loss.backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    peak_bytes(reference), peak_bytes(patched)  # warm-up: kernels compiled, allocator settled
    ref_peak, patched_peak = peak_bytes(reference), peak_bytes(patched)
    print(f"peak above weights: transformers {ref_peak / 2**20:.0f} MiB, fastsft-patched {patched_peak / 2**20:.0f} "
          f"MiB ({patched_peak / ref_peak:.2f}x)")
    assert patched_peak < 0.5 * ref_peak


@pytest.mark.parametrize("use_dora", [False, True])
def test_apply_on_peft_wrapped_model_same_loss_and_adapter_grads(use_dora):
    """apply(get_peft_model(model)) patches the transformers model inside the PEFT wrapper: fastsft norms and fused
    loss run under LoRA/DoRA layers, with the loss and every adapter gradient of the unpatched PEFT model."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                "up_proj", "down_proj"], use_dora=use_dora)
    reference = peft.get_peft_model(tiny_model("qwen3"), config)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)
    patched = copy.deepcopy(reference)
    assert fit.apply(patched) is patched and fit.is_applied(patched)
    assert any(isinstance(m, RMSNorm) for m in patched.modules())
    batch = padded_batch(random_features([9, 13], [3, 4]))
    results = []
    for model in (reference, patched):
        out = model(**batch)
        out.loss.backward()
        results.append((out, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (ref_out, ref_grads), (out, grads) = results
    assert out.logits is None and ref_out.logits is not None  # the fused loss really ran under PEFT
    torch.testing.assert_close(out.loss, ref_out.loss, **TOL)
    assert grads.keys() == ref_grads.keys() and any("lora_A" in n for n in grads)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **TOL, msg=lambda m, n=name: f"grad of {n}: {m}")
    fit.revert(patched)
    assert not fit.is_applied(patched) and not any(isinstance(m, RMSNorm) for m in patched.modules())
