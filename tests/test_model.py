"""fastsft.model against transformers: logits, loss and gradients of the four supported architectures, packing
without leakage, Hugging Face checkpoints in and out (single file and sharded), config errors, generation.

The reference is transformers' own *ForCausalLM built from a tiny random config (weights re-drawn with a larger
spread and random norm gains so every parameter matters), saved with save_pretrained and loaded by
fastsft.hf_checkpoint.load_pretrained. fp32 on CPU; comparisons by relative error.
"""

import json

import pytest
import torch
from helpers import SMALL, make_batch, random_docs, rel_err, spread_weights
from safetensors.torch import load_file
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from fastsft.generate import generate_batch
from fastsft.hf_checkpoint import ModelDirError, config_from_hf, hf_key_map, load_pretrained, save_pretrained
from fastsft.model import ModelConfig, Transformer

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8}

ARCHS = {
    "llama-gqa-llama3rope": (LlamaConfig, LlamaForCausalLM, dict(rope_scaling=LLAMA3_ROPE, rope_theta=500000.0)),
    "llama-tied-bias": (LlamaConfig, LlamaForCausalLM, dict(tie_word_embeddings=True, attention_bias=True,
                                                             num_key_value_heads=4)),
    "mistral": (MistralConfig, MistralForCausalLM, dict(sliding_window=None)),
    "qwen2-linear-rope": (Qwen2Config, Qwen2ForCausalLM, dict(rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "qwen3-tied": (Qwen3Config, Qwen3ForCausalLM, dict(tie_word_embeddings=True, num_key_value_heads=1)),
}


def hf_model(arch, tmp_path):
    config_cls, model_cls, overrides = ARCHS[arch]
    config = config_cls(**{**SMALL, **overrides})
    model = model_cls(config).float()
    spread_weights(model)
    model.save_pretrained(tmp_path / "hf")
    return model


def single_row(ids):
    n = len(ids)
    return dict(input_ids=torch.tensor(ids), position_ids=torch.arange(n, dtype=torch.int32),
                cu_seqlens=torch.tensor([0, n], dtype=torch.int32), max_seqlen=n)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_logits_loss_grads_match_transformers(arch, tmp_path):
    hf = hf_model(arch, tmp_path)
    ours = load_pretrained(tmp_path / "hf")
    assert ours.config.model_type == hf.config.model_type
    ids = random_docs([29])[0]

    with torch.no_grad():
        ref_logits = hf(torch.tensor([ids])).logits[0]
        our_logits = ours.logits(**single_row(ids))
    assert rel_err(our_logits, ref_logits) < 1e-4

    ref_loss = hf(torch.tensor([ids]), labels=torch.tensor([ids])).loss
    ref_loss.backward()
    our_loss = ours.loss(make_batch([ids], seq_len=len(ids)))
    our_loss.backward()
    assert rel_err(our_loss, ref_loss) < 1e-4
    hf_params = dict(hf.named_parameters())
    for ours_name, hf_name in hf_key_map(ours.config).items():
        assert rel_err(ours.get_parameter(ours_name).grad, hf_params[hf_name].grad) < 1e-4, ours_name


def test_matches_transformers_with_triton_kernels(tmp_path, triton_interpret):
    """The same comparison with the ops' real Triton kernels (interpreter on CPU): the model does not depend on
    how the ops are implemented."""
    hf = hf_model("qwen3-tied", tmp_path)
    ours = load_pretrained(tmp_path / "hf")
    ids = random_docs([21])[0]
    ref_loss = hf(torch.tensor([ids]), labels=torch.tensor([ids])).loss
    ref_loss.backward()
    our_loss = ours.loss(make_batch([ids], seq_len=24))
    our_loss.backward()
    assert rel_err(our_loss, ref_loss) < 1e-4
    hf_params = dict(hf.named_parameters())
    for ours_name, hf_name in hf_key_map(ours.config).items():
        assert rel_err(ours.get_parameter(ours_name).grad, hf_params[hf_name].grad) < 1e-4, ours_name


def test_packed_row_equals_documents_one_by_one(tmp_path):
    hf_model("qwen3-tied", tmp_path)
    model = load_pretrained(tmp_path / "hf")
    docs = random_docs([11, 1, 17])
    batch = make_batch(docs, seq_len=36)  # 7 padding tokens: the tail is its own segment
    packed = model(**batch.model_inputs())
    start = 0
    for doc in docs:
        alone = model(**single_row(doc))
        assert rel_err(packed[start:start + len(doc)], alone) < 1e-5
        start += len(doc)
    # The summed loss of the row is the sum of the documents' summed losses.
    total = model.loss(batch, num_items=1)
    separate = sum(model.loss(make_batch([d], seq_len=len(d)), num_items=1) for d in docs if len(d) > 1)
    assert rel_err(total, separate) < 1e-5


def test_loss_uses_only_supervised_positions(tmp_path):
    hf = hf_model("llama-gqa-llama3rope", tmp_path)
    model = load_pretrained(tmp_path / "hf")
    doc = random_docs([20])[0]
    mask = [t >= 8 for t in range(20)]  # a prompt of 8 tokens without loss
    batch = make_batch([doc], seq_len=24, supervised=[mask], bucket=16)
    labels = torch.tensor([-100] * 8 + doc[8:])
    ref = hf(torch.tensor([doc]), labels=labels[None]).loss
    loss, correct = model.loss(batch, return_num_correct=True)
    assert batch.num_loss_tokens == 12
    assert rel_err(loss, ref) < 1e-4
    with torch.no_grad():
        logits = hf(torch.tensor([doc])).logits[0, 7:19]
    assert correct.item() == (logits.argmax(-1) == torch.tensor(doc[8:])).sum().item()


@pytest.mark.parametrize("arch", ["llama-tied-bias", "qwen2-linear-rope", "qwen3-tied", "mistral"])
def test_save_loads_in_transformers_and_round_trips(arch, tmp_path):
    hf = hf_model(arch, tmp_path)
    ours = load_pretrained(tmp_path / "hf")
    save_pretrained(ours, tmp_path / "ours")
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert type(reloaded) is type(hf)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids = torch.tensor([random_docs([19])[0]])
    with torch.no_grad():
        assert torch.equal(reloaded.float()(ids).logits, hf(ids).logits)
    # Tensors written by us equal transformers' own file byte for byte; load + save again changes nothing.
    ours_tensors = load_file(tmp_path / "ours" / "model.safetensors")
    hf_tensors = load_file(tmp_path / "hf" / "model.safetensors")
    assert ours_tensors.keys() == hf_tensors.keys()
    save_pretrained(load_pretrained(tmp_path / "ours"), tmp_path / "again")
    again = load_file(tmp_path / "again" / "model.safetensors")
    for name, tensor in ours_tensors.items():
        assert tensor.dtype == again[name].dtype == hf_tensors[name].dtype
        assert tensor.numpy().tobytes() == again[name].numpy().tobytes() == hf_tensors[name].numpy().tobytes()
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["model_type"] == hf.config.model_type and config["torch_dtype"] == "float32"


def test_sharded_save_and_load(tmp_path):
    hf = hf_model("llama-gqa-llama3rope", tmp_path)
    model = load_pretrained(tmp_path / "hf")
    save_pretrained(model, tmp_path / "sharded", max_shard_size="20KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and not (tmp_path / "sharded" / "model.safetensors").exists()
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = torch.tensor([random_docs([13])[0]])
    with torch.no_grad():
        assert torch.equal(reloaded.float()(ids).logits, hf(ids).logits)
    ours_again = load_pretrained(tmp_path / "sharded")
    for name, p in model.state_dict().items():
        assert torch.equal(p, ours_again.state_dict()[name]), name


def test_save_is_atomic_and_keeps_other_files(tmp_path):
    model = Transformer.from_config(ModelConfig(**SMALL), seed=1)
    target = tmp_path / "out"
    target.mkdir()
    (target / "tokenizer.json").write_text("{}")
    (target / "model-00001-of-00009.safetensors").write_text("stale shard")
    save_pretrained(model, target, dtype=torch.bfloat16)
    names = sorted(p.name for p in target.iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary directory left behind
    loaded = load_pretrained(target)
    assert loaded.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.embed_tokens.weight, model.embed_tokens.weight.to(torch.bfloat16))


def test_from_config_random_init_like_transformers():
    model = Transformer.from_config(ModelConfig(**SMALL, initializer_range=0.05), seed=3)
    again = Transformer.from_config(ModelConfig(**SMALL, initializer_range=0.05), seed=3)
    for (name, p), q in zip(model.named_parameters(), again.parameters(), strict=True):
        assert torch.equal(p, q), name
    w = model.layers[0].mlp.up_proj.weight
    assert abs(w.std().item() - 0.05) < 0.005 and abs(w.mean().item()) < 0.005
    assert torch.equal(model.norm.weight, torch.ones_like(model.norm.weight))
    hf = LlamaForCausalLM(LlamaConfig(**SMALL))
    assert model.num_parameters() == hf.num_parameters()
    assert model.num_parameters(exclude_embeddings=True) == hf.num_parameters(exclude_embeddings=True)
    assert set(model.state_dict()) == set(hf_key_map(model.config))


@pytest.mark.parametrize("tied", [False, True])
def test_flops_per_token_matches_torch_flop_counter(tied):
    """flops_per_token against torch's own FLOP counter over a real forward + backward of one document: every matmul
    (projections with GQA's narrower k/v, SwiGLU, the head or the tied table) counted by torch. Two conventions of
    the formula are added to the count: the 6 x parameters rule also counts the norm gains (6 per element per token),
    and the counter sees full attention where a causal kernel computes half."""
    model = Transformer.from_config(ModelConfig(**SMALL, tie_word_embeddings=tied), seed=0)
    length = 40
    row = single_row(random_docs([length])[0])
    with FlopCounterMode(display=False) as counter:
        model.logits(**row).sum().backward()
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    assert set(counts) == {"aten.mm", "aten.bmm"}, counts  # projections and head; attention scores and values
    norm_gains = sum(p.numel() for name, p in model.named_parameters() if "norm" in name)
    expected = counts["aten.mm"] + 6 * norm_gains * length + counts["aten.bmm"] // 2
    assert model.flops_per_token(length) * length == expected


def test_bf16_autocast_close_to_fp32(tmp_path):
    hf_model("qwen2-linear-rope", tmp_path)
    model = load_pretrained(tmp_path / "hf")
    batch = make_batch(random_docs([12, 9]), seq_len=24)
    ref = model.loss(batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model.loss(batch)
    assert torch.isfinite(low) and rel_err(low, ref) < 3e-2


def test_generate_greedy_matches_transformers(tmp_path):
    hf = hf_model("llama-gqa-llama3rope", tmp_path)
    model = load_pretrained(tmp_path / "hf")
    prompt = random_docs([7])[0]
    (ours,) = generate_batch(model, [prompt], max_new_tokens=6)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(prompt):].tolist()
    assert ours == ref


def test_config_errors_name_field_and_supported(tmp_path):
    base = LlamaConfig(**SMALL).to_dict()
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported; supported: llama, mistral, qwen2"):
        config_from_hf({**base, "model_type": "gpt2"})
    with pytest.raises(ValueError, match="'yarn' is not supported; supported: none/default, linear, llama3"):
        config_from_hf({**base, "rope_parameters": {"rope_type": "yarn", "factor": 2.0}})
    with pytest.raises(ValueError, match="hidden_act 'gelu'"):
        config_from_hf({**base, "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        config_from_hf({**base, "num_key_value_heads": 3})
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text('{\n  "model_type": "llama",\n  oops\n}')
    with pytest.raises(ValueError, match=r"config.json, line 3, column 3: invalid JSON"):
        load_pretrained(tmp_path / "bad")
    with pytest.raises(ModelDirError, match="config.json not found"):
        load_pretrained(tmp_path / "nowhere")


def test_legacy_rope_config_reads_the_same():
    """transformers 4.x wrote rope_theta + rope_scaling; 5.x writes rope_parameters: both give the same config."""
    legacy = {**SMALL, "model_type": "llama", "rope_theta": 5e5, "rope_scaling": {**LLAMA3_ROPE, "type": "llama3"}}
    modern = {**SMALL, "model_type": "llama", "rope_parameters": {**LLAMA3_ROPE, "rope_theta": 5e5}}
    assert config_from_hf(legacy) == config_from_hf(modern)


def test_missing_and_unexpected_weights_are_listed(tmp_path):
    hf_model("llama-gqa-llama3rope", tmp_path)
    from safetensors.torch import save_file

    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.7.mlp.up_proj.weight"] = torch.randn(2, 2)
    save_file(tensors, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing model.layers.1.mlp.up_proj.weight; "
                                         r"unexpected model.layers.7.mlp.up_proj.weight"):
        load_pretrained(tmp_path / "hf")


def test_sliding_window_shorter_than_rows_is_an_error(tmp_path):
    model = Transformer.from_config(ModelConfig(**SMALL, model_type="mistral", sliding_window=16))
    batch = make_batch(random_docs([10]), seq_len=32)
    with pytest.raises(ValueError, match="sliding_window=16 but max_seqlen=32"):
        model.loss(batch)
    model.loss(make_batch(random_docs([10]), seq_len=16))  # rows within the window are exact


@pytest.mark.gpu
def test_cuda_bf16_matches_cpu_fp32_and_does_not_leak(tmp_path):
    """On the GPU (the fast attention backend, Triton kernels, bf16 autocast): loss close to the CPU fp32 model,
    and a packed row still equals its documents run one by one."""
    hf_model("llama-gqa-llama3rope", tmp_path)
    cpu = load_pretrained(tmp_path / "hf")
    gpu = load_pretrained(tmp_path / "hf", device="cuda")
    docs = random_docs([40, 3, 70])
    batch = make_batch(docs, seq_len=128)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        gpu_loss = gpu.loss(batch.to("cuda"))
        packed = gpu(**batch.to("cuda").model_inputs()).float()
        start = 0
        for doc in docs:
            alone = gpu(**{k: v.cuda() if torch.is_tensor(v) else v for k, v in single_row(doc).items()}).float()
            assert rel_err(packed[start:start + len(doc)], alone) < 2e-2
            start += len(doc)
    assert rel_err(gpu_loss.float().cpu(), cpu.loss(batch)) < 2e-2
