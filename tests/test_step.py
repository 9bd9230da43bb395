"""fastsft.train.step: the train step's arithmetic (accumulation, global loss-token count, clipping, skipping a
non-finite step), compilation (equal to eager, compiles once over changing document layouts), activation
checkpointing, freezing, optimizer groups and the schedule. CPU, fp32, tiny models."""

import math

import pytest
import torch
from helpers import SMALL, make_batch, random_docs
from torch._dynamo.testing import CompileCounterWithBackend

from fastsft.model import ModelConfig, Transformer
from fastsft.train.step import (
    TrainStep,
    apply_activation_checkpointing,
    apply_compile,
    build_optimizer,
    freeze_parameters,
    lr_lambda,
)

TINY = dict(SMALL, num_hidden_layers=2)


def fresh_model(seed=0, **overrides):
    return Transformer.from_config(ModelConfig(**{**TINY, **overrides}), seed=seed)


def batches(lengths_per_row, seq_len=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [make_batch(random_docs(lengths, generator=g), seq_len=seq_len) for lengths in lengths_per_row]


def params_of(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


class RecordingSGD(torch.optim.SGD):
    """SGD that keeps a copy of the gradients it was given (after clipping), by parameter."""

    def step(self, closure=None):
        self.seen = {p: p.grad.detach().clone() for g in self.param_groups for p in g["params"] if p.grad is not None}
        return super().step(closure)


def sgd_step(model, micro_batches, num_items=None, max_grad_norm=None):
    """One TrainStep with SGD; returns the metrics and the gradients the optimizer received, by parameter name."""
    optimizer = RecordingSGD(model.parameters(), lr=0.1)
    step = TrainStep(model, optimizer, max_grad_norm=max_grad_norm, precision="fp32")
    metrics = step(micro_batches, num_items=num_items)
    return metrics, {name: optimizer.seen[p] for name, p in model.named_parameters()}


def test_accumulation_equals_one_combined_row():
    """Two micro-batches divided by the step's global count == one row holding all their documents."""
    g = torch.Generator().manual_seed(5)
    docs_a, docs_b = random_docs([9, 14], generator=g), random_docs([20, 3, 6], generator=g)
    row_a, row_b = make_batch(docs_a, seq_len=32), make_batch(docs_b, seq_len=32)
    combined = make_batch(docs_a + docs_b, seq_len=64, max_docs=6)
    assert row_a.num_loss_tokens + row_b.num_loss_tokens == combined.num_loss_tokens

    metrics_acc, grads_acc = sgd_step(fresh_model(), [row_a, row_b])
    metrics_one, grads_one = sgd_step(fresh_model(), [combined])
    assert rel_err(metrics_acc.loss, metrics_one.loss) < 1e-5
    assert rel_err(metrics_acc.grad_norm, metrics_one.grad_norm) < 1e-5
    assert metrics_acc.num_correct.item() == metrics_one.num_correct.item()
    for name in grads_one:
        assert rel_err(grads_acc[name], grads_one[name]) < 1e-4, name
    # The reported loss is the mean token loss of the combined row.
    with torch.no_grad():
        assert rel_err(metrics_one.loss, fresh_model().loss(combined)) < 1e-5


def test_global_num_items_across_ranks():
    """Each 'rank' divides by the global count; the sum of their gradients (what an all-reduce sum gives) equals
    the gradient of all documents in one row."""
    g = torch.Generator().manual_seed(6)
    docs_a, docs_b = random_docs([12, 7], generator=g), random_docs([25], generator=g)
    row_a, row_b = make_batch(docs_a, seq_len=32), make_batch(docs_b, seq_len=32)
    total = row_a.num_loss_tokens + row_b.num_loss_tokens
    _, grads_0 = sgd_step(fresh_model(), [row_a], num_items=total)
    _, grads_1 = sgd_step(fresh_model(), [row_b], num_items=torch.tensor(total))
    _, grads_all = sgd_step(fresh_model(), [make_batch(docs_a + docs_b, seq_len=64)])
    for name in grads_all:
        assert rel_err(grads_0[name] + grads_1[name], grads_all[name]) < 1e-4, name


def test_clipping_scales_the_gradient():
    (row,) = batches([[10, 12]])
    _, unclipped = sgd_step(fresh_model(), [row])
    norm = math.sqrt(sum(g.double().square().sum().item() for g in unclipped.values()))
    metrics, clipped = sgd_step(fresh_model(), [row], max_grad_norm=norm / 4)
    assert abs(metrics.grad_norm.item() - norm) < 1e-5 * norm  # reported before clipping
    for name in unclipped:
        assert rel_err(clipped[name], unclipped[name] / 4) < 1e-5, name


@pytest.mark.parametrize("fused", [True, False])
def test_non_finite_gradient_skips_the_update(fused):
    model = fresh_model()
    # Weight decay 0: the non-fused fallback zeroes the gradients, so only decay could still move the weights.
    optimizer = build_optimizer(model, lr=1e-2, weight_decay=0.1 if fused else 0.0, fused=fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(0, 10, "linear"))
    step = TrainStep(model, optimizer, scheduler, max_grad_norm=1.0, precision="fp32")
    row_1, row_2 = batches([[10, 12], [8, 20]])
    before = params_of(model)
    hook = model.layers[1].mlp.up_proj.weight.register_hook(lambda grad: grad * float("inf"))
    metrics = step([row_1])
    hook.remove()
    assert metrics.skipped.item() == 1.0 and not math.isfinite(metrics.grad_norm.item())
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), before[name]), name
    if fused:  # moments and step count untouched: the next step is a true first step
        assert all(state["step"].item() == 0 for state in optimizer.state.values())
    metrics = step([row_2])
    assert metrics.skipped.item() == 0.0 and math.isfinite(metrics.grad_norm.item())
    assert not torch.equal(model.layers[1].mlp.up_proj.weight.detach(), before["layers.1.mlp.up_proj.weight"])


