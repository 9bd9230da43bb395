"""fastsft.adapters against PEFT: LoRA and DoRA loss and every adapter gradient equal PEFT's on tiny transformers
Llama and Qwen3 models (fp32, packed rows, each document alone in PEFT); step 0 is the base; merged equals unmerged;
adapter directories go both ways between fastsft and PEFT; QLoRA's NF4 weights equal torchao's and an independent
float64 NF4 reference, and its forward equals LoRA on the dequantized weights; one compilation; activation
checkpointing; memory accounting of the Llama-3-8B shape on the meta device.

The reference models are transformers' own *ForCausalLM from a tiny random config saved to a temporary directory,
wrapped by peft.get_peft_model; fastsft loads the same directory with Transformer.from_pretrained.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend

peft = pytest.importorskip("peft")
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM  # noqa: E402

from fastsft.adapters.config import BLOCK_LINEARS, AdapterSection  # noqa: E402
from fastsft.adapters.lora import (  # noqa: E402
    LoRALinear,
    QuantizedLinear,
    apply_adapters,
    check_nf4_shardable,
    dense_weight,
    merge_adapters,
    nf4_scaler_block_size,
    parameter_bytes,
    storage_bytes,
)
from fastsft.adapters.peft_io import (  # noqa: E402
    load_peft_adapter,
    peft_state_dict,
    save_peft_adapter,
    section_from_adapter_dir,
)
from fastsft.data.batch import IGNORE_INDEX, LOSS_POSITION_FILL, PAD_ID, Batch  # noqa: E402
from fastsft.hf_checkpoint import config_from_hf, load_pretrained  # noqa: E402
from fastsft.model import Transformer  # noqa: E402

VOCAB = 96
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM, dict(attention_bias=True)),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(tie_word_embeddings=True)),
}
DOCS = [9, 14, 6]  # one packed row of three documents


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def packed_row(docs: list[list[int]], seq_len: int, max_docs: int = 4) -> Batch:
    """The batch contract (fastsft/data/batch.py) for documents back to back, every token but each first supervised."""
    input_ids = torch.full((seq_len,), PAD_ID, dtype=torch.int64)
    position_ids = torch.zeros(seq_len, dtype=torch.int32)
    labels = torch.full((seq_len,), IGNORE_INDEX, dtype=torch.int64)
    ends, start = [], 0
    for doc in docs:
        n = len(doc)
        input_ids[start:start + n] = torch.tensor(doc)
        position_ids[start:start + n] = torch.arange(n, dtype=torch.int32)
        labels[start:start + n - 1] = torch.tensor(doc[1:])
        start += n
        ends.append(start)
    if start < seq_len:
        position_ids[start:] = torch.arange(seq_len - start, dtype=torch.int32)
        ends.append(seq_len)
    cu = [0] + ends + [seq_len] * (max_docs + 1 - len(ends))
    positions = (labels != IGNORE_INDEX).nonzero().flatten().to(torch.int32)
    loss_positions = torch.full((seq_len,), LOSS_POSITION_FILL, dtype=torch.int32)
    loss_positions[: len(positions)] = positions
    return Batch(input_ids=input_ids, position_ids=position_ids, labels=labels,
                 cu_seqlens=torch.tensor(cu, dtype=torch.int32), max_seqlen=seq_len, loss_positions=loss_positions,
                 num_loss_tokens=len(positions), num_tokens=start, num_docs=len(docs))


def random_docs(lengths, generator=None):
    return [torch.randint(1, VOCAB, (n,), generator=generator).tolist() for n in lengths]


def make_hf(arch: str, tmp_path):
    """A tiny transformers model with spread random weights (every parameter matters), saved to tmp_path/hf."""
    config_cls, model_cls, overrides = ARCHS[arch]
    model = model_cls(config_cls(**{**SMALL, **overrides})).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.3 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "hf")
    return model


def randomize_adapters(named_params, skip=()):
    """Give every adapter tensor non-trivial values (B is zero and m = ||W|| at init, which would hide bugs)."""
    with torch.no_grad():
        for name, p in named_params:
            if "lora_A" in name or "lora_B" in name:
                p.copy_(0.2 * torch.randn_like(p))
            elif "magnitude" in name:
                p.mul_(1.0 + 0.3 * torch.rand_like(p))


def peft_reference(arch: str, tmp_path, use_dora: bool, modules_to_save=None, rank: int = 4):
    hf = make_hf(arch, tmp_path)
    config = peft.LoraConfig(r=rank, lora_alpha=2.0 * rank + 3, lora_dropout=0.0, target_modules=list(BLOCK_LINEARS),
                             use_dora=use_dora, modules_to_save=modules_to_save)
    model = peft.get_peft_model(hf, config)
    randomize_adapters(model.named_parameters())
    if modules_to_save:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "modules_to_save" in name:
                    p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "peft")
    return model


def ours_from_peft(tmp_path, method: str) -> Transformer:
    model = load_pretrained(tmp_path / "hf")
    section = section_from_adapter_dir(tmp_path / "peft", model, AdapterSection(method=method))
    apply_adapters(model, section)
    load_peft_adapter(model, tmp_path / "peft")
    return model


def dequantized_base(quantized: Transformer, hf_dir) -> Transformer:
    """The base model of `hf_dir` with every block linear replaced by the dequantized NF4 weight of `quantized`."""
    model = load_pretrained(hf_dir)
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, (LoRALinear, QuantizedLinear)):
                model.get_submodule(name).weight.copy_(dense_weight(module.weight))
    return model


def reference_loss(peft_model, docs) -> torch.Tensor:
    """Each document alone through PEFT; summed token losses over the row's supervised-token count."""
    total, count = 0.0, 0
    for doc in docs:
        logits = peft_model(input_ids=torch.tensor([doc])).logits[0]
        total = total + F.cross_entropy(logits[:-1].float(), torch.tensor(doc[1:]), reduction="sum")
        count += len(doc) - 1
    return total / count


