"""LoRA, DoRA and QLoRA: frozen base projections plus trainable low-rank updates, applied to a `Transformer`.

Where it sits: the trainer loads a `fastsft.model.Transformer`, then `apply_adapters(model, cfg.adapter)` freezes
every weight, replaces the targeted block linears by `LoRALinear` (and, for QLoRA, stores every block linear's weight
as torchao's NF4 with double quantization), and re-enables gradients on the adapters and on `modules_to_save`.
Compilation, activation checkpointing and FSDP2 are applied afterwards from outside, as for full fine-tuning.

Semantics are PEFT's (`peft.tuners.lora`), so adapters move between the two unchanged (`fastsft.adapters.peft_io`):
  LoRA  y = x W^T + b + s * (drop(x) A^T) B^T,    s = alpha / r   (alpha / sqrt(r) with rsLoRA)
  DoRA  y = x W^T + b + (g - 1) * drop(x) W^T + g * s * (drop(x) A^T) B^T,   g = m / ||W + s B A||_row
        where the row norm is computed without gradient (detached, DoRA paper section 4.3, as PEFT does); with no
        dropout this is g * (x W^T + s x A^T B^T) + b, one base GEMM.
A starts kaiming-uniform (a = sqrt(5), PEFT's default), B at zero and m at ||W||_row, so step 0 is the base model.

Speed: the base GEMM, then for the whole group of projections that read one input (q/k/v, gate/up) ONE GEMM with
the concatenated A matrices, then per projection one thin B GEMM accumulated into the base output (addmm: no extra
pass over the [tokens x out] output). Dropout draws one mask per group and touches only the adapter path. The
model asks for the grouped form through `fastsft.model.shared_input_projections`. No host syncs, no data-dependent
shapes: torch.compile(fullgraph=True) traces it as one graph.

Memory: base weights are frozen (requires_grad False, never a gradient or optimizer state), kept in `base_dtype`
(bf16 on a GPU: no fp32 master copy) or NF4; adapters and modules_to_save are fp32 masters.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fastsft.adapters.config import LORA_METHODS, AdapterSection, module_matches

NF4_BLOCK_SIZE = 64  # weights per absmax block (QLoRA paper)
NF4_SCALER_BLOCK_SIZE = 256  # absmax scalers per second-level (double quantization) block (QLoRA paper)


# ---------------------------------------------------------------------------------------------------------------
# NF4 base weights (torchao)
# ---------------------------------------------------------------------------------------------------------------


def nf4_scaler_block_size(numel: int) -> int:
    """256 scalers per double-quantization block as in the QLoRA paper; a matrix whose block count 256 does not
    divide (only tiny test shapes) uses the largest power of two that does."""
    n_blocks = numel // NF4_BLOCK_SIZE
    return math.gcd(n_blocks, NF4_SCALER_BLOCK_SIZE)


def quantize_nf4(weight: torch.Tensor) -> torch.Tensor:
    """The weight as torchao's NF4Tensor: 4-bit NormalFloat codes per 64 weights with an absmax scaler, scalers
    themselves quantized to int8 (double quantization). Dequantizes to `weight.dtype`."""
    try:
        from torchao.quantization import to_nf4
    except ImportError:
        raise ImportError("adapter.method=qlora stores the base in NF4 with torchao: pip install 'fastsft[qlora]' "
                          "(or pip install torchao)") from None
    if weight.numel() % NF4_BLOCK_SIZE:
        raise ValueError(f"NF4 needs weights in blocks of {NF4_BLOCK_SIZE}; a {tuple(weight.shape)} matrix has "
                         f"{weight.numel()} elements. Use adapter.method=lora for this model.")
    return to_nf4(weight.detach().contiguous(), NF4_BLOCK_SIZE, nf4_scaler_block_size(weight.numel()))


def is_nf4(weight: torch.Tensor) -> bool:
    return type(weight).__name__ == "NF4Tensor"


def check_nf4_shardable(model: nn.Module, world_size: int) -> None:
    """FSDP2 shards an NF4 weight by rows, cutting each of its packed pieces (4-bit codes, block scalers, their
    int8 quantization factors) into `world_size` equal parts; a weight whose pieces do not divide evenly would stop
    torchao with an assertion deep inside the first all-gather. Raise a ValueError naming the first such weight."""
    for name, param in model.named_parameters():
        if not is_nf4(param):
            continue
        rows, numel = param.shape[0], param.numel()
        n_blocks = numel // NF4_BLOCK_SIZE
        factors = n_blocks // nf4_scaler_block_size(numel)
        if rows % world_size or n_blocks % world_size or factors % world_size:
            raise ValueError(f"adapter.method=qlora on {world_size} processes: {name} {tuple(param.shape)} holds "
                             f"{n_blocks} NF4 blocks in {factors} double-quantization group(s), which FSDP cannot "
                             f"split {world_size} ways (rows, blocks and groups must divide by {world_size}: a matrix "
                             f"of a multiple of {NF4_BLOCK_SIZE * NF4_SCALER_BLOCK_SIZE * world_size} weights does); "
                             "use a world size that divides them, or adapter.method=lora")


def dense_weight(weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A base weight as a plain tensor (NF4 dequantized) in `dtype` (default: its own)."""
    return weight.to(dtype or weight.dtype) if not is_nf4(weight) else weight.get_original_weight().to(dtype or weight.dtype)


