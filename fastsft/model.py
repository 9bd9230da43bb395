"""The Llama-style network on packed variable-length batches: the model alone, read top to bottom in the order data
flows (`ModelConfig`, rotary embedding, `Attention`, `MLP`, `Block`, `Transformer`).

Where it sits: the loader yields `fastsft.data.batch.Batch` rows (documents back to back, positions restarting at 0,
`cu_seqlens` marking document ends); `Transformer.loss(batch)` runs embeddings -> blocks -> final norm ->
`fastsft.ops.linear_cross_entropy` over the batch's `loss_positions` (never a [tokens x vocab] logits tensor).
Compilation, FSDP, checkpointing and the optimizer are applied from outside (`fastsft.train.step`); Hugging Face
config.json translation, the name map and safetensors I/O live beside this file in `fastsft.hf_checkpoint`;
generation in `fastsft.generate`.

Covered: the decoders of model_type llama, mistral, qwen2 and qwen3; grouped-query attention; rope scaling types
llama3 and linear; tied or untied embeddings; qkv bias (qwen2, or llama/qwen3 attention_bias); per-head q/k RMSNorm
(qwen3); head_dim given explicitly.

The residual stream is carried as (x, residual) pairs so every residual add is fused with the norm after it
(`fastsft.ops.add_rms_norm`): a block takes the previous block's MLP output and the running residual, and returns its
own. Under torch.autocast the stream is kept in the autocast dtype (bf16) so the fused norm sees one dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from fastsft.adapters.prefix import attach_prefix
from fastsft.attention import varlen_attention
from fastsft.data.batch import Batch
from fastsft.ops import RMSNorm, linear_cross_entropy

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")  # the families this network computes exactly as transformers
ROPE_TYPES = ("default", "linear", "llama3")


# ---------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None  # None: same as num_attention_heads (no GQA)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # None, {"rope_type": "linear", "factor"} or llama3's five keys
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections (qwen2 always; llama and qwen3 attention_bias)
    attention_out_bias: bool = False  # bias on o_proj (llama and qwen3 attention_bias; never qwen2)
    qk_norm: bool = False  # per-head RMSNorm of q and k before rope (qwen3)
    sliding_window: int | None = None  # recorded only: attention is full causal, see Transformer._check_inputs
    initializer_range: float = 0.02
    model_type: str = "llama"
    extra: dict = field(default_factory=dict)  # other config.json keys, written back unchanged

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r} is not supported; supported: {', '.join(MODEL_TYPES)}")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and isinstance(self.hidden_size, int) and isinstance(self.num_attention_heads, int):
            self.head_dim = self.hidden_size // max(self.num_attention_heads, 1)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"field {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.rope_scaling is not None:
            self.rope_scaling = _check_rope_scaling(self.rope_scaling, self.max_position_embeddings)


def _check_rope_scaling(scaling: dict, max_position_embeddings: int) -> dict:
    """The rope_scaling dict in its one normal form (llama3's or linear's keys only, as floats)."""
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type not in ROPE_TYPES[1:]:
        raise ValueError(f"rope_scaling type {rope_type!r} is not supported; supported: none/default, "
                         f"{', '.join(ROPE_TYPES[1:])}")

    def number(key, default=None):
        value = scaling.get(key, default)
        if value is None:
            raise ValueError(f"rope_scaling of type {rope_type} is missing {key!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"rope_scaling {key} must be a number, got {value!r}")
        return value

    if rope_type == "linear":
        return {"rope_type": "linear", "factor": float(number("factor"))}
    return {
        "rope_type": "llama3",
        "factor": float(number("factor")),
        "low_freq_factor": float(number("low_freq_factor")),
        "high_freq_factor": float(number("high_freq_factor")),
        "original_max_position_embeddings": int(number("original_max_position_embeddings", max_position_embeddings)),
    }


# ---------------------------------------------------------------------------------------------------------------
# Rotary position embedding (computed from position_ids, so it restarts at every document)
# ---------------------------------------------------------------------------------------------------------------


def rope_inv_freq(config: ModelConfig, device=None) -> torch.Tensor:
    """[head_dim / 2] fp32 inverse frequencies, with linear or llama3 scaling, computed as transformers does.
    Built on the fly (a handful of tiny ops per forward) rather than kept as a buffer that `.to(bf16)` would round."""
    dim = config.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    inv_freq = 1.0 / (config.rope_theta ** exponents)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return inv_freq / scaling["factor"]
    # llama3: keep high frequencies, divide low ones by `factor`, interpolate smoothly in between.
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return torch.where(is_medium, smoothed, scaled)


def rotary_cos_sin(position_ids: torch.Tensor, config: ModelConfig, dtype: torch.dtype):
    """cos, sin [T, head_dim] for each token's position (angles in fp32, then cast to the compute dtype)."""
    freqs = position_ids.float()[:, None] * rope_inv_freq(config, position_ids.device)[None, :]
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D] rotated by the angles of its token (the rotate-half layout of Hugging Face checkpoints)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