def peft_grads(peft_model) -> dict[str, torch.Tensor]:
    from fastsft.adapters.peft_io import _strip_adapter_name

    return {_strip_adapter_name(n): p.grad for n, p in peft_model.named_parameters() if p.requires_grad}


def our_grads(model) -> dict[str, torch.Tensor]:
    from fastsft.adapters.peft_io import peft_state_dict_names

    return {key: model.get_parameter(name).grad for key, name in peft_state_dict_names(model).items()}


# ---------------------------------------------------------------------------------------------------------------
# Equal to PEFT
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_loss_and_every_adapter_gradient_equal_peft(arch, method, tmp_path):
    """Packed row of three documents in fastsft, each document alone in PEFT; loading PEFT's saved adapter
    directory is the PEFT -> fastsft direction of the round trip. Llama carries q/k/v/o biases and a fully trained
    lm_head (modules_to_save); Qwen3 ties its embeddings and has q/k norms."""
    modules_to_save = ["lm_head"] if arch == "llama" else None
    reference = peft_reference(arch, tmp_path, use_dora=method == "dora", modules_to_save=modules_to_save)
    ours = ours_from_peft(tmp_path, method)
    assert sum(isinstance(m, LoRALinear) for m in ours.modules()) == 7 * SMALL["num_hidden_layers"]

    docs = random_docs(DOCS)
    ref_loss = reference_loss(reference, docs)
    ref_loss.backward()
    our_loss = ours.loss(packed_row(docs, seq_len=36))
    our_loss.backward()
    assert rel_err(our_loss, ref_loss) < 1e-5

    ref, got = peft_grads(reference), our_grads(ours)
    assert set(got) == set(ref), set(got) ^ set(ref)
    kinds = {key.rsplit(".", 2)[-2] if key.endswith(".weight") else key.rsplit(".", 1)[-1] for key in got}
    expected_kinds = {"lora_A", "lora_B"} | ({"lora_magnitude_vector"} if method == "dora" else set())
    assert expected_kinds <= kinds
    for key in ref:
        assert ref[key].abs().max() > 0, key  # every gradient is live: the comparison cannot pass vacuously
        assert rel_err(got[key], ref[key]) < 1e-5, key
    # frozen: no gradient anywhere else
    for name, p in ours.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name