def base_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T (+ b) in x's dtype; an NF4 weight is dequantized inside torchao's linear_nf4 (and again in backward,
    nothing dense is kept)."""
    if is_nf4(weight):
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4

        out = linear_nf4(x, weight)
        return out if bias is None else out + bias.to(out.dtype)
    return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


class QuantizedLinear(nn.Module):
    """A frozen block linear stored as NF4 that has no adapter (QLoRA quantizes every block linear)."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = nn.Parameter(quantize_nf4(base.weight), requires_grad=False)
        self.bias = None if base.bias is None else nn.Parameter(base.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return base_linear(x, self.weight, self.bias)


# ---------------------------------------------------------------------------------------------------------------
# The adapted projection
# ---------------------------------------------------------------------------------------------------------------


class LoRALinear(nn.Module):
    """A frozen linear (`weight`, `bias`: the same names as nn.Linear, so the base checkpoint map still applies) with
    a trainable low-rank update `lora_B @ lora_A` and, for DoRA, a trainable per-row magnitude `lora_magnitude`."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 use_dora: bool = False, quantize: bool = False):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.dropout, self.use_dora = rank, float(dropout), use_dora
        self.scaling = alpha / (math.sqrt(rank) if use_rslora else rank)
        weight = base.weight.detach()
        self.weight = nn.Parameter(quantize_nf4(weight) if quantize else weight, requires_grad=False)
        self.bias = None if base.bias is None else nn.Parameter(base.bias.detach(), requires_grad=False)
        kw = dict(device=weight.device, dtype=torch.float32)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's init_lora_weights=True
        self.lora_magnitude = None
        if use_dora:
            with torch.no_grad():
                norm = dense_weight(self.weight, torch.float32).norm(dim=1)
            self.lora_magnitude = nn.Parameter(norm)

    def extra_repr(self) -> str:
        kind = "dora" if self.use_dora else "lora"
        base = "nf4" if is_nf4(self.weight) else str(self.weight.dtype).removeprefix("torch.")
        return (f"in={self.in_features}, out={self.out_features}, {kind} r={self.rank}, scaling={self.scaling:g}, "
                f"dropout={self.dropout:g}, base={base}, bias={self.bias is not None}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return project_group(x, (self,))[0]

    def project_group(self, x: torch.Tensor, projections) -> list[torch.Tensor]:
        """Called by `fastsft.model.shared_input_projections` for projections that read the same `x`."""
        return project_group(x, projections)

    # -- weights without the adapter structure (merge, export, DoRA's norm) ---------------------------------------

    def delta_weight(self) -> torch.Tensor:
        """s * B @ A, fp32 [out, in]."""
        return self.scaling * (self.lora_B.float() @ self.lora_A.float())

    def merged_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight that computes what this module computes: W + s B A, times m / ||W + s B A||_row for
        DoRA. Computed in fp32 from the dequantized base; returned in `dtype` (default: fp32)."""
        with torch.no_grad():
            merged = dense_weight(self.weight, torch.float32) + self.delta_weight()
            if self.use_dora:
                merged = merged * (self.lora_magnitude.float() / merged.norm(dim=1))[:, None]
            return merged.to(dtype or torch.float32)

    def dora_row_norm(self) -> torch.Tensor:
        """||W + s B A|| per output row, fp32, without gradient and without forming the [out, in] sum:
        ||W_i||^2 + 2 s <W_i, (B A)_i> + s^2 ||(B A)_i||^2, where <W_i, (B A)_i> = (B * (W A^T))_i summed over r
        and ||(B A)_i||^2 = (B (A A^T) * B)_i summed over r: one thin GEMM over W and r x r work."""
        with torch.no_grad():
            weight = dense_weight(self.weight)
            a, b, s = self.lora_A.to(weight.dtype), self.lora_B.float(), self.scaling
            w_at = (weight @ a.t()).float()  # [out, r]
            a32 = self.lora_A.float()
            w_sq = torch.linalg.vector_norm(weight, dim=1, dtype=torch.float32).square()
            cross = (b * w_at).sum(dim=1)
            ba_sq = ((b @ (a32 @ a32.t())) * b).sum(dim=1)
            return (w_sq + 2 * s * cross + s * s * ba_sq).clamp(min=0).sqrt()


def project_group(x: torch.Tensor, projections) -> list[torch.Tensor]:
    """Outputs of `projections` (LoRALinear or plain modules) that all read `x`. The adapted ones share one GEMM
    for their A-products (concatenated A) and one dropout mask; each adds its B GEMM into its base output."""
    adapted = [p for p in projections if isinstance(p, LoRALinear)]
    if not adapted:
        return [p(x) for p in projections]
    lead, features = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, features)
    p_drop = adapted[0].dropout
    dropped = p_drop > 0.0 and adapted[0].training
    xa = F.dropout(x2, p_drop, training=True) if dropped else x2
    a_all = adapted[0].lora_A if len(adapted) == 1 else torch.cat([p.lora_A for p in adapted])
    low_rank = F.linear(xa, a_all.to(x.dtype))  # [tokens, sum of ranks]: the one shared A GEMM
    pieces = low_rank.split([p.rank for p in adapted], dim=-1)
    by_module = {id(p): (pieces[i], p.scaling) for i, p in enumerate(adapted)}
    outputs = []
    for p in projections:
        if not isinstance(p, LoRALinear):
            outputs.append(p(x))
            continue
        piece, s = by_module[id(p)]
        lora_b = p.lora_B.to(x.dtype).t()
        if not p.use_dora:
            out = torch.addmm(base_linear(x2, p.weight, p.bias), piece * s, lora_b)
        else:
            g = (p.lora_magnitude / p.dora_row_norm()).to(x.dtype)  # gradient to m only (the norm is detached)
            plain = base_linear(x2, p.weight)
            if dropped:  # PEFT: the magnitude rescales the base on the dropped input (one more base GEMM)
                out = plain + (g - 1) * base_linear(xa, p.weight) + g * ((piece * s) @ lora_b)
            else:
                out = g * torch.addmm(plain, piece * s, lora_b)
            if p.bias is not None:
                out = out + p.bias.to(out.dtype)
        outputs.append(out.reshape(*lead, p.out_features))
    return outputs


