"""Prompt tuning, P-tuning and prefix tuning (fastsft/adapters/prompt.py, prefix.py) against PEFT on transformers.

Reference: PEFT's own PeftModelForCausalLM over the same tiny random transformers Llama (grouped-query attention)
and Qwen3 (q/k norm, tied embeddings), fp32 on CPU, the prompt parameters copied from PEFT's prompt encoder into
ours (same names). Compared: loss and the gradient of every prompt parameter, one document at a time and for packed
rows (each document alone in PEFT), by relative error. Rows with virtual slots are built here from the batch
contract's docstring plus the slot rule of fastsft/adapters/prompt.py, not by the loader.
"""

import warnings
from pathlib import Path

import pytest
import torch
from helpers import SMALL, VOCAB, rel_err, spread_weights
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from fastsft.adapters.prompt import PromptConfig, apply_prompt_adapter
from fastsft.data.batch import IGNORE_INDEX, LOSS_POSITION_FILL, PAD_ID, Batch
from fastsft.hf_checkpoint import load_pretrained

peft = pytest.importorskip("peft")

ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(tie_word_embeddings=True, num_key_value_heads=1)),
}
# (our config, PEFT config) pairs, PEFT's built by a function of n.
METHODS = {
    "prompt_tuning": (dict(method="prompt_tuning"), lambda n: peft.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=n)),
    "p_tuning_mlp": (dict(method="p_tuning", encoder_type="mlp", encoder_hidden_size=24),
                     lambda n: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=n,
                                                        encoder_reparameterization_type="MLP",
                                                        encoder_hidden_size=24)),
    "p_tuning_lstm": (dict(method="p_tuning", encoder_type="lstm", encoder_hidden_size=12),
                      lambda n: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=n,
                                                         encoder_reparameterization_type="LSTM",
                                                         encoder_hidden_size=12)),
    "prefix_tuning": (dict(method="prefix_tuning"), lambda n: peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=n)),
    "prefix_projection": (dict(method="prefix_tuning", prefix_projection=True, encoder_hidden_size=20),
                          lambda n: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n,
                                                            prefix_projection=True, encoder_hidden_size=20)),
}


def base_pair(arch, tmp_path):
    """(transformers model, our Transformer loaded from its checkpoint), fp32, same weights."""
    config_cls, model_cls, overrides = ARCHS[arch]
    hf = model_cls(config_cls(**{**SMALL, **overrides})).float()
    spread_weights(hf)
    hf.save_pretrained(tmp_path / "hf")
    return hf, load_pretrained(tmp_path / "hf")


