"""Prompt tuning, P-tuning and prefix tuning (P-tuning v2) on packed rows: the trainable modules and how the model
uses them.

Where it sits: `apply_prompt_adapter(model, config)` freezes the base model and attaches one of the modules below as
`model.prompt_adapter`; `Transformer.forward` calls its `adapt` right after the token embeddings. The parameters
and their names follow PEFT's (`embedding`, `mlp_head`, `lstm_head`, `transform`), so PEFT's weights copy over
one to one; `fastsft.adapters.prompt_peft` writes and reads PEFT's adapter directories.

- prompt_tuning (Lester et al.): n learned embeddings; p_tuning (Liu et al.): the same n embeddings passed through
  a trainable MLP or bidirectional-LSTM encoder each step. Both occupy n VIRTUAL SLOTS in front of every document of
  the packed row: the loader reserves them (`PackedLoader(virtual_tokens=n)`: positions restart at 0 on the first
  slot, so slot k has position k and the document's tokens continue at n, n+1, ... exactly as PEFT's prompt tuning
  on a transformers model, which concatenates the prompts and lets positions run 0..n+L-1), and `adapt` writes the
  prompts into every position < n. Slots carry no loss. Every document of the row sees only its own slots: they are
  part of its attention segment.
- prefix_tuning: n learned keys and values per layer in front of every document's own keys (see
  fastsft/adapters/prefix.py); no slots in the row, and positions shift by n (PEFT feeds the prefix as a KV cache of
  n entries, so transformers places the document's tokens at positions n..n+L-1). With prefix_projection the n
  embeddings go through a Linear-Tanh-Linear (Li & Liang) as PEFT's.

The first token of a document is never a target (nothing in the document precedes it): with labels equal to
input_ids PEFT would also train the last virtual token to predict it. SFT documents begin with their prompt (masked),
so both give the same loss; the tests mask it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from fastsft.adapters.prefix import layer_prefixes

METHODS = ("prompt_tuning", "p_tuning", "prefix_tuning")
INITS = ("random", "vocab", "text")
ENCODER_TYPES = ("mlp", "lstm")


@dataclass
class PromptConfig:
    """What to train. `init` (prompt_tuning): random = N(0, 1) as PEFT's RANDOM, vocab = embeddings of random
    vocabulary tokens (PEFT's SAMPLE_VOCAB), text = embeddings of `init_text` tokenized, repeated or cut to n
    (PEFT's TEXT). `encoder_hidden_size` (p_tuning encoder, prefix projection) defaults to the model's hidden size
    (PEFT: token_dim)."""

    method: str
    num_virtual_tokens: int = 20
    init: str = "random"
    init_text: str | None = None
    encoder_type: str = "mlp"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    prefix_projection: bool = False

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"adapter method {self.method!r} is not one of {', '.join(METHODS)}")
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens < 1:
            raise ValueError(f"num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens!r}")
        if self.init not in INITS:
            raise ValueError(f"prompt init {self.init!r} is not one of {', '.join(INITS)}")
        if self.init != "random" and self.method != "prompt_tuning":
            raise ValueError(f"prompt init {self.init!r} applies to prompt_tuning only (method is {self.method})")
        if self.init == "text" and not self.init_text:
            raise ValueError("prompt init 'text' needs init_text (the text whose token embeddings start the prompt)")
        if self.encoder_type not in ENCODER_TYPES:
            raise ValueError(f"encoder_type {self.encoder_type!r} is not one of {', '.join(ENCODER_TYPES)}")
        if self.encoder_hidden_size is not None and self.encoder_hidden_size < 1:
            raise ValueError(f"encoder_hidden_size must be positive, got {self.encoder_hidden_size}")

    @property
    def row_tokens(self) -> int:
        """Virtual slots the loader reserves in front of each document (0 for prefix tuning)."""
        return 0 if self.method == "prefix_tuning" else self.num_virtual_tokens


def text_init_ids(token_ids: list[int], num_virtual_tokens: int) -> list[int]:
    """The ids whose embeddings start the prompt: the text's ids cut to n, or repeated until n (PEFT's TEXT init)."""
    if not token_ids:
        raise ValueError("prompt init text tokenizes to no tokens; give a non-empty init_text")
    reps = math.ceil(num_virtual_tokens / len(token_ids))
    return (list(token_ids) * reps)[:num_virtual_tokens]


def insert_prompts(x: torch.Tensor, position_ids: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """x [T, hidden] with every position p < n (the virtual slots, position_ids restart at each document) replaced
    by prompts[p]. No host sync; the gather's backward sums each prompt's gradient over the documents."""
    n = prompts.shape[0]
    virtual = (position_ids < n)[:, None]
    rows = position_ids.clamp(max=n - 1).long()
    return torch.where(virtual, prompts.to(x.dtype).index_select(0, rows), x)


class _VirtualPrompt(nn.Module):
    """Shared by prompt tuning and P-tuning: `prompts()` [n, hidden] go into the row's virtual slots."""

    def __init__(self, config: PromptConfig):
        super().__init__()
        self.config = config

    @property
    def row_tokens(self) -> int:
        return self.config.num_virtual_tokens

    def adapt(self, x, position_ids, cu_seqlens, max_seqlen: int):
        return insert_prompts(x, position_ids, self.prompts()), position_ids, None


class PromptTuning(_VirtualPrompt):
    def __init__(self, config: PromptConfig, hidden_size: int, init_embeddings: torch.Tensor | None = None):
        super().__init__(config)
        self.embedding = nn.Embedding(config.num_virtual_tokens, hidden_size)  # N(0, 1): PEFT's RANDOM
        if init_embeddings is not None:
            with torch.no_grad():
                self.embedding.weight.copy_(init_embeddings.float())

    def prompts(self) -> torch.Tensor:
        return self.embedding.weight


class PTuning(_VirtualPrompt):
    """PEFT's PromptEncoder: embedding -> MLP (3 linear layers, ReLU) or bidirectional LSTM -> MLP head."""

    def __init__(self, config: PromptConfig, hidden_size: int):
        super().__init__(config)
        inner = config.encoder_hidden_size or hidden_size
        self.embedding = nn.Embedding(config.num_virtual_tokens, hidden_size)
        if config.encoder_type == "lstm":
            self.lstm_head = nn.LSTM(hidden_size, inner, num_layers=config.encoder_num_layers, bidirectional=True,
                                     batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * inner, 2 * inner), nn.ReLU(), nn.Linear(2 * inner, hidden_size))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(hidden_size, inner), nn.ReLU(), nn.Linear(inner, inner), nn.ReLU(),
                                          nn.Linear(inner, hidden_size))

    def prompts(self) -> torch.Tensor:
        x = self.embedding.weight
        if self.config.encoder_type == "lstm":
            x = self.lstm_head(x[None])[0][0]
        return self.mlp_head(x)