# ---------------------------------------------------------------------------------------------------------------
# Applying adapters to a model
# ---------------------------------------------------------------------------------------------------------------


def block_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear projection inside the transformer blocks (not lm_head: the loss reads its weight directly)."""
    return {name: m for name, m in model.named_modules()
            if name.startswith("layers.") and isinstance(m, (nn.Linear, LoRALinear, QuantizedLinear))}


def apply_adapters(model: nn.Module, section: AdapterSection, base_dtype: torch.dtype | None = None,
                   key: str = "adapter") -> nn.Module:
    """Turn `model` (a fastsft Transformer) into a frozen base plus adapters, in place; returns it. Every parameter
    is frozen; the block linears matching `section.target_modules` become LoRALinear (DoRA for method dora; NF4
    base for qlora, which also quantizes the untargeted block linears); `modules_to_save` train fully in fp32.
    `base_dtype` (bf16 on a GPU) is the dtype the frozen 16-bit weights are kept in; None keeps theirs.
    A pattern or module name that matches nothing is an error naming `key`."""
    if section.method not in LORA_METHODS:
        raise ValueError(f"{key}.method={section.method!r}: apply_adapters builds {', '.join(LORA_METHODS)}")
    linears = block_linears(model)
    if any(isinstance(m, (LoRALinear, QuantizedLinear)) for m in linears.values()):
        raise ValueError("the model already has adapters")
    for pattern in section.target_modules:
        if not any(module_matches(name, pattern) for name in linears):
            example = next(iter(linears), "layers.0.self_attn.q_proj")
            raise ValueError(f"{key}.target_modules: {pattern!r} matches no block linear (paths look like {example}); "
                             f"use names such as q_proj, v_proj, down_proj or globs such as 'layers.[0-3].mlp.*'")
    saved = resolve_modules_to_save(model, section.modules_to_save, key)
    for param in model.parameters():
        param.requires_grad_(False)
    if base_dtype is not None:
        saved_ids = {id(p) for m in saved.values() for p in m.parameters()}
        for param in model.parameters():
            if id(param) not in saved_ids and param.is_floating_point():
                param.data = param.data.to(base_dtype)
    quantize = section.method == "qlora"
    for name, linear in linears.items():
        targeted = any(module_matches(name, pattern) for pattern in section.target_modules)
        if targeted:
            new = LoRALinear(linear, section.rank, section.alpha, section.dropout, section.use_rslora,
                             use_dora=section.method == "dora", quantize=quantize)
        elif quantize:
            new = QuantizedLinear(linear)
        else:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
    for module in saved.values():
        for param in module.parameters():
            param.data = param.data.float()
            param.requires_grad_(True)
    return model


def resolve_modules_to_save(model: nn.Module, names: list[str], key: str = "adapter") -> dict[str, nn.Module]:
    """`modules_to_save` entries -> modules: a module path (embed_tokens, lm_head, layers.0.input_layernorm) or a
    glob over paths."""
    import fnmatch

    modules = dict(model.named_modules())
    found = {}
    for entry in names:
        hits = {n: m for n, m in modules.items() if n and (n == entry or fnmatch.fnmatchcase(n, entry))}
        if not hits and entry == "lm_head" and getattr(model, "lm_head", 0) is None:
            raise ValueError(f"{key}.modules_to_save: this model ties lm_head to embed_tokens; name embed_tokens")
        if not hits:
            raise ValueError(f"{key}.modules_to_save: {entry!r} names no module (e.g. embed_tokens, lm_head, "
                             f"layers.0.input_layernorm)")
        found.update(hits)
    if any(isinstance(m, (LoRALinear, QuantizedLinear)) or name.startswith("layers.") and isinstance(m, nn.Linear)
           for name, m in found.items()):
        raise ValueError(f"{key}.modules_to_save names a block linear; adapt it with target_modules instead")
    return found


def adapted_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What an adapter checkpoint holds: every parameter that trains (adapters and modules_to_save), by name."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def merge_adapters(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every LoRALinear (and QuantizedLinear) by a plain nn.Linear holding the merged (dequantized) weight,
    in place; the result is an ordinary Transformer that `save_pretrained` writes as a full checkpoint."""
    for name, module in list(model.named_modules()):
        if not isinstance(module, (LoRALinear, QuantizedLinear)):
            continue
        if isinstance(module, LoRALinear):
            weight = module.merged_weight(dtype)
        else:
            weight = dense_weight(module.weight, torch.float32).to(dtype or torch.float32)
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                           device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if module.bias is not None:
                linear.bias.copy_(module.bias)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, linear)
    if dtype is not None:
        model.to(dtype)
    return model


