"""The Llama-style model on packed variable-length batches, and Hugging Face checkpoints in and out.

Where it sits: the loader yields `fastsft.data.batch.Batch` rows (documents back to back, positions restarting at 0,
`cu_seqlens` marking document ends); `Transformer.loss(batch)` runs embeddings -> blocks -> final norm ->
`fastsft.ops.linear_cross_entropy` over the batch's `loss_positions` (never a [tokens x vocab] logits tensor);
`fastsft.train.step` applies compilation, checkpointing and the optimizer from outside.

Read top to bottom in the order data flows: `ModelConfig` (one Hugging Face config.json, validated), rotary
embedding, `Attention`, `MLP`, `Block`, `Transformer`, then checkpoint I/O (`hf_key_map` is the one explicit name
map between our parameters and Hugging Face's). Supported: model_type llama, mistral, qwen2, qwen3; grouped-query
attention; rope_scaling types llama3 and linear; tied or untied embeddings; qkv bias (qwen2, or llama/qwen3
attention_bias); per-head q/k RMSNorm (qwen3); head_dim given explicitly.

The residual stream is carried as (x, residual) pairs so every residual add is fused with the norm after it
(`fastsft.ops.add_rms_norm`): a block takes the previous block's MLP output and the running residual, and returns its
own. Under torch.autocast the stream is kept in the autocast dtype (bf16) so the fused norm sees one dtype.
"""

from __future__ import annotations

import json
import math
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fastsft._fsutil import replace_dir
from fastsft.adapters.prefix import attach_prefix
from fastsft.attention import varlen_attention
from fastsft.data.batch import Batch
from fastsft.ops import RMSNorm, linear_cross_entropy

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
ROPE_TYPES = ("default", "linear", "llama3")