class PrefixTuning(nn.Module):
    """PEFT's PrefixEncoder: the flat prefix [n, layers * 2 * Hkv * D] as one embedding table, or (projection) n
    embeddings of the kv width through Linear-Tanh-Linear."""

    row_tokens = 0

    def __init__(self, config: PromptConfig, num_layers: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.config = config
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        token_dim = num_kv_heads * head_dim  # PEFT's token_dim for grouped-query attention
        width = num_layers * 2 * token_dim
        if config.prefix_projection:
            inner = config.encoder_hidden_size or token_dim
            self.embedding = nn.Embedding(config.num_virtual_tokens, token_dim)
            self.transform = nn.Sequential(nn.Linear(token_dim, inner), nn.Tanh(), nn.Linear(inner, width))
        else:
            self.embedding = nn.Embedding(config.num_virtual_tokens, width)

    def flat(self) -> torch.Tensor:
        """[n, layers * 2 * Hkv * D]: what PEFT saves as prompt_embeddings."""
        x = self.embedding.weight
        return self.transform(x) if self.config.prefix_projection else x

    def adapt(self, x, position_ids, cu_seqlens, max_seqlen: int):
        n = self.config.num_virtual_tokens
        flat = self.flat().to(x.dtype)
        prefixes = layer_prefixes(flat, self.num_layers, self.num_kv_heads, self.head_dim, cu_seqlens, x.shape[0],
                                  max_seqlen)
        return x, position_ids + n, prefixes


def build_prompt_adapter(model, config: PromptConfig, init_token_ids: list[int] | None = None,
                         seed: int = 0) -> nn.Module:
    """The adapter module for `model` (a fastsft Transformer), fp32, on the model's device, initialised from `seed`
    (PyTorch's default initialisers, as PEFT's). `init_token_ids`: for init 'vocab' / 'text', the ids whose
    embeddings start the prompt (see text_init_ids); drawn from `seed` when 'vocab' and not given."""
    c = model.config
    device = model.embed_tokens.weight.device
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        if config.method == "prompt_tuning":
            init = None
            if config.init != "random":
                if init_token_ids is None and config.init == "vocab":
                    init_token_ids = torch.randint(0, c.vocab_size, (config.num_virtual_tokens,)).tolist()
                if init_token_ids is None:
                    raise ValueError("prompt init 'text' needs init_token_ids (tokenize init_text; text_init_ids)")
                ids = torch.tensor(init_token_ids, dtype=torch.int64, device=device)
                if ids.numel() != config.num_virtual_tokens:
                    raise ValueError(f"init_token_ids has {ids.numel()} ids, num_virtual_tokens is "
                                     f"{config.num_virtual_tokens}")
                init = model.embed_tokens.weight.detach()[ids]
            adapter = PromptTuning(config, c.hidden_size, init)
        elif config.method == "p_tuning":
            adapter = PTuning(config, c.hidden_size)
        else:
            adapter = PrefixTuning(config, c.num_hidden_layers, c.num_key_value_heads, c.head_dim)
    return adapter.to(device=device, dtype=torch.float32)


def prompt_config_from_section(section, key: str = "adapter") -> PromptConfig:
    """The PromptConfig of the train config's `adapter` section (fastsft.adapters.config.AdapterSection); an invalid
    combination is a ValueError naming the `adapter.*` option."""
    try:
        return PromptConfig(method=section.method, num_virtual_tokens=section.num_virtual_tokens,
                            init=section.prompt_init, init_text=section.prompt_init_text,
                            encoder_type=section.encoder_type, encoder_hidden_size=section.encoder_hidden_size or None,
                            encoder_num_layers=section.encoder_num_layers, prefix_projection=section.prefix_projection)
    except ValueError as e:
        raise ValueError(f"{key}: {e} (options {key}.num_virtual_tokens, {key}.prompt_init, {key}.prompt_init_text, "
                         f"{key}.encoder_type, {key}.encoder_hidden_size)") from None


def apply_prompt_adapter(model, config: PromptConfig | nn.Module, init_token_ids: list[int] | None = None,
                         seed: int = 0) -> nn.Module:
    """Freeze every base parameter of `model` and attach the adapter (built from `config`, or a module already
    built) as `model.prompt_adapter`; only its parameters train. Returns the adapter."""
    adapter = config if isinstance(config, nn.Module) else build_prompt_adapter(model, config, init_token_ids, seed)
    for param in model.parameters():
        param.requires_grad_(False)
    model.prompt_adapter = adapter
    for param in adapter.parameters():
        param.requires_grad_(True)
    return adapter