def parameter_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the model's parameters, of their gradients and of AdamW's state (two fp32-or-param-dtype moments per
    trainable element), counting NF4 weights by their real storage (codes, scalers, factors, lookup table). Works on
    meta-device models: nothing is allocated."""
    params = grads = optimizer = 0
    for p in model.parameters():
        params += storage_bytes(p)
        if p.requires_grad:
            grads += p.numel() * p.element_size()
            optimizer += 2 * p.numel() * p.element_size()
    return {"parameters": params, "gradients": grads, "optimizer": optimizer}


def storage_bytes(tensor: torch.Tensor) -> int:
    if is_nf4(tensor):
        inner = (tensor.quantized_data, tensor.quantized_scalers, tensor.quantization_factor, tensor.scaler_mean,
                 tensor.nf4)
        return sum(t.numel() * t.element_size() for t in inner)
    return tensor.numel() * tensor.element_size()


def adapter_state(model) -> dict:
    """What a checkpoint keeps of an adapted model: the trainable tensors only (adapters + modules_to_save)."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def load_adapter_state(model, state: dict, where: str = "checkpoint") -> None:
    """Load `adapter_state` output back; the keys must be exactly the model's trainable parameters."""
    expected = {name for name, p in model.named_parameters() if p.requires_grad}
    if set(state) != expected:
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(f"{where}: adapter tensors do not match the adapted model (same adapter.* options?): "
                         f"missing {missing[:6]}, unexpected {unexpected[:6]}")
    with torch.no_grad():
        for name, tensor in state.items():
            model.get_parameter(name).copy_(tensor)