def test_step_does_not_synchronise(monkeypatch):
    """The step never reads a tensor value on the host (.item(), .tolist(), bool(), float(), .cpu(), .numpy())."""
    model = fresh_model()
    optimizer = build_optimizer(model, lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(2, 10))
    step = TrainStep(model, optimizer, scheduler, precision="fp32")
    rows = batches([[10, 12], [30]])

    def forbidden(self, *args, **kwargs):
        raise AssertionError("host synchronisation inside the train step")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    metrics = step(rows)
    monkeypatch.undo()
    assert math.isfinite(metrics.loss.item())


def test_compiled_step_equals_eager():
    """inductor, per-block compilation: same losses and same weights as eager after a few steps."""
    rows = batches([[10, 12], [5, 5, 20], [31]])
    results = []
    for compiled in (False, True):
        model = fresh_model(num_hidden_layers=1)
        if compiled:
            apply_compile(model, "blocks")
        step = TrainStep(model, build_optimizer(model, lr=1e-2), precision="fp32")
        losses = [step([row]).loss for row in rows]
        results.append((torch.stack(losses), params_of(model)))
    (eager_losses, eager_params), (compiled_losses, compiled_params) = results
    assert rel_err(compiled_losses, eager_losses) < 1e-5
    for name in eager_params:
        assert rel_err(compiled_params[name], eager_params[name]) < 1e-4, name


def test_one_compilation_over_twenty_layouts():
    """Fixed shapes, 20 different document layouts (cu_seqlens, positions, loss positions): one graph."""
    counter = CompileCounterWithBackend("aot_eager")
    model = fresh_model()
    apply_compile(model, "model", backend=counter)  # forward + loss in one graph
    step = TrainStep(model, build_optimizer(model, lr=1e-3), precision="fp32")
    g = torch.Generator().manual_seed(7)
    layouts = set()
    for _ in range(20):
        lengths = torch.randint(1, 11, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g).tolist()
        layouts.add(tuple(lengths))
        metrics = step([make_batch(random_docs(lengths, generator=g), seq_len=32)])
        assert math.isfinite(metrics.loss.item())
    assert len(layouts) > 10
    assert counter.frame_count == 1