# config.json keys that ModelConfig owns (read from and written back by it); every other key is kept verbatim in
# `extra` and written back unchanged, so a load -> save round trip loses nothing (bos/eos ids, vendor fields, ...).
_OWNED_KEYS = {
    "architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling",
    "rope_parameters", "max_position_embeddings", "tie_word_embeddings", "attention_bias", "mlp_bias",
    "hidden_act", "sliding_window", "use_sliding_window", "max_window_layers", "layer_types", "initializer_range",
    "partial_rotary_factor", "transformers_version", "torch_dtype", "dtype",
}


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
    sliding_window: int | None = None  # recorded only: attention is full causal, see Transformer.forward
    initializer_range: float = 0.02
    model_type: str = "llama"
    extra: dict = field(default_factory=dict)  # other config.json keys, written back unchanged

    def __post_init__(self):
        if self.model_type not in ARCHITECTURES:
            raise ValueError(f"model_type {self.model_type!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"model config field {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.rope_scaling is not None:
            self.rope_scaling = _check_rope_scaling(self.rope_scaling, self.max_position_embeddings, "rope_scaling")

    @classmethod
    def from_hf_config(cls, cfg: dict, source: str = "config.json") -> ModelConfig:
        """Read a Hugging Face config.json dict (transformers 4.x `rope_theta`/`rope_scaling` or 5.x
        `rope_parameters`). Anything this model would compute differently from transformers is an error naming the
        field in `source` and what is supported."""
        where = f"{source}: "
        model_type = cfg.get("model_type")
        if model_type not in ARCHITECTURES:
            raise ValueError(f"{where}model_type {model_type!r} is not supported; supported: "
                             f"{', '.join(ARCHITECTURES)} (Llama-style decoders)")
        _reject_unsupported(cfg, where)
        rope_theta, rope_scaling = _read_rope(cfg, where)
        # Mistral always names its window; qwen2/qwen3 only when use_sliding_window is on; llama has none.
        windowed = model_type == "mistral" or (model_type in ("qwen2", "qwen3") and cfg.get("use_sliding_window"))
        # Bias: qwen2 always on q/k/v (never o); llama and qwen3 follow attention_bias on all four; mistral never.
        attention_bias = bool(cfg.get("attention_bias", False)) and model_type in ("llama", "qwen3")
        try:
            return cls(
                vocab_size=cfg["vocab_size"],
                hidden_size=cfg["hidden_size"],
                intermediate_size=cfg["intermediate_size"],
                num_hidden_layers=cfg["num_hidden_layers"],
                num_attention_heads=cfg["num_attention_heads"],
                num_key_value_heads=cfg.get("num_key_value_heads"),
                head_dim=cfg.get("head_dim"),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope_theta),
                rope_scaling=rope_scaling,
                max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                attention_bias=attention_bias or model_type == "qwen2",
                attention_out_bias=attention_bias,
                qk_norm=model_type == "qwen3",
                sliding_window=cfg.get("sliding_window") if windowed else None,
                initializer_range=float(cfg.get("initializer_range", 0.02)),
                model_type=model_type,
                extra={k: v for k, v in cfg.items() if k not in _OWNED_KEYS},
            )
        except KeyError as e:
            raise ValueError(f"{where}missing required field {e.args[0]!r}") from None
        except ValueError as e:
            raise ValueError(f"{where}{e}") from None

    def to_hf_config(self, dtype: torch.dtype | None = None) -> dict:
        """The config.json dict transformers reads (4.x and 5.x): rope written both as rope_theta/rope_scaling and
        as rope_parameters."""
        cfg = dict(self.extra)
        rope_parameters = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope_parameters.update(self.rope_scaling)
        cfg.update(
            architectures=[ARCHITECTURES[self.model_type]],
            model_type=self.model_type,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            hidden_act="silu",
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            rope_scaling=dict(self.rope_scaling) if self.rope_scaling is not None else None,
            rope_parameters=rope_parameters,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            initializer_range=self.initializer_range,
        )
        if self.model_type in ("llama", "qwen3"):
            cfg["attention_bias"] = self.attention_bias
        if self.model_type == "llama":
            cfg["mlp_bias"] = False
        if self.model_type == "mistral":
            cfg["sliding_window"] = self.sliding_window
        if self.model_type in ("qwen2", "qwen3"):
            cfg["use_sliding_window"] = self.sliding_window is not None
            cfg["sliding_window"] = self.sliding_window
        if dtype is not None:
            cfg["torch_dtype"] = cfg["dtype"] = str(dtype).removeprefix("torch.")
        return cfg


def _reject_unsupported(cfg: dict, where: str) -> None:
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"{where}hidden_act {act!r} is not supported; supported: silu (SwiGLU MLP)")
    if cfg.get("mlp_bias"):
        raise ValueError(f"{where}mlp_bias=true is not supported; supported: MLP projections without bias")
    if cfg.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{where}partial_rotary_factor {cfg['partial_rotary_factor']} is not supported; "
                         f"supported: 1.0 (rotary over the whole head_dim)")
    if cfg.get("quantization_config"):
        raise ValueError(f"{where}quantized checkpoints are not supported; use the unquantized model")
    layer_types = cfg.get("layer_types") or []
    if cfg.get("use_sliding_window") is False:
        layer_types = []  # qwen2/qwen3 list sliding layers even when sliding is switched off
    if any(t != "full_attention" for t in layer_types):
        raise ValueError(f"{where}layer_types {sorted(set(layer_types))} is not supported; supported: "
                         f"full_attention in every layer")