def peft_and_ours(arch, method, n, tmp_path):
    """PEFT-wrapped transformers model and our model with the same prompt parameters (copied from PEFT's)."""
    ours_kw, peft_config = METHODS[method]
    hf, ours = base_pair(arch, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.get_peft_model(hf, peft_config(n))
    encoder = reference.prompt_encoder["default"]
    with torch.no_grad():  # PEFT's N(0, 1) init is far from the tiny model's embeddings: keep it, just re-draw
        for p in encoder.parameters():
            p.copy_(0.5 * torch.randn_like(p))
    adapter = apply_prompt_adapter(ours, PromptConfig(num_virtual_tokens=n, **ours_kw))
    assert sorted(adapter.state_dict()) == sorted(encoder.state_dict())
    adapter.load_state_dict(encoder.state_dict())
    return reference, ours


def make_row(docs, seq_len, virtual, max_docs=4, supervised=None) -> Batch:
    """One packed row per the batch contract, with `virtual` slots in front of every document (PAD id, positions
    0..virtual-1, no label); the document's tokens continue at position `virtual`. supervised[i][t]: token t of
    document i carries loss (default: all but the first)."""
    input_ids = torch.full((seq_len,), PAD_ID, dtype=torch.int64)
    position_ids = torch.zeros(seq_len, dtype=torch.int32)
    labels = torch.full((seq_len,), IGNORE_INDEX, dtype=torch.int64)
    ends, start = [], 0
    for i, doc in enumerate(docs):
        length = virtual + len(doc)
        position_ids[start:start + length] = torch.arange(length, dtype=torch.int32)
        body = start + virtual
        input_ids[body:body + len(doc)] = torch.tensor(doc)
        for t in range(len(doc) - 1):
            if supervised is None or supervised[i][t + 1]:
                labels[body + t] = doc[t + 1]
        start += length
        ends.append(start)
    assert start <= seq_len and len(docs) <= max_docs
    if start < seq_len:
        position_ids[start:] = torch.arange(seq_len - start, dtype=torch.int32)
        ends.append(seq_len)
    cu = [0] + ends + [seq_len] * (max_docs + 1 - len(ends))
    positions = (labels != IGNORE_INDEX).nonzero().flatten()
    loss_positions = torch.full((seq_len,), LOSS_POSITION_FILL, dtype=torch.int32)
    loss_positions[:len(positions)] = positions.to(torch.int32)
    return Batch(input_ids=input_ids, position_ids=position_ids, labels=labels,
                 cu_seqlens=torch.tensor(cu, dtype=torch.int32), max_seqlen=seq_len, loss_positions=loss_positions,
                 num_loss_tokens=len(positions), num_tokens=start, num_docs=len(docs), virtual_tokens=virtual)


def hf_labels(doc, supervised):
    """transformers' unshifted labels: token t is a target when supervised (never the first token)."""
    return [tok if t > 0 and (supervised is None or supervised[t]) else IGNORE_INDEX for t, tok in enumerate(doc)]


def peft_summed_loss(reference, doc, supervised=None):
    labels = torch.tensor([hf_labels(doc, supervised)])
    count = int((labels[0, 1:] != IGNORE_INDEX).sum())
    if count == 0:  # transformers' mean over no token is NaN; the summed loss is 0
        return torch.zeros(())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = reference(input_ids=torch.tensor([doc]), attention_mask=torch.ones(1, len(doc), dtype=torch.int64),
                        labels=labels)
    return out.loss * count


def random_docs(lengths):
    return [torch.randint(1, VOCAB, (n,)).tolist() for n in lengths]


def random_supervision(docs):
    return [[t > 0 and bool(torch.rand(()) < 0.7) for t in range(len(d))] for d in docs]


def prompt_grads(module):
    return {name: p.grad.clone() for name, p in module.named_parameters()}


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("method", list(METHODS))
def test_loss_and_prompt_gradients_equal_peft(arch, method, tmp_path):
    """A packed row of three documents (+ padding) against PEFT run on each document alone: summed loss, and the
    gradient of every prompt parameter (PEFT's summed over the documents)."""
    n = 3
    reference, ours = peft_and_ours(arch, method, n, tmp_path)
    docs = random_docs([9, 2, 13])
    supervised = random_supervision(docs)
    row_virtual = ours.prompt_adapter.row_tokens
    batch = make_row(docs, seq_len=40, virtual=row_virtual, supervised=supervised)
    loss = ours.loss(batch, num_items=1)
    loss.backward()

    reference_loss = sum(peft_summed_loss(reference, d, s) for d, s in zip(docs, supervised, strict=True))
    reference_loss.backward()
    assert rel_err(loss, reference_loss) < 1e-5
    ours_grads = prompt_grads(ours.prompt_adapter)
    theirs = prompt_grads(reference.prompt_encoder["default"])
    assert set(ours_grads) == set(theirs)
    for name, grad in ours_grads.items():
        assert grad.abs().sum() > 0, name
        assert rel_err(grad, theirs[name]) < 1e-5, name
    # The base model is frozen: nothing else received a gradient.
    assert all(p.grad is None for name, p in ours.named_parameters() if not name.startswith("prompt_adapter."))


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_logits_equal_peft_on_one_document(method, tmp_path):
    n = 4
    reference, ours = peft_and_ours("llama", method, n, tmp_path)
    doc = random_docs([11])[0]
    row_virtual = ours.prompt_adapter.row_tokens
    batch = make_row([doc], seq_len=len(doc) + row_virtual, virtual=row_virtual)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = reference(input_ids=torch.tensor([doc]), attention_mask=torch.ones(1, len(doc))).logits[0]
        mine = ours.logits(**batch.model_inputs())
    assert rel_err(mine[-len(doc):], theirs[-len(doc):]) < 1e-5


# ------------------------------------------------------------------------------------------ attention with key offsets


def reference_prefix_attention(q, k, v, q_lengths, k_lengths):
    """float64, each segment on its own: query i of a segment with Lq queries sees its keys 0 .. i + Lk - Lq."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    groups = q.shape[1] // k.shape[1]
    qs = ks = 0
    for lq, lk in zip(q_lengths, k_lengths, strict=True):
        for i in range(lq):
            for h in range(q.shape[1]):
                keys = k[ks:ks + lk, h // groups].double()[: i + lk - lq + 1]
                values = v[ks:ks + lk, h // groups].double()[: i + lk - lq + 1]
                weights = (keys @ q[qs + i, h].double() * q.shape[-1] ** -0.5).softmax(0)
                out[qs + i, h] = weights @ values
        qs, ks = qs + lq, ks + lk
    return out


@pytest.mark.parametrize("backend", ["sdpa", "loop"])
def test_attention_with_separate_key_offsets(backend):
    """Segments with more keys than queries (a prefix), an empty query segment that still owns keys, GQA."""
    from fastsft.attention import varlen_attention

    q_lengths, k_lengths = [5, 0, 7, 3], [8, 3, 10, 6]
    q = torch.randn(sum(q_lengths), 4, 8, requires_grad=True)
    k = torch.randn(sum(k_lengths), 2, 8, requires_grad=True)
    v = torch.randn(sum(k_lengths), 2, 8, requires_grad=True)
    cu = torch.tensor([0, *torch.tensor(q_lengths).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(k_lengths).cumsum(0).tolist()], dtype=torch.int32)
    out = varlen_attention(q, k, v, cu, 7, backend=backend, cu_seqlens_k=cu_k, max_seqlen_k=10)
    assert rel_err(out, reference_prefix_attention(q, k, v, q_lengths, k_lengths)) < 1e-6
    grad = torch.randn_like(out)
    (out * grad).sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    (reference_prefix_attention(q, k, v, q_lengths, k_lengths) * grad.double()).sum().backward()
    for ours, theirs in zip(grads, (q.grad, k.grad, v.grad), strict=True):
        assert rel_err(ours, theirs) < 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flash", "torch_varlen", "sdpa"])
def test_cuda_backends_take_separate_key_offsets(backend):
    """The FlashAttention kernels (bf16, CUDA) with cu_seqlens_k against the fp32 loop reference: the end-aligned
    causal rule of fastsft.attention is the kernels' own."""
    from fastsft import attention

    if backend not in attention.available_backends("cuda", torch.bfloat16):
        pytest.skip(f"{backend} not available here")
    q_lengths, prefix = [100, 1, 257, 0, 31], 20
    k_lengths = [m + prefix for m in q_lengths]
    q = torch.randn(sum(q_lengths), 8, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(sum(k_lengths), 2, 64, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(sum(k_lengths), 2, 64, device="cuda", dtype=torch.bfloat16)
    cu = torch.tensor([0, *torch.tensor(q_lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    cu_k = torch.tensor([0, *torch.tensor(k_lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    out = attention.varlen_attention(q, k, v, cu, 257, backend=backend, cu_seqlens_k=cu_k, max_seqlen_k=277)
    ref = attention.varlen_attention(q.float(), k.float(), v.float(), cu, 257, backend="loop", cu_seqlens_k=cu_k,
                                     max_seqlen_k=277)
    assert rel_err(out.float(), ref) < 2e-2


def test_prefix_key_layout_puts_the_prefix_before_every_segment():
    from fastsft.adapters.prefix import prefix_key_layout

    cu = torch.tensor([0, 3, 5, 8, 8], dtype=torch.int32)  # documents of 3 and 2, padding of 3, one empty segment
    key_index, cu_k = prefix_key_layout(cu, 8, 2)
    p0, p1 = 8, 9  # rows of the prefix in cat(doc keys [8], prefix [2])
    assert key_index.tolist() == [p0, p1, 0, 1, 2, p0, p1, 3, 4, p0, p1, 5, 6, 7, p0, p1]
    assert cu_k.tolist() == [0, 5, 9, 14, 16]


# ---------------------------------------------------------------------------------------------- compiled training


@pytest.mark.parametrize("method, scope", [("prompt_tuning", "model"), ("p_tuning_mlp", "model"),
                                           ("prefix_tuning", "model"), ("prefix_tuning", "blocks")])
def test_one_compilation_and_only_prompt_parameters_move(method, scope, tmp_path):
    """A compiled train step over rows of changing document layouts compiles once (scope "model": forward + loss in
    one graph; "blocks", the trainer's: one graph for the first block, one for the rest, prefixes passed in) and
    equals the eager step; the base model's weights never change."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from fastsft.train.step import TrainStep, apply_compile, build_optimizer

    n = 3
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        _, ours = peft_and_ours("llama", method, n, tmp_path / str(compiled))
        base = {name: p.detach().clone() for name, p in ours.named_parameters() if "prompt_adapter" not in name}
        start = {name: p.detach().clone() for name, p in ours.prompt_adapter.named_parameters()}
        counter = CompileCounterWithBackend("aot_eager")
        if compiled:
            apply_compile(ours, scope, backend=counter)
        step = TrainStep(ours, build_optimizer(ours, lr=1e-2), precision="fp32")
        g = torch.Generator().manual_seed(5)
        losses = []
        for _ in range(6):
            lengths = torch.randint(2, 9, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g).tolist()
            docs = [torch.randint(1, VOCAB, (m,), generator=g).tolist() for m in lengths]
            losses.append(step([make_row(docs, 40, ours.prompt_adapter.row_tokens)]).loss.item())
            if len(losses) == 1:
                first_count = counter.frame_count
        if compiled:
            assert counter.frame_count == first_count == (1 if scope == "model" else 2)
        for name, p in ours.named_parameters():
            if name in base:
                assert torch.equal(p, base[name]), name
        for name, p in ours.prompt_adapter.named_parameters():
            assert not torch.equal(p, start[name]), name
        results.append((torch.tensor(losses), {k: v.detach().clone() for k, v in
                                               ours.prompt_adapter.state_dict().items()}))
    (eager_losses, eager_state), (compiled_losses, compiled_state) = results
    assert rel_err(compiled_losses, eager_losses) < 1e-5
    for name in eager_state:
        assert rel_err(compiled_state[name], eager_state[name]) < 1e-5, name


# ------------------------------------------------------------------------------------------------- PEFT format


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning_lstm", "prefix_tuning", "prefix_projection"])
def test_export_loads_in_peft_with_the_same_loss_and_logits(arch, method, tmp_path):
    """Ours (random prompt parameters) -> PEFT directory -> PeftModel.from_pretrained on the transformers model:
    no missing keys, same logits and loss on a document; and PEFT's own save of the same adapter loads back into
    fastsft with the same logits."""
    from safetensors.torch import load_file

    from fastsft.adapters.prompt_peft import load_peft_prompt_adapter, save_peft_prompt_adapter

    n = 3
    reference, ours = peft_and_ours(arch, method, n, tmp_path)
    with torch.no_grad():
        for p in ours.prompt_adapter.parameters():
            p.add_(0.3 * torch.randn_like(p))  # differ from PEFT's copy: the loaded values must come from our files
    save_peft_prompt_adapter(ours, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "hf"))
    _, model_cls, _ = ARCHS[arch]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # PEFT warns on missing / unexpected adapter keys
        loaded = peft.PeftModel.from_pretrained(model_cls.from_pretrained(tmp_path / "hf"), tmp_path / "adapter")
    doc = random_docs([12])[0]
    supervised = random_supervision([doc])[0]
    batch = make_row([doc], len(doc) + ours.prompt_adapter.row_tokens, ours.prompt_adapter.row_tokens,
                     supervised=[supervised])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = loaded(input_ids=torch.tensor([doc]), attention_mask=torch.ones(1, len(doc), dtype=torch.int64))
        mine = ours.logits(**batch.model_inputs())
        assert rel_err(mine[-len(doc):], theirs.logits[0, -len(doc):]) < 1e-5
        assert rel_err(ours.loss(batch, num_items=1), peft_summed_loss(loaded, doc, supervised)) < 1e-5

    # PEFT's own save of its reference adapter, into a fresh fastsft model: the same logits as PEFT gives.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.save_pretrained(tmp_path / "peft_saved")
    assert set(load_file(tmp_path / "peft_saved" / "adapter_model.safetensors")) == {"prompt_embeddings"}
    fresh = load_pretrained(tmp_path / "hf")
    adapter = load_peft_prompt_adapter(fresh, tmp_path / "peft_saved")
    assert all(p.requires_grad for p in adapter.parameters())
    assert not any(p.requires_grad for name, p in fresh.named_parameters() if not name.startswith("prompt_adapter"))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.eval()
        theirs = reference(input_ids=torch.tensor([doc]), attention_mask=torch.ones(1, len(doc))).logits[0]
        mine = fresh.logits(**batch.model_inputs())
    assert rel_err(mine[-len(doc):], theirs[-len(doc):]) < 1e-5


def test_loading_an_adapter_of_another_model_names_the_field(tmp_path):
    import json

    from fastsft.adapters.prompt_peft import load_peft_prompt_adapter, save_peft_prompt_adapter

    _, ours = peft_and_ours("llama", "prefix_tuning", 2, tmp_path)
    save_peft_prompt_adapter(ours, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**cfg, "num_layers": 5}))
    with pytest.raises(ValueError, match=r"adapter_config.json: num_layers is 5 but the model needs 2"):
        load_peft_prompt_adapter(load_pretrained(tmp_path / "hf"), tmp_path / "adapter")
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "LORA"}))
    with pytest.raises(ValueError, match=r"peft_type 'LORA' is not a prompt-learning type"):
        load_peft_prompt_adapter(load_pretrained(tmp_path / "hf"), tmp_path / "adapter")


# ------------------------------------------------------------------------------------------------- generation


@pytest.mark.parametrize("method", ["p_tuning_mlp", "prefix_tuning"])
def test_greedy_generation_equals_peft(method, tmp_path):
    """generate_batch (several prompts packed in one row) against greedy decoding by re-running PEFT's forward."""
    from fastsft.generate import generate_batch

    reference, ours = peft_and_ours("qwen3", method, 3, tmp_path)
    prompts = random_docs([5, 9, 2])
    outputs = generate_batch(ours.eval(), prompts, max_new_tokens=6)
    reference.eval()
    for prompt, output in zip(prompts, outputs, strict=True):
        seq = list(prompt)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(6):
                logits = reference(input_ids=torch.tensor([seq]), attention_mask=torch.ones(1, len(seq))).logits
                seq.append(int(logits[0, -1].argmax()))
        assert output == seq[len(prompt):]


def test_generate_command_applies_an_adapter(tmp_path, capsys):
    """`fastsft generate --model BASE --adapter DIR` gives what generate_batch gives with the adapter attached."""
    from fastsft.adapters.prompt_peft import save_peft_prompt_adapter
    from fastsft.cli import main
    from fastsft.data.tokenizer import load_tokenizer
    from fastsft.generate import generate_batch

    byte = load_tokenizer("byte")
    hf = LlamaForCausalLM(LlamaConfig(**{**SMALL, "vocab_size": byte.vocab_size})).float()
    spread_weights(hf)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_pretrained(tmp_path / "hf")
    apply_prompt_adapter(ours, PromptConfig(method="prompt_tuning", num_virtual_tokens=4))
    save_peft_prompt_adapter(ours, tmp_path / "adapter")
    args = ["generate", "--model", str(tmp_path / "hf"), "--tokenizer", "byte", "--raw", "--prompt", "abc",
            "--max-new-tokens", "6", "--device", "cpu"]
    assert main([*args, "--adapter", str(tmp_path / "adapter")]) == 0
    printed = capsys.readouterr().out.rstrip("\n")
    (expected,) = generate_batch(ours.eval(), [byte.encode("abc")], 6, stop_ids=byte.stop_ids)
    assert printed == byte.decode(expected, skip_special_tokens=True)
    assert main(args) == 0  # without the adapter: another continuation (the prompts matter)
    (plain,) = generate_batch(load_pretrained(tmp_path / "hf").eval(), [byte.encode("abc")], 6,
                              stop_ids=byte.stop_ids)
    assert plain != expected


@pytest.mark.parametrize("method", ["p_tuning_lstm", "prefix_projection"])
def test_activation_checkpointing_same_prompt_gradients(method, tmp_path):
    from fastsft.train.step import apply_activation_checkpointing

    _, ours = peft_and_ours("llama", method, 3, tmp_path)
    batch = make_row(random_docs([7, 12]), 32, ours.prompt_adapter.row_tokens)
    ours.loss(batch).backward()
    plain = prompt_grads(ours.prompt_adapter)
    ours.prompt_adapter.zero_grad(set_to_none=True)
    apply_activation_checkpointing(ours)
    ours.loss(batch).backward()
    for name, grad in prompt_grads(ours.prompt_adapter).items():
        assert rel_err(grad, plain[name]) < 1e-6, name


@pytest.mark.parametrize("method", ["p_tuning_lstm", "prefix_projection"])
def test_bf16_autocast_close_to_fp32(method, tmp_path):
    """Under bf16 autocast (the trainer's precision on a GPU) the fp32 prompt parameters are cast to the compute
    dtype: the loss and the prompt gradients stay within bf16 rounding of fp32."""
    _, ours = peft_and_ours("qwen3", method, 3, tmp_path)
    batch = make_row(random_docs([9, 14]), 32, ours.prompt_adapter.row_tokens)
    fp32 = ours.loss(batch)
    fp32.backward()
    reference = prompt_grads(ours.prompt_adapter)
    ours.prompt_adapter.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = ours.loss(batch)
    bf16.backward()
    assert rel_err(bf16, fp32) < 2e-2
    for name, grad in prompt_grads(ours.prompt_adapter).items():
        assert grad.dtype == torch.float32 and rel_err(grad, reference[name]) < 0.1, name


# ------------------------------------------------------------------------------------- the train config's section


def test_adapter_section_builds_saves_and_reloads_prompt_adapters(tmp_path):
    """The `adapter.*` options through fastsft.adapters.peft_io: build, PEFT export, start again from it (the
    directory decides the method; P-tuning comes back as prompt tuning), and `apply_peft_dir` as generate uses it."""
    from fastsft.adapters.config import AdapterSection, prompt_row_tokens, validate_adapter
    from fastsft.adapters.peft_io import apply_peft_dir, build_adapters, save_peft_adapter

    _, ours = base_pair("llama", tmp_path)
    section = AdapterSection(method="p_tuning", num_virtual_tokens=5, encoder_type="lstm", encoder_hidden_size=8)
    validate_adapter(section)
    assert prompt_row_tokens(section) == 5
    assert prompt_row_tokens(AdapterSection(method="prefix_tuning")) == 0
    _, used = build_adapters(ours, section)
    assert used == section and ours.prompt_adapter.lstm_head.hidden_size == 8
    save_peft_adapter(ours, section, tmp_path / "adapter")
    doc = random_docs([10])[0]
    batch = make_row([doc], 15, 5)
    with torch.no_grad():
        expected = ours.logits(**batch.model_inputs())

    again = load_pretrained(tmp_path / "hf")
    resumed = AdapterSection(method="p_tuning", init_from=str(tmp_path / "adapter"))
    assert prompt_row_tokens(resumed) == 5
    _, used = build_adapters(again, resumed)
    assert (used.method, used.num_virtual_tokens) == ("prompt_tuning", 5)
    with torch.no_grad():
        assert rel_err(again.logits(**batch.model_inputs()), expected) < 1e-6
    with pytest.raises(ValueError, match=r"adapter.init_from=.*a P_TUNING adapter, but adapter.method is prefix"):
        build_adapters(load_pretrained(tmp_path / "hf"),
                       AdapterSection(method="prefix_tuning", init_from=str(tmp_path / "adapter")))
    generated = load_pretrained(tmp_path / "hf")
    assert apply_peft_dir(generated, tmp_path / "adapter").method == "prompt_tuning"
    with torch.no_grad():
        assert rel_err(generated.logits(**batch.model_inputs()), expected) < 1e-6


@pytest.mark.parametrize("options, message", [
    (dict(prompt_init="text"), r"adapter: prompt init 'text' needs init_text .*adapter.prompt_init_text"),
    (dict(num_virtual_tokens=0), r"adapter: num_virtual_tokens must be a positive integer"),
    (dict(method="prefix_tuning", prompt_init="vocab"), r"prompt init 'vocab' applies to prompt_tuning only"),
])
def test_adapter_section_errors_name_the_option(options, message):
    from fastsft.adapters.config import AdapterSection, validate_adapter

    with pytest.raises(ValueError, match=message):
        validate_adapter(AdapterSection(**{"method": "prompt_tuning", **options}))


def test_text_init_equals_peft(tmp_path):
    """prompt_init=text: the embeddings of the text's tokens, repeated to n, exactly as PEFT's TEXT init."""
    from fastsft.adapters.config import AdapterSection
    from fastsft.adapters.peft_io import build_adapters
    from fastsft.data.tokenizer import load_tokenizer

    tokenizer_dir = "/work/shared/tokenizers/qwen3"
    if not (Path(tokenizer_dir) / "tokenizer.json").exists():
        pytest.skip(f"no tokenizer at {tokenizer_dir}")
    tokenizer = load_tokenizer(tokenizer_dir)
    config = Qwen3Config(**{**SMALL, "vocab_size": tokenizer.vocab_size, "tie_word_embeddings": True})
    hf = Qwen3ForCausalLM(config).float()
    hf.save_pretrained(tmp_path / "hf")
    text = "Answer the question politely"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.get_peft_model(hf, peft.PromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=9, prompt_tuning_init="TEXT", prompt_tuning_init_text=text,
            tokenizer_name_or_path=tokenizer_dir))
    ours = load_pretrained(tmp_path / "hf")
    build_adapters(ours, AdapterSection(method="prompt_tuning", num_virtual_tokens=9, prompt_init="text",
                                        prompt_init_text=text), tokenizer=tokenizer)
    assert torch.equal(ours.prompt_adapter.embedding.weight, reference.prompt_encoder["default"].embedding.weight)