def test_step0_equals_base_exactly(tmp_path):
    """Fresh adapters (A kaiming-uniform, B zero, m = ||W||): logits equal the base bit for bit (LoRA, QLoRA vs
    its dequantized base) and to rounding for DoRA (m / ||W|| is 1 up to the last bit)."""
    make_hf("llama", tmp_path)
    ids = random_docs([21])[0]
    row = dict(input_ids=torch.tensor(ids), position_ids=torch.arange(21, dtype=torch.int32),
               cu_seqlens=torch.tensor([0, 21], dtype=torch.int32), max_seqlen=21)
    base = load_pretrained(tmp_path / "hf")
    with torch.no_grad():
        expected = base.logits(**row)
        for method in ("lora", "dora"):
            model = apply_adapters(load_pretrained(tmp_path / "hf"), AdapterSection(method=method, rank=8))
            assert model.layers[0].self_attn.q_proj.lora_A.abs().max() > 0  # A is random, B is what makes it zero
            got = model.logits(**row)
            if method == "lora":
                assert torch.equal(got, expected)
            else:
                assert rel_err(got, expected) < 1e-6
        quantized = apply_adapters(load_pretrained(tmp_path / "hf"), AdapterSection(method="qlora"))
        dequantized = dequantized_base(quantized, tmp_path / "hf")
        assert torch.equal(quantized.logits(**row), dequantized.logits(**row))


@pytest.mark.parametrize("method", ["lora", "dora", "qlora"])
def test_merged_equals_unmerged(method, tmp_path):
    make_hf("llama", tmp_path)
    model = apply_adapters(load_pretrained(tmp_path / "hf"),
                           AdapterSection(method=method, rank=4, use_rslora=method == "dora"))
    randomize_adapters(model.named_parameters())
    docs = random_docs([11, 7])
    batch = packed_row(docs, seq_len=20)
    with torch.no_grad():
        unmerged = model.logits(**batch.model_inputs())
        merged_model = merge_adapters(model)  # in place: the unmerged logits are already taken
        assert not any(isinstance(m, (LoRALinear, QuantizedLinear)) for m in merged_model.modules())
        merged = merged_model.logits(**batch.model_inputs())
        base = load_pretrained(tmp_path / "hf").logits(**batch.model_inputs())
    assert rel_err(unmerged, base) > 1e-2  # the adapters really change the output
    assert rel_err(merged, unmerged) < 1e-5


# ---------------------------------------------------------------------------------------------------------------
# PEFT round trip: fastsft -> PEFT
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,method,targets,modules_to_save", [
    ("llama", "lora", list(BLOCK_LINEARS), ["lm_head"]),
    ("qwen3", "dora", list(BLOCK_LINEARS), []),
    ("llama", "lora", ["layers.0.self_attn.q_proj", "v_proj", "layers.1.mlp.*"], ["layers.1.input_layernorm"]),
])
def test_export_loads_in_peft_with_same_logits(arch, method, targets, modules_to_save, tmp_path):
    from peft.utils import load_peft_weights, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    make_hf(arch, tmp_path)
    section = AdapterSection(method=method, rank=4, alpha=6.0, target_modules=targets,
                             modules_to_save=modules_to_save)
    ours = apply_adapters(load_pretrained(tmp_path / "hf"), section)
    randomize_adapters(ours.named_parameters())
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if p.requires_grad and "lora" not in name:
                p.add_(0.1 * torch.randn_like(p))
    save_peft_adapter(ours, section, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "hf"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_dora"] == (method == "dora")

    base = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    reference = peft.PeftModel.from_pretrained(base, tmp_path / "adapter")
    # Load once more explicitly to see PEFT's own accounting of keys.
    result = set_peft_model_state_dict(reference, load_peft_weights(str(tmp_path / "adapter")))
    assert not result.unexpected_keys
    lora_missing = [k for k in result.missing_keys if "lora_" in k or "modules_to_save" in k]
    assert not lora_missing
    expected_adapted = {n for n, m in ours.named_modules() if isinstance(m, LoRALinear)}
    peft_adapted = {n.removeprefix("base_model.model.model.") for n, m in reference.named_modules()
                    if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})}
    assert peft_adapted == expected_adapted

    ids = random_docs([19])[0]
    with torch.no_grad():
        ref_logits = reference(input_ids=torch.tensor([ids])).logits[0]
        our_logits = ours.logits(input_ids=torch.tensor(ids), position_ids=torch.arange(19, dtype=torch.int32),
                                 cu_seqlens=torch.tensor([0, 19], dtype=torch.int32), max_seqlen=19)
    assert rel_err(our_logits, ref_logits) < 1e-5

    # ... and back: the exported directory restores exactly the same tensors in fastsft.
    again = load_pretrained(tmp_path / "hf")
    apply_adapters(again, section_from_adapter_dir(tmp_path / "adapter", again, AdapterSection(method=method)))
    load_peft_adapter(again, tmp_path / "adapter")
    before, after = peft_state_dict(ours), peft_state_dict(again)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_adapter_dir_errors_name_the_problem(tmp_path):
    make_hf("llama", tmp_path)
    model = load_pretrained(tmp_path / "hf")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        section_from_adapter_dir(tmp_path, model, AdapterSection(method="lora"))
    peft_reference("llama", tmp_path, use_dora=True)
    with pytest.raises(ValueError, match="use_dora=true.*adapter.method=dora"):
        section_from_adapter_dir(tmp_path / "peft", model, AdapterSection(method="lora"))
    with pytest.raises(ValueError, match="target_modules.*'qq_proj'"):
        apply_adapters(model, AdapterSection(method="lora", target_modules=["qq_proj"]))
    other = apply_adapters(load_pretrained(tmp_path / "hf"), AdapterSection(method="dora", rank=2))
    with pytest.raises(ValueError, match="shape"):
        load_peft_adapter(other, tmp_path / "peft")


