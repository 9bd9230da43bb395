"""One optimizer step on packed batches, and the plain functions that prepare a model for it.

Where it sits: the trainer (`fastsft.train.trainer`) builds a `fastsft.model.Transformer`, applies what it wants from
here from the outside (torchtitan style: `freeze_parameters`, `apply_activation_checkpointing`, FSDP2 shards, then
`apply_compile`), builds the optimizer and schedule (`build_optimizer`, `lr_lambda`), and calls a `TrainStep` once
per optimizer step with that step's micro-batches (`fastsft.data.batch.Batch`). Nothing here keeps state that could
be derived; nothing here synchronises with the host: the metrics come back as device tensors that the trainer reads
once per logging interval.

The loss of a step is sum over all supervised tokens of all micro-batches (and all ranks) / that global count, so
gradient accumulation and data parallelism give the gradient of one big batch: each micro-batch's summed loss is
divided by the step's global count before its backward.

Skipping a bad step without a host sync: when the loss or the gradient norm is not finite, the fused AdamW is given
`found_inf` = 1 (the mechanism torch.amp.GradScaler uses): its kernel leaves parameters, moments and the step count
untouched, decided on the device. The learning-rate schedule still advances (as in transformers' Trainer). Only the
fused AdamW (build_optimizer's default on CUDA and CPU) skips exactly; with any other optimizer the non-finite
gradients are replaced by zeros on the device, so weights move only by the decaying moments - documented, not exact.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import re
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from fastsft.data.batch import Batch

PRECISIONS = ("bf16", "fp32", "pure_bf16")
COMPILE_SCOPES = ("blocks", "model", "none")
TORCH_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
DECAYS = ("cosine", "linear", "constant")

# ---------------------------------------------------------------------------------------------------------------
# Optimizer and schedule
# ---------------------------------------------------------------------------------------------------------------


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.95), eps: float = 1e-8,
                    fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over the parameters that require grad. Weight decay applies to matrices only: norms and biases
    (1-D) and embedding tables get none (decaying them pulls rare tokens' rows and the norm gains toward 0, which
    only hurts). fused=None uses the fused kernel when every parameter is on CUDA or CPU (needed for exact
    non-finite skipping, see the module docstring)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or id(param) in embeddings else decay).append(param)
    if not decay and not no_decay:
        raise ValueError("build_optimizer: the model has no parameter with requires_grad=True (everything frozen?)")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if fused is None:
        fused = all(p.device.type in ("cuda", "cpu") and p.is_floating_point() for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused)


def lr_lambda(warmup_steps: int, total_steps: int, decay: str = "cosine", min_lr_ratio: float = 0.0):
    """Multiplier of the peak learning rate for `torch.optim.lr_scheduler.LambdaLR`: linear warmup over the first
    `warmup_steps` steps (step 0 already trains, at 1/warmup_steps), then cosine or linear decay to min_lr_ratio at
    `total_steps` (held there after), or constant."""
    if decay not in DECAYS:
        raise ValueError(f"lr decay {decay!r} is not one of {', '.join(DECAYS)}")
    if warmup_steps < 0 or total_steps < 1:
        raise ValueError(f"need warmup_steps >= 0 and total_steps >= 1, got {warmup_steps} and {total_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must lie in [0, 1], got {min_lr_ratio}")

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if decay == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if decay == "cosine" else 1.0 - progress
        return min_lr_ratio + (1.0 - min_lr_ratio) * shape

    return multiplier


# ---------------------------------------------------------------------------------------------------------------
# Applied to the model from outside
# ---------------------------------------------------------------------------------------------------------------


def apply_compile(model: nn.Module, scope: str = "blocks", fullgraph: bool = True, backend="inductor",
                  compile_mode: str | None = None) -> nn.Module:
    """torch.compile each transformer block (scope "blocks": one graph shared by all blocks but the first, which has
    no residual yet; short compile time), the whole forward ("model", single device), or nothing ("none"). Returns
    the model. `compile_mode` is torch.compile's mode (None or "default", "max-autotune", ...).

    What gets compiled is each module's `forward` (replaced on the instance), not its `__call__`: module hooks - FSDP2's
    all-gather and reshard hooks among them - stay outside the graph whether this runs before or after sharding,
    and parameter names do not change. Apply after activation checkpointing (the checkpointed forward is what gets
    compiled). The loss (a custom op) runs outside the compiled graph."""
    if scope not in COMPILE_SCOPES:
        raise ValueError(f"apply_compile scope {scope!r} is not one of {', '.join(COMPILE_SCOPES)}")
    if compile_mode is not None and compile_mode not in TORCH_COMPILE_MODES:
        raise ValueError(f"torch.compile mode {compile_mode!r} is not one of {', '.join(TORCH_COMPILE_MODES)}")
    kwargs = {"fullgraph": fullgraph, "backend": backend}
    if compile_mode is not None and compile_mode != "default":
        kwargs["mode"] = compile_mode
    targets = {"blocks": list(model.layers), "model": [model], "none": []}[scope]
    for module in targets:
        if not getattr(module, "_fastsft_compiled", False):
            module.forward = torch.compile(module.forward, **kwargs)
            module._fastsft_compiled = True
    return model


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute each block's activations in backward instead of keeping them (non-reentrant checkpoint around each
    block's forward). Done by replacing the block's `forward` on the instance, so parameter names, state dicts and
    per-block compilation stay as they are. Apply before compiling. Idempotent; returns the model."""
    for block in model.layers:
        if getattr(block, "_fastsft_checkpointed", False):
            continue
        block.forward = _checkpointed(block.forward)
        block._fastsft_checkpointed = True
    return model