def test_activation_checkpointing_same_gradients_and_names():
    row, = batches([[10, 12]])
    _, plain = sgd_step(fresh_model(), [row])
    model = fresh_model()
    names = [n for n, _ in model.named_parameters()]
    apply_activation_checkpointing(model)
    apply_activation_checkpointing(model)  # idempotent
    apply_compile(model, "blocks", backend="aot_eager")
    assert [n for n, _ in model.named_parameters()] == names
    # Module hooks (FSDP2 puts its all-gathers there) run eagerly, outside the compiled forward.
    hook_compiling = []
    for block in model.layers:
        block.register_forward_pre_hook(lambda module, args: hook_compiling.append(torch.compiler.is_compiling()))
    _, checkpointed = sgd_step(model, [row])
    assert hook_compiling == [False] * len(model.layers)
    for name in plain:
        assert rel_err(checkpointed[name], plain[name]) < 1e-5, name


def test_freeze_parameters():
    model = fresh_model(tie_word_embeddings=True)
    frozen = freeze_parameters(model, ["embed_tokens.*", "layers.[0].*", "re:layers\\.1\\.self_attn\\.q_.*"])
    expected = {n for n, _ in model.named_parameters()
                if n.startswith(("embed_tokens.", "layers.0.", "layers.1.self_attn.q_"))}
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == expected
    assert frozen == sum(p.numel() for n, p in model.named_parameters() if n in expected)
    optimizer = build_optimizer(model, lr=1e-2)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters())) - len(expected)
    before = params_of(model)
    TrainStep(model, optimizer, precision="fp32")(batches([[10, 12]]))
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), before[name]) == (name in expected), name
    with pytest.raises(ValueError, match="'layer.*' matches no parameter name"):
        freeze_parameters(model, ["layer.*"])


def test_optimizer_groups():
    model = fresh_model(attention_bias=True)
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.1)
    decay_group, no_decay_group = optimizer.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay_group["params"]}
    assert decay_group["weight_decay"] == 0.1 and no_decay_group["weight_decay"] == 0.0
    assert decayed == {n for n, p in model.named_parameters() if p.ndim == 2 and n != "embed_tokens.weight"}
    assert "lm_head.weight" in decayed and "layers.0.self_attn.q_proj.bias" not in decayed
    assert all(g["fused"] for g in optimizer.param_groups)


def test_lr_lambda():
    f = lr_lambda(warmup_steps=4, total_steps=14, decay="cosine", min_lr_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0)
    assert f(9) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay
    assert f(14) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)
    linear = lr_lambda(0, 10, "linear")
    assert [linear(s) for s in (0, 5, 10)] == pytest.approx([1.0, 0.5, 0.0])
    assert lr_lambda(3, 10, "constant")(7) == 1.0
    with pytest.raises(ValueError, match="'cosin' is not one of cosine, linear, constant"):
        lr_lambda(0, 10, "cosin")


def test_precisions():
    rows = batches([[10, 12]])
    reference = fresh_model().loss(rows[0]).item()
    model = fresh_model()
    metrics = TrainStep(model, build_optimizer(model, lr=1e-3), precision="bf16")(rows)
    assert model.embed_tokens.weight.dtype == torch.float32  # master weights stay fp32
    assert abs(metrics.loss.item() - reference) < 3e-2 * reference
    with pytest.raises(ValueError, match="pure_bf16' wants bf16 parameters"):
        TrainStep(model, build_optimizer(model, lr=1e-3), precision="pure_bf16")
    model = fresh_model().to(torch.bfloat16)
    before = model.layers[0].mlp.up_proj.weight.detach().clone()
    metrics = TrainStep(model, build_optimizer(model, lr=1e-2), precision="pure_bf16")(rows)
    assert abs(metrics.loss.item() - reference) < 5e-2 * reference
    assert not torch.equal(model.layers[0].mlp.up_proj.weight, before)


@pytest.mark.gpu
def test_cuda_bf16_compiled_step_has_no_sync():
    config = ModelConfig(**dict(TINY, hidden_size=256, intermediate_size=512, head_dim=64))
    model = Transformer.from_config(config, device="cuda", seed=0)
    apply_compile(model, "blocks")
    optimizer = build_optimizer(model, lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(2, 20))
    step = TrainStep(model, optimizer, scheduler, precision="bf16")
    rows = [[b.to("cuda")] for b in batches([[100, 28], [60, 60, 8], [128]], seq_len=128)]
    step(rows[0])  # compile
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        metrics = [step(r) for r in rows[1:]]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(math.isfinite(m.loss.item()) and m.skipped.item() == 0 for m in metrics)
