"""Prefix tuning (deep, as P-tuning v2): learned keys and values in front of every document's own keys, in every
layer, on packed rows.

Where it sits: `fastsft.adapters.prompt.PrefixTuning` owns the parameters and makes one `LayerPrefix` per block for
each forward; `fastsft.model.Attention` calls `attach_prefix` after rope, so the prefix keys are used as stored
(no rope, no q/k norm), exactly as PEFT's past_key_values are.

Packed layout. The row's documents keep their tokens; the keys of segment s (every segment of the fixed-length
`cu_seqlens`, the padding tail and empty ones included, so shapes never depend on the data) become
[prefix (n rows) | the segment's own keys], at cu_seqlens_k[s] = cu_seqlens[s] + n * s. That is T + n * S key rows for
S segments. Because the prefix is the same for every document, the packed keys are one gather from
cat(doc keys, prefix keys): `key_index` names, for each packed key row, its row in that concatenation, and the
gradient of the prefix sums over documents through the gather's backward. FlashAttention varlen takes cu_seqlens_k
and aligns causal attention at the ends of the key ranges (query i of a document sees the prefix and its own keys
0..i), which `fastsft.attention` implements on every backend.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class LayerPrefix(NamedTuple):
    keys: torch.Tensor  # [n, Hkv, D]
    values: torch.Tensor  # [n, Hkv, D]
    key_index: torch.Tensor  # [T + n * S] int64, rows of cat(doc keys [T], prefix [n])
    cu_seqlens_k: torch.Tensor  # [S + 1] int32
    max_seqlen_k: int


def prefix_key_layout(cu_seqlens: torch.Tensor, num_tokens: int, num_virtual: int):
    """(key_index [T + n*S] int64, cu_seqlens_k [S + 1] int32) for a row of `num_tokens` tokens whose segments are
    `cu_seqlens` (S + 1 offsets) and a prefix of `num_virtual` rows. On the device, fixed shapes, no host sync."""
    n = num_virtual
    num_segments = cu_seqlens.numel() - 1
    cu = cu_seqlens.to(torch.int64)
    cu_k = cu + n * torch.arange(num_segments + 1, device=cu.device)
    slot = torch.arange(num_tokens + n * num_segments, device=cu.device)
    segment = torch.searchsorted(cu_k[1:].contiguous(), slot, right=True).clamp(max=num_segments - 1)
    local = slot - cu_k[segment]  # 0..n-1: prefix row; n..: the segment's own tokens
    key_index = torch.where(local < n, num_tokens + local, cu[segment] + local - n)
    return key_index, cu_k.to(torch.int32)


def layer_prefixes(flat: torch.Tensor, num_layers: int, num_kv_heads: int, head_dim: int, cu_seqlens: torch.Tensor,
                   num_tokens: int, max_seqlen: int) -> list[LayerPrefix]:
    """Split PEFT's flat prefix [n, layers * 2 * Hkv * D] (layer i: keys at 2i, values at 2i + 1, as PEFT's
    `get_prompt` views and permutes it) into one LayerPrefix per layer, sharing the key layout."""
    n = flat.shape[0]
    per_layer = flat.view(n, num_layers * 2, num_kv_heads, head_dim)
    key_index, cu_k = prefix_key_layout(cu_seqlens, num_tokens, n)
    return [LayerPrefix(per_layer[:, 2 * i], per_layer[:, 2 * i + 1], key_index, cu_k, max_seqlen + n)
            for i in range(num_layers)]


def attach_prefix(k: torch.Tensor, v: torch.Tensor, prefix: LayerPrefix):
    """(keys, values) [T + n*S, Hkv, D] with the prefix in front of every segment's own keys (module docstring)."""
    keys = torch.cat((k, prefix.keys.to(k.dtype))).index_select(0, prefix.key_index)
    values = torch.cat((v, prefix.values.to(v.dtype))).index_select(0, prefix.key_index)
    return keys, values