# ---------------------------------------------------------------------------------------------------------------
# QLoRA
# ---------------------------------------------------------------------------------------------------------------

NF4_LEVELS = [-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0, 0.0796, 0.1609, 0.2461, 0.3379,
              0.4407, 0.5626, 0.7230, 1.0]  # the QLoRA paper's NormalFloat4 levels (as torchao tabulates them)


def nf4_reference(weight: torch.Tensor, block: int = 64, scaler_block: int = 256) -> torch.Tensor:
    """The QLoRA recipe in float64: per block of 64 the absmax scale; each weight -> nearest NF4 level of
    weight/absmax; double quantization: the scales minus their mean, int8 (round, clamp) per 256-scale block with
    factor 127.5 / absmax of the block; dequantized = level * (int8 / factor + mean)."""
    w = weight.double().flatten()
    scales = w.view(-1, block).abs().amax(dim=1)
    mean = scales.mean()
    centered = scales - mean
    groups = centered.view(-1, scaler_block)
    factor = 256 / (2 * groups.abs().amax(dim=1, keepdim=True))
    q_scales = (groups * factor).round().clamp(-128, 127)
    scales_back = (q_scales / factor).flatten() + mean
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float64)
    normalized = (w.view(-1, block) / scales[:, None]).flatten()
    codes = (normalized[:, None] - levels[None, :]).abs().argmin(dim=1)
    return (levels[codes].view(-1, block) * scales_back[:, None]).view_as(weight)


def test_qlora_weights_are_nf4_double_quantized(tmp_path):
    from torchao.quantization import to_nf4

    make_hf("llama", tmp_path)
    base = load_pretrained(tmp_path / "hf")
    originals = {n: m.weight.detach().clone() for n, m in base.named_modules()
                 if n.startswith("layers.") and isinstance(m, torch.nn.Linear)}
    model = apply_adapters(base, AdapterSection(method="qlora", target_modules=["q_proj", "v_proj", "*.mlp.*"]))
    seen = 0
    for name, original in originals.items():
        module = model.get_submodule(name)
        assert isinstance(module, LoRALinear if name.endswith(("q_proj", "v_proj")) or ".mlp." in name
                          else QuantizedLinear)
        assert type(module.weight).__name__ == "NF4Tensor" and not module.weight.requires_grad
        got = dense_weight(module.weight)
        library = to_nf4(original, 64, nf4_scaler_block_size(original.numel())).get_original_weight()
        assert torch.equal(got, library), name
        independent = nf4_reference(original, 64, nf4_scaler_block_size(original.numel()))
        assert rel_err(got, independent) < 1e-6, name
        assert 0.01 < rel_err(got, original) < 0.2, name  # really 4-bit, and still the same matrix
        seen += 1
    assert seen == 7 * SMALL["num_hidden_layers"]
    assert model.embed_tokens.weight.dtype == torch.float32  # embeddings and head are not quantized
    with pytest.raises(ValueError, match="blocks of 64"):
        apply_adapters(Transformer.from_config(config_from_hf({"model_type": "llama", **SMALL, "hidden_size": 36, "num_attention_heads": 2, "num_key_value_heads": 2,
                                                "head_dim": 18})), AdapterSection(method="qlora"))