# ---------------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------------


def shared_input_projections(x: torch.Tensor, projections) -> list[torch.Tensor]:
    """The outputs of projections that read the same input (q/k/v, gate/up). Plain nn.Linear run one by one; an
    adapted projection (`fastsft.adapters.lora.LoRALinear`) has `project_group`, which computes the whole group's
    low-rank A-products as one GEMM."""
    for projection in projections:
        if hasattr(projection, "project_group"):
            return projection.project_group(x, projections)
    return [projection(x) for projection in projections]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, device=None, dtype=None):
        super().__init__()
        hidden, d = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, d
        kw = dict(device=device, dtype=dtype)
        self.q_proj = nn.Linear(hidden, self.num_heads * d, bias=config.attention_bias, **kw)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * d, bias=config.attention_bias, **kw)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * d, bias=config.attention_bias, **kw)
        self.o_proj = nn.Linear(self.num_heads * d, hidden, bias=config.attention_out_bias, **kw)
        self.q_norm = RMSNorm(d, config.rms_norm_eps, **kw) if config.qk_norm else None
        self.k_norm = RMSNorm(d, config.rms_norm_eps, **kw) if config.qk_norm else None

    def forward(self, x, cos, sin, cu_seqlens, max_seqlen: int, prefix=None) -> torch.Tensor:
        num_tokens = x.shape[0]
        q, k, v = shared_input_projections(x, (self.q_proj, self.k_proj, self.v_proj))
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if prefix is None:
            out = varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal=True)
        else:  # prefix tuning: learned keys/values in front of each document's own (fastsft/adapters/prefix.py)
            k, v = attach_prefix(k, v, prefix)
            out = varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal=True, cu_seqlens_k=prefix.cu_seqlens_k,
                                   max_seqlen_k=prefix.max_seqlen_k)
        return self.o_proj(out.reshape(num_tokens, self.num_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig, device=None, dtype=None):
        super().__init__()
        hidden, inner = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(hidden, inner, bias=False, device=device, dtype=dtype)
        self.up_proj = nn.Linear(hidden, inner, bias=False, device=device, dtype=dtype)
        self.down_proj = nn.Linear(inner, hidden, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = shared_input_projections(x, (self.gate_proj, self.up_proj))
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm transformer block over the (x, residual) pair: each norm is fused with the residual add before it.
    The first block gets residual=None (its input is the embeddings themselves)."""

    def __init__(self, config: ModelConfig, device=None, dtype=None):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, device=device, dtype=dtype)
        self.self_attn = Attention(config, device=device, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, device=device, dtype=dtype)
        self.mlp = MLP(config, device=device, dtype=dtype)

    def forward(self, x, residual, cos, sin, cu_seqlens, max_seqlen: int, prefix=None):
        if residual is None:
            normed, residual = self.input_layernorm(x), x
        else:
            normed, residual = self.input_layernorm(x, residual)
        attn_out = self.self_attn(normed, cos, sin, cu_seqlens, max_seqlen, prefix)
        normed, residual = self.post_attention_layernorm(attn_out, residual)
        return self.mlp(normed), residual


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.generation_config: dict | None = None  # a loaded checkpoint's generation_config.json (fastsft.hf_checkpoint)
        kw = dict(device=device, dtype=dtype)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, **kw)
        self.layers = nn.ModuleList(Block(config, **kw) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, **kw)
        # Tied: no lm_head module at all (one parameter, one owner: simpler for FSDP and the optimizer).
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(
            config.hidden_size, config.vocab_size, bias=False, **kw)
        # Prompt tuning / P-tuning / prefix tuning (fastsft/adapters/prompt.py: apply_prompt_adapter), else None.
        self.prompt_adapter = None

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    # -- forward ------------------------------------------------------------------------------------------------

    def forward(self, input_ids, position_ids, cu_seqlens, max_seqlen: int, labels=None, loss_positions=None,
                num_items=None, return_num_correct: bool = False):
        """Final-normed hidden states [T, hidden] of one packed row (the batch contract's tensors); with `labels`,
        the loss instead (see `loss`). The loss is computed inside forward so that wrappers applied to the model
        (FSDP2's gather of the head weight, a compiled forward) cover the head matmul too."""
        self._check_inputs(input_ids, position_ids, max_seqlen)
        x = self.embed_tokens(input_ids)
        if torch.is_autocast_enabled(x.device.type):
            # Keep the residual stream in the compute dtype: the fused add+norm then sees matching dtypes.
            x = x.to(torch.get_autocast_dtype(x.device.type))
        prefixes = None
        if self.prompt_adapter is not None:  # virtual tokens into their slots, or per-layer prefixes
            x, position_ids, prefixes = self.prompt_adapter.adapt(x, position_ids, cu_seqlens, max_seqlen)
        cos, sin = rotary_cos_sin(position_ids, self.config, x.dtype)
        residual = None
        for i, block in enumerate(self.layers):
            prefix = None if prefixes is None else prefixes[i]
            x, residual = block(x, residual, cos, sin, cu_seqlens, max_seqlen, prefix)
        hidden, _ = self.norm(x, residual)
        if labels is None:
            return hidden
        # fp32 master weights under autocast go in as they are: the op runs its GEMMs in hidden's dtype slice by
        # slice and accumulates the weight's fp32 gradient in place (no bf16 [V, H] copy, no second buffer).
        weight = self.lm_head_weight
        return linear_cross_entropy(hidden, weight, labels, loss_positions=loss_positions, reduction="mean",
                                    num_items=num_items, return_num_correct=return_num_correct)

    def _check_inputs(self, input_ids, position_ids, max_seqlen: int) -> None:
        # Shape and Python-int checks only: free at run time, constant under torch.compile.
        if input_ids.dim() != 1 or position_ids.shape != input_ids.shape:
            raise ValueError(f"the model takes one packed row: input_ids and position_ids of shape [T], got "
                             f"{tuple(input_ids.shape)} and {tuple(position_ids.shape)} (see fastsft.data.batch)")
        self.check_max_seqlen(max_seqlen)

    def check_max_seqlen(self, max_seqlen: int) -> None:
        """Attention here is full causal: exact for a sliding-window model only while documents fit the window.
        The trainer calls this at setup with its seq_len, so a too-long row is refused before the first step."""
        window = self.config.sliding_window
        if window is not None and max_seqlen > window:
            raise ValueError(
                f"config sliding_window={window} but max_seqlen={max_seqlen}: fastsft attention is full causal, "
                f"exact only for documents up to the window. Use seq_len <= {window}, or remove sliding_window "
                f"from config.json if full attention is what you want."
            )

    def loss(self, batch: Batch, num_items=None, return_num_correct: bool = False):
        """Cross-entropy summed over the batch's supervised positions (`fastsft.ops.linear_cross_entropy` over
        `loss_positions`: no [tokens x vocab] logits) and divided by `num_items` (a number or a 0-d tensor: the
        optimizer step's global loss-token count), or by this row's count when None. With return_num_correct,
        returns (loss, num_correct) where num_correct is an int64 0-d tensor."""
        check_virtual_tokens(self, batch.virtual_tokens)
        return self(**batch.model_inputs(), labels=batch.labels, loss_positions=batch.loss_positions,
                    num_items=num_items, return_num_correct=return_num_correct)

    def logits(self, input_ids, position_ids, cu_seqlens, max_seqlen: int) -> torch.Tensor:
        """[T, vocab] logits, for evaluation and generation (training uses `loss`, which never builds them)."""
        hidden = self(input_ids, position_ids, cu_seqlens, max_seqlen)
        return F.linear(hidden, self.lm_head_weight.to(hidden.dtype))

    # -- sizes --------------------------------------------------------------------------------------------------

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameter count (a tied matrix counted once); exclude_embeddings drops the input embedding table."""
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            total -= self.embed_tokens.weight.numel()
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward): 6 per matmul weight, plus causal attention
        6 * layers * heads * head_dim * seq_len (QK^T and AV, 2 FLOPs per multiply-add, x3 for backward, halved for
        the causal mask). seq_len is the attention context: for packed rows pass the mean document length weighted
        by tokens (sum(len^2) / sum(len)), not the row length, or the attention term is overstated."""
        c = self.config
        matmul_params = self.num_parameters(exclude_embeddings=True)
        if self.lm_head is None:
            matmul_params += self.embed_tokens.weight.numel()  # the tied table is also the lm_head matmul
        attention = 6 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * seq_len
        return 6 * matmul_params + attention

    # -- construction -------------------------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: ModelConfig, dtype=None, device=None, seed: int | None = None) -> Transformer:
        """Random weights like transformers: linear and embedding weights ~ normal(0, initializer_range), biases 0,
        norm weights 1 (seeded when `seed` is given)."""
        model = cls(config, device=device, dtype=dtype)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=model.embed_tokens.weight.device).manual_seed(seed)
        init_weights(model, config.initializer_range, generator)
        return model


def check_virtual_tokens(model: Transformer, virtual_tokens: int) -> None:
    """A row must reserve exactly the virtual slots the model's prompt adapter fills (prompt tuning / P-tuning:
    num_virtual_tokens in front of each document; none otherwise), or document tokens would be overwritten."""
    wanted = 0 if model.prompt_adapter is None else model.prompt_adapter.row_tokens
    if virtual_tokens != wanted:
        raise ValueError(f"the batch reserves {virtual_tokens} virtual token slots per document but the model's "
                         f"adapter fills {wanted}: build the loader with PackedLoader(virtual_tokens={wanted})")


def init_weights(model: Transformer, std: float, generator: torch.Generator | None = None) -> None:
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std, generator=generator)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