def _checkpointed(forward):
    def checkpointed_forward(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return checkpointed_forward


def freeze_parameters(model: nn.Module, patterns: list[str]) -> int:
    """Set requires_grad=False on parameters whose name matches a pattern; returns how many parameter elements were
    frozen. Patterns are shell-style globs on names like `layers.3.mlp.up_proj.weight` ("embed_tokens.*",
    "layers.[0-3].*", "*.bias"); prefix "re:" for a regular expression matched against the whole name
    ("re:layers\\.(0|1)\\..*"). A pattern that matches nothing is an error (a typo would otherwise train everything)."""
    if isinstance(patterns, str):
        patterns = [patterns]
    named = list(model.named_parameters())
    frozen = 0
    for pattern in patterns:
        matches = [param for name, param in named if _name_matches(name, pattern)]
        if not matches:
            examples = ", ".join(name for name, _ in named[:4])
            raise ValueError(f"freeze pattern {pattern!r} matches no parameter name (names look like {examples}, "
                             f"...); use shell-style globs such as 'embed_tokens.*' or 'layers.[0-3].*', or 're:' "
                             f"for a regular expression")
        for param in matches:
            if param.requires_grad:
                param.requires_grad_(False)
                frozen += param.numel()
    return frozen


def _name_matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


# ---------------------------------------------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Precision:
    """How a run computes, decided once (`resolve_precision`) and read by the step, the evaluation and FSDP2.

    param_dtype: the model's parameters (the master weights) and so the optimizer state.
    autocast_dtype: torch.autocast around forward and loss (None: no autocast).
    fsdp_param_dtype: the dtype FSDP2 all-gathers parameters in for compute (None: as stored; unsharded runs).
    """

    name: str
    param_dtype: torch.dtype = torch.float32
    autocast_dtype: torch.dtype | None = None
    fsdp_param_dtype: torch.dtype | None = None

    @classmethod
    def named(cls, name: str) -> Precision:
        """bf16 = fp32 master weights + bf16 autocast; fp32 = no autocast; pure_bf16 = bf16 parameters, no autocast."""
        if name not in PRECISIONS:
            raise ValueError(f"precision {name!r} is not one of {', '.join(PRECISIONS)}")
        return {"bf16": cls("bf16", torch.float32, torch.bfloat16), "fp32": cls("fp32"),
                "pure_bf16": cls("pure_bf16", torch.bfloat16)}[name]

    def autocast(self, device: torch.device | str):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(torch.device(device).type, dtype=self.autocast_dtype)


def resolve_precision(requested: str, model_dtype: str, device_type: str, sharded: bool) -> Precision:
    """train.precision (auto: bf16 on a GPU, fp32 on CPU) and model.dtype (auto/float32: fp32 master weights;
    bfloat16) -> the run's Precision. Under FSDP2, bf16 compute comes from its param_dtype (no autocast on top);
    bf16 parameters mean pure bf16 (no autocast)."""
    mode = requested if requested != "auto" else ("bf16" if device_type == "cuda" else "fp32")
    param_dtype = torch.bfloat16 if model_dtype == "bfloat16" else torch.float32
    if sharded and mode == "bf16":
        return Precision("bf16 (FSDP2 param_dtype)", param_dtype, None, torch.bfloat16)
    if param_dtype == torch.bfloat16:
        return Precision.named("pure_bf16")
    return Precision.named(mode)


@dataclass
class StepMetrics:
    """What one optimizer step reports. Tensors stay on the device until the trainer reads them."""

    loss: torch.Tensor  # 0-d fp32: sum of supervised-token losses / num_items
    num_correct: torch.Tensor  # 0-d int64: supervised tokens whose argmax prediction is the label
    grad_norm: torch.Tensor  # 0-d fp32: total gradient norm before clipping
    skipped: torch.Tensor  # 0-d fp32: 1.0 when the update was skipped (non-finite loss or gradient norm)


class TrainStep:
    """forward + loss + backward per micro-batch, gradient clipping, optimizer and scheduler step.

    precision: a `Precision`, or its name: "bf16" = torch.autocast to bf16 with the model's (fp32) parameters as
    master weights and fp32 optimizer state; "fp32" = no autocast; "pure_bf16" = parameters (and so optimizer
    state) in bf16, no autocast.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler=None,
                 max_grad_norm: float | None = 1.0, precision: str | Precision = "bf16"):
        if isinstance(precision, str):
            precision = Precision.named(precision)
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.max_grad_norm = max_grad_norm
        self.precision = precision
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        if not self.params:
            raise ValueError("TrainStep: the optimizer has no parameters")
        if precision.param_dtype == torch.bfloat16 and any(p.dtype != torch.bfloat16 for p in self.params):
            raise ValueError("precision='pure_bf16' wants bf16 parameters: call model.to(torch.bfloat16) before "
                             "building the optimizer, or use precision='bf16' (fp32 master weights)")
        self.exact_skip = all(group.get("fused") for group in optimizer.param_groups)

    def __call__(self, micro_batches: list[Batch], num_items=None) -> StepMetrics:
        if not micro_batches:
            raise ValueError("TrainStep needs at least one micro-batch")
        device = self.params[0].device
        if num_items is None:
            num_items = sum(b.num_loss_tokens for b in micro_batches)
        divisor = _divisor(num_items, device)
        total_loss = torch.zeros((), dtype=torch.float32, device=device)
        total_correct = torch.zeros((), dtype=torch.int64, device=device)
        last = len(micro_batches) - 1
        for i, batch in enumerate(micro_batches):
            if hasattr(self.model, "set_requires_gradient_sync"):  # FSDP2: reduce-scatter on the last one only
                self.model.set_requires_gradient_sync(i == last)
            with self.precision.autocast(device):
                loss, correct = self.model.loss(batch, num_items=divisor, return_num_correct=True)
            loss.backward()
            total_loss += loss.detach().float()
            total_correct += correct
        grad_norm = self._clip_gradients()
        found_inf = (~(torch.isfinite(grad_norm) & torch.isfinite(total_loss))).float()
        self._optimizer_step(found_inf)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        return StepMetrics(loss=total_loss, num_correct=total_correct, grad_norm=grad_norm, skipped=found_inf)

    def _clip_gradients(self) -> torch.Tensor:
        params = [p for p in self.params if p.grad is not None]
        if not params:
            return torch.zeros((), dtype=torch.float32, device=self.params[0].device)
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
        if hasattr(norm, "full_tensor"):  # FSDP2: norm of the sharded gradients, reduced across ranks
            norm = norm.full_tensor()
        if self.max_grad_norm:
            torch.nn.utils.clip_grads_with_norm_(params, self.max_grad_norm, norm, foreach=True)
        return norm.float()

    def _optimizer_step(self, found_inf: torch.Tensor) -> None:
        if self.exact_skip:
            # Fused AdamW reads `found_inf` (GradScaler's hook): a non-zero value skips the whole update on device.
            self.optimizer.found_inf = found_inf
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
            return
        keep = found_inf == 0
        for p in self.params:
            if p.grad is not None:
                p.grad.copy_(torch.where(keep, p.grad, torch.zeros_like(p.grad)))
        self.optimizer.step()


def _divisor(num_items, device: torch.device) -> torch.Tensor:
    """num_items as a 0-d fp32 device tensor, at least 1 (a step with no supervised token gives loss 0, not NaN).
    A host number is written by a fill kernel, not copied from the host (a copy could wait for the GPU)."""
    if isinstance(num_items, torch.Tensor):
        return num_items.to(device=device, dtype=torch.float32).clamp(min=1.0)
    return torch.full((), float(max(num_items, 1)), dtype=torch.float32, device=device)


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak, both in FLOP/s (bench.common.matmul_tflops()
    returns TFLOP/s: multiply by 1e12)."""
    return tokens_per_s * flops_per_token / peak_flops