def test_qlora_weights_fsdp_cannot_split_are_named_before_sharding():
    """FSDP2 cuts every NF4 piece into world-size parts; a matrix too small for that is a clear error naming it
    (torchao would assert inside the first all-gather). The two-process run with a wide enough model is in
    tests/test_distributed.py."""
    def quantized(hidden):
        config = config_from_hf({"model_type": "llama", **SMALL, "hidden_size": hidden, "intermediate_size": 2 * hidden,
                                 "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": hidden // 4})
        return apply_adapters(Transformer.from_config(config), AdapterSection(method="qlora"))

    small = quantized(64)  # k_proj 32 x 64 = 2048 weights: 32 blocks, one double-quantization group
    check_nf4_shardable(small, 1)
    with pytest.raises(ValueError, match=r"qlora on 2 processes: layers\.0\.self_attn\.[qk]_proj\.weight .* FSDP "
                                         r"cannot split 2 ways"):
        check_nf4_shardable(small, 2)
    wide = quantized(256)  # every matrix a multiple of 64 x 256 x 2 weights
    check_nf4_shardable(wide, 2)
    with pytest.raises(ValueError, match="split 3 ways"):
        check_nf4_shardable(wide, 3)


def test_qlora_forward_and_gradients_equal_lora_on_dequantized_base(tmp_path):
    make_hf("qwen3", tmp_path)
    qlora = apply_adapters(load_pretrained(tmp_path / "hf"), AdapterSection(method="qlora", rank=4))
    randomize_adapters(qlora.named_parameters())
    lora = dequantized_base(qlora, tmp_path / "hf")
    apply_adapters(lora, AdapterSection(method="lora", rank=4))
    with torch.no_grad():
        for name, p in qlora.named_parameters():
            if p.requires_grad:
                lora.get_parameter(name).copy_(p)
    batch = packed_row(random_docs(DOCS), seq_len=32)
    q_loss, l_loss = qlora.loss(batch), lora.loss(batch)
    q_loss.backward()
    l_loss.backward()
    assert rel_err(q_loss, l_loss) < 1e-6
    for name, p in qlora.named_parameters():
        if p.requires_grad:
            assert rel_err(p.grad, lora.get_parameter(name).grad) < 1e-5, name


# ---------------------------------------------------------------------------------------------------------------
# Speed structure: one compilation, checkpointing, the shared A GEMM
# ---------------------------------------------------------------------------------------------------------------


def tiny_adapted(method: str, dropout: float = 0.0, seed: int = 0, layers: int = 2) -> Transformer:
    torch.manual_seed(seed)
    config = {"model_type": "llama", **SMALL, "num_hidden_layers": layers}
    model = Transformer.from_config(config_from_hf(config), seed=seed)
    apply_adapters(model, AdapterSection(method=method, rank=4, dropout=dropout))
    randomize_adapters(model.named_parameters())
    return model


@pytest.mark.parametrize("method", ["lora", "dora", "qlora"])
def test_one_compilation_fullgraph(method):
    """Training mode with dropout > 0 (the DoRA extra-GEMM path too), fullgraph, 8 document layouts: one graph."""
    from fastsft.train.step import TrainStep, apply_compile, build_optimizer

    model = tiny_adapted(method, dropout=0.1, layers=1)  # one block: the graph is the same, compiles faster
    counter = CompileCounterWithBackend("aot_eager")
    apply_compile(model, "model", backend=counter)
    step = TrainStep(model, build_optimizer(model, lr=1e-3), precision="fp32")
    g = torch.Generator().manual_seed(3)
    for i in range(8):
        lengths = torch.randint(2, 12, (1 + i % 3,), generator=g).tolist()
        metrics = step([packed_row(random_docs(lengths, generator=g), seq_len=36)])
        assert math.isfinite(metrics.loss.item())
    assert counter.frame_count == 1


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_activation_checkpointing_same_gradients_with_dropout(method):
    """Non-reentrant checkpointing replays the dropout mask: gradients equal the plain run's."""
    from fastsft.train.step import apply_activation_checkpointing

    batch = packed_row(random_docs(DOCS), seq_len=32)
    grads = []
    for checkpointed in (False, True):
        model = tiny_adapted(method, dropout=0.2, seed=1)
        if checkpointed:
            apply_activation_checkpointing(model)
        torch.manual_seed(5)
        model.loss(batch).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for name in grads[0]:
        assert rel_err(grads[1][name], grads[0][name]) < 1e-6, name


def test_group_shares_one_a_gemm_and_dropout_only_on_adapter_path():
    """q/k/v and gate/up: one matmul with the concatenated A per group (counted with a dispatch mode), and dropout
    leaves the base path alone: with B = 0 the output is the base output whatever the mask."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountMatmuls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
                self.shapes.append(tuple(args[-1].shape))
            return func(*args, **(kwargs or {}))

    model = tiny_adapted("lora")
    attn = model.layers[0].self_attn
    x = torch.randn(10, SMALL["hidden_size"])
    from fastsft.model import shared_input_projections

    with CountMatmuls() as counter:
        shared_input_projections(x, (attn.q_proj, attn.k_proj, attn.v_proj))
    # 3 base GEMMs + ONE A GEMM [in, 3r] + 3 B GEMMs (addmm into the base output)
    assert len(counter.shapes) == 7
    assert (SMALL["hidden_size"], 12) in counter.shapes

    fresh = apply_adapters(Transformer.from_config(config_from_hf({"model_type": "llama", **SMALL})),
                           AdapterSection(method="lora", rank=4, dropout=0.5))
    mlp = fresh.layers[0].mlp
    fresh.train()
    base_gate = F.linear(x, mlp.gate_proj.weight)
    gate, _ = shared_input_projections(x, (mlp.gate_proj, mlp.up_proj))
    assert torch.equal(gate, base_gate)


# ---------------------------------------------------------------------------------------------------------------
# Memory accounting: Llama-3-8B on the meta device
# ---------------------------------------------------------------------------------------------------------------

LLAMA3_8B = dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                 max_position_embeddings=8192, tie_word_embeddings=False)


def nf4_bytes(numel: int, dtype_bytes: int = 2) -> int:
    """torchao NF4 storage: 4-bit codes, an int8 scaler per 64 weights, a factor per 256 scalers (model dtype),
    the scalers' mean and the 16-entry lookup table (model dtype)."""
    return numel // 2 + numel // 64 + dtype_bytes * (numel // 64 // 256) + dtype_bytes + 16 * dtype_bytes


def test_memory_accounting_llama3_8b_on_meta():
    h, inter, layers, vocab, kv, r = 4096, 14336, 32, 128256, 1024, 16
    shapes = [(h, h), (kv, h), (kv, h), (h, h), (inter, h), (inter, h), (h, inter)]  # q k v o gate up down [out, in]
    linear = layers * sum(o * i for o, i in shapes)
    other = 2 * vocab * h + layers * 2 * h + h  # embeddings, untied head, two norms per block, final norm
    total = linear + other
    assert total == 8_030_261_248  # Llama-3-8B's published parameter count
    adapters = layers * sum(r * (o + i) for o, i in shapes)
    assert adapters == 41_943_040

    config = config_from_hf(LLAMA3_8B)
    with torch.device("meta"):
        full = Transformer(config, dtype=torch.float32)
    assert parameter_bytes(full) == {"parameters": 4 * total, "gradients": 4 * total, "optimizer": 8 * total}

    for method in ("lora", "qlora"):
        with torch.device("meta"):
            model = Transformer(config, dtype=torch.bfloat16)
            apply_adapters(model, AdapterSection(method=method, rank=r))
        base = 2 * linear if method == "lora" else layers * sum(nf4_bytes(o * i) for o, i in shapes)
        expected = {"parameters": base + 2 * other + 4 * adapters, "gradients": 4 * adapters,
                    "optimizer": 8 * adapters}
        assert parameter_bytes(model) == expected, method
        print(f"{method}: " + ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in expected.items()))
    # Full fine-tuning needs ~120 GiB before activations; LoRA ~15.5 GiB; QLoRA ~5.5 GiB.
    assert 4 * total + 4 * total + 8 * total > 119 * 2**30


def test_nf4_storage_formula_matches_torchao():
    from torchao.quantization import to_nf4

    weight = torch.randn(256, 512, dtype=torch.bfloat16)
    assert storage_bytes(to_nf4(weight, 64, 256)) == nf4_bytes(weight.numel())