def _read_rope(cfg: dict, where: str) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling or None) from either the 4.x or the 5.x spelling."""
    params = cfg.get("rope_parameters") or {}
    if params and all(isinstance(v, dict) for v in params.values()):
        raise ValueError(f"{where}per-layer-type rope_parameters are not supported; supported: one rope for all "
                         f"layers")
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling") or params
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if rope_type == "default":
        return theta, None
    return theta, _check_rope_scaling(scaling, cfg.get("max_position_embeddings", 2048), f"{where}rope_scaling")


def _check_rope_scaling(scaling: dict, max_position_embeddings: int, where: str) -> dict:
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type not in ROPE_TYPES[1:]:
        raise ValueError(f"{where} type {rope_type!r} is not supported; supported: none/default, "
                         f"{', '.join(ROPE_TYPES[1:])}")
    try:
        if rope_type == "linear":
            return {"rope_type": "linear", "factor": float(scaling["factor"])}
        return {
            "rope_type": "llama3",
            "factor": float(scaling["factor"]),
            "low_freq_factor": float(scaling["low_freq_factor"]),
            "high_freq_factor": float(scaling["high_freq_factor"]),
            "original_max_position_embeddings": int(
                scaling.get("original_max_position_embeddings", max_position_embeddings)
            ),
        }
    except KeyError as e:
        raise ValueError(f"{where} of type {rope_type} is missing {e.args[0]!r}") from None


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
        q = self.q_proj(x).view(num_tokens, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(num_tokens, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(num_tokens, self.num_kv_heads, self.head_dim)
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
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


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
        self.generation_config: dict | None = None  # generation_config.json of the checkpoint, written back on save
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
        weight = self.lm_head_weight
        if weight.dtype != hidden.dtype:  # fp32 master weights under autocast: the matmul runs in bf16
            weight = weight.to(hidden.dtype)
        return linear_cross_entropy(hidden, weight, labels, loss_positions=loss_positions, reduction="mean",
                                    num_items=num_items, return_num_correct=return_num_correct)

    def _check_inputs(self, input_ids, position_ids, max_seqlen: int) -> None:
        # Shape and Python-int checks only: free at run time, constant under torch.compile.
        if input_ids.dim() != 1 or position_ids.shape != input_ids.shape:
            raise ValueError(f"the model takes one packed row: input_ids and position_ids of shape [T], got "
                             f"{tuple(input_ids.shape)} and {tuple(position_ids.shape)} (see fastsft.data.batch)")
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
    def from_config(cls, config: ModelConfig | dict, dtype=None, device=None, seed: int | None = None):
        """Random weights like transformers: linear and embedding weights ~ normal(0, initializer_range), biases 0,
        norm weights 1. `config` is a ModelConfig or a config.json-style dict (model_type defaults to llama)."""
        if isinstance(config, dict):
            config = ModelConfig.from_hf_config({"model_type": "llama", **config}, source="config dict")
        model = cls(config, device=device, dtype=dtype)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=model.embed_tokens.weight.device).manual_seed(seed)
        init_weights(model, config.initializer_range, generator)
        return model

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None, device=None) -> Transformer:
        """Load a local Hugging Face model directory: config.json plus model.safetensors, or shards listed in
        model.safetensors.index.json. dtype None keeps the stored dtype."""
        path = Path(path)
        config = ModelConfig.from_hf_config(read_json(path / "config.json"), source=str(path / "config.json"))
        hf_tensors = read_safetensors(path, device)
        state = hf_to_state_dict(hf_tensors, config, path)
        if dtype is not None:
            state = {k: v.to(dtype) for k, v in state.items()}
        with torch.device("meta"):
            model = cls(config)
        model.load_state_dict(state, strict=True, assign=True)
        generation = path / "generation_config.json"
        model.generation_config = read_json(generation) if generation.exists() else None
        return model

    # -- saving -------------------------------------------------------------------------------------------------

    def save_pretrained(self, path, max_shard_size: int | str = "5GB", dtype: torch.dtype | None = None) -> Path:
        """Write the Hugging Face layout (config.json, generation_config.json, model.safetensors or shards plus
        model.safetensors.index.json) that `transformers.AutoModelForCausalLM.from_pretrained` loads. Atomic: written
        into a temporary sibling directory, then swapped in; other files already in `path` (a tokenizer) are kept."""
        tensors = {}
        for ours, theirs in hf_key_map(self.config).items():
            tensor = self.get_parameter(ours).detach()
            if hasattr(tensor, "full_tensor"):  # FSDP2 DTensor: gather the full matrix
                tensor = tensor.full_tensor()
            # Save path, not the step: safetensors writes from host memory, so each weight is copied to the CPU once.
            tensors[theirs] = tensor.to(dtype or tensor.dtype).contiguous().cpu()
        saved_dtype = dtype or self.embed_tokens.weight.dtype
        files = {
            "config.json": json.dumps(self.config.to_hf_config(saved_dtype), indent=2, sort_keys=True) + "\n",
            "generation_config.json": json.dumps(self._generation_config(), indent=2, sort_keys=True) + "\n",
        }
        return write_checkpoint(Path(path), tensors, files, parse_size(max_shard_size))

    def _generation_config(self) -> dict:
        if self.generation_config is not None:
            return dict(self.generation_config)
        keys = ("bos_token_id", "eos_token_id", "pad_token_id")
        return {k: self.config.extra[k] for k in keys if self.config.extra.get(k) is not None}


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


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face checkpoints: the name map, reading, writing
# ---------------------------------------------------------------------------------------------------------------


def hf_key_map(config: ModelConfig) -> dict[str, str]:
    """Our parameter name -> its name in a Hugging Face *ForCausalLM checkpoint, for every tensor, in file order.
    Our module tree mirrors transformers' under `model.`, so the map is explicit but shallow."""
    layer_names = ["input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
                   "self_attn.v_proj.weight", "self_attn.o_proj.weight"]
    if config.attention_bias:
        layer_names += ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"]
    if config.attention_out_bias:
        layer_names += ["self_attn.o_proj.bias"]
    if config.qk_norm:
        layer_names += ["self_attn.q_norm.weight", "self_attn.k_norm.weight"]
    layer_names += ["post_attention_layernorm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                    "mlp.down_proj.weight"]
    names = {"embed_tokens.weight": "model.embed_tokens.weight"}
    for i in range(config.num_hidden_layers):
        for name in layer_names:
            names[f"layers.{i}.{name}"] = f"model.layers.{i}.{name}"
    names["norm.weight"] = "model.norm.weight"
    if not config.tie_word_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    return names


def _ignorable(hf_name: str, config: ModelConfig) -> bool:
    """Checkpoint tensors that carry no weights of ours: rotary caches, and lm_head when it is tied."""
    return hf_name.endswith("rotary_emb.inv_freq") or (config.tie_word_embeddings and hf_name == "lm_head.weight")


def hf_to_state_dict(hf_tensors: dict[str, torch.Tensor], config: ModelConfig, path: Path) -> dict:
    """Rename checkpoint tensors to ours; a missing, unexpected or misshapen tensor is an error listing them."""
    ours_of = {theirs: ours for ours, theirs in hf_key_map(config).items()}
    missing = [name for name in ours_of if name not in hf_tensors]
    unexpected = [name for name in hf_tensors if name not in ours_of and not _ignorable(name, config)]
    if missing or unexpected:
        raise ValueError(
            f"{path}: the weights do not match config.json (model_type={config.model_type}, "
            f"num_hidden_layers={config.num_hidden_layers}, tie_word_embeddings={config.tie_word_embeddings}): "
            f"missing {_some(missing)}; unexpected {_some(unexpected)}. Check that config.json and the "
            f"*.safetensors files come from the same model."
        )
    expected_shapes = _expected_shapes(config)
    state = {}
    for theirs, ours in ours_of.items():
        tensor = hf_tensors[theirs]
        if tuple(tensor.shape) != expected_shapes[ours]:
            raise ValueError(f"{path}: tensor {theirs} has shape {tuple(tensor.shape)}, config.json implies "
                             f"{expected_shapes[ours]}")
        state[ours] = tensor
    return state


def _expected_shapes(config: ModelConfig) -> dict[str, tuple]:
    with torch.device("meta"):
        model = Transformer(config)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def _some(names: list[str], limit: int = 8) -> str:
    if not names:
        return "none"
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def read_json(path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: expected a Hugging Face model directory (config.json and "
                                f"*.safetensors)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}, line {e.lineno}, column {e.colno}: invalid JSON: {e.msg}") from None


def read_safetensors(path: Path, device=None) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint in `path`, single-file or sharded (index.json)."""
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no 'weight_map' object")
        files = sorted(set(weight_map.values()))
    elif (path / "model.safetensors").exists():
        weight_map, files = None, ["model.safetensors"]
    else:
        found = sorted(p.name for p in path.glob("*.bin"))
        hint = f" (found {', '.join(found)}: convert PyTorch .bin weights to safetensors first)" if found else ""
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json{hint}")
    tensors = {}
    for name in files:
        file = path / name
        if not file.exists():
            raise FileNotFoundError(f"{file} is listed in {index.name} but missing")
        tensors.update(load_file(str(file), device=str(device) if device is not None else "cpu"))
    if weight_map is not None:
        absent = [k for k in weight_map if k not in tensors]
        if absent:
            raise ValueError(f"{index}: lists tensors its shards do not contain: {_some(absent)}")
    return tensors


def parse_size(size: int | str) -> int:
    """Bytes in "5GB" / "500MB" / "2GiB" / 1000 (decimal units as transformers uses them, binary for *iB)."""
    if isinstance(size, int):
        return size
    text = size.strip().upper()
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    for unit, scale in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * scale)
    return int(text)


def shard_tensors(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Greedy split in order; a tensor larger than max_bytes gets a shard of its own."""
    shards, current, current_bytes = [], {}, 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and current_bytes + nbytes > max_bytes:
            shards.append(current)
            current, current_bytes = {}, 0
        current[name] = tensor
        current_bytes += nbytes
    if current:
        shards.append(current)
    return shards


_MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json")


def write_checkpoint(path: Path, tensors: dict[str, torch.Tensor], text_files: dict[str, str], max_bytes: int):
    from safetensors.torch import save_file

    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        shards = shard_tensors(tensors, max_bytes)
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, start=1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / name), metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, name))
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        for name, text in text_files.items():
            (tmp / name).write_text(text)
        if path.exists():
            _carry_over_other_files(path, tmp)
        replace_dir(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _carry_over_other_files(old_dir: Path, new_dir: Path) -> None:
    """Copy what is not model weights or config (tokenizer files, README) from an existing directory."""
    for item in old_dir.iterdir():
        is_shard = item.name.startswith("model-") and item.name.endswith(".safetensors")
        if item.name in _MODEL_FILES or is_shard or (new_dir / item.name).exists():
            continue
        if item.is_dir():
            shutil.copytree(item, new_dir / item.name)
        else:
            shutil.copy2(item, new_dir / item.name)




# ---------------------------------------------------------------------------------------------------------------
# Generation (evaluation and the demo; not a serving path)
# ---------------------------------------------------------------------------------------------------------------


def generate(model: Transformer, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, eos_id: int | list[int] | None = None, seed: int = 0) -> list[int]:
    """New token ids after `prompt_ids` (eos excluded), greedy when temperature is 0. Re-runs the packed forward
    over the whole sequence for every token (no KV cache): fine for evaluation-sized models. Delegates to
    `fastsft.generate.generate_batch`, which batches many prompts in one packed row."""
    from fastsft.generate import generate_batch

    stops = [] if eos_id is None else ([eos_id] if isinstance(eos_id, int) else list(eos_id))
    (tokens,) = generate_batch(model, [list(prompt_ids)], max_new_tokens, stop_ids=stops, temperature=temperature,
                               top_k=top_k or 0, seed=seed)
    return tokens
