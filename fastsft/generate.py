"""Text generation from a `fastsft.model.Transformer`: the batched, packed generation that the trainer's evaluation
and the `fastsft generate` command (`fastsft.train.generate_command`) use.

Generation packs every unfinished sequence into one row (the batch contract's varlen layout: documents back to back,
`cu_seqlens` marking their ends) and recomputes the whole row at each new token: no KV cache, so it is meant for short
answers and evaluation, not for serving. Greedy by default; --temperature > 0 samples (optionally from the top-k).
"""

from __future__ import annotations

import torch

from fastsft.data.batch import PAD_ID

# The packed row for one forward holds at most this many tokens: bounds the attention's memory on the CPU path,
# whose block-diagonal mask is O(tokens^2).
MAX_TOKENS_PER_FORWARD = 2048


def _model_device(model: torch.nn.Module) -> torch.device:
    param = next(model.parameters())
    return param.device


def _pack(seqs: list[list[int]], device: torch.device):
    """input_ids, position_ids, cu_seqlens, max_seqlen for sequences back to back (no padding needed here)."""
    lengths = [len(s) for s in seqs]
    ids = torch.tensor([t for s in seqs for t in s], dtype=torch.long)
    positions = torch.cat([torch.arange(n, dtype=torch.int32) for n in lengths])
    cu = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int32), 0)
    return ids.to(device), positions.to(device), cu.to(device), max(lengths)


def _next_token_logits(model, seqs: list[list[int]], device) -> torch.Tensor:
    """[len(seqs), vocab] logits of the token after each sequence, from one packed forward. A prompt-tuning or
    P-tuning adapter gets its virtual slots in front of each sequence (fastsft/adapters/prompt.py)."""
    adapter = getattr(model, "prompt_adapter", None)
    if adapter is not None and adapter.row_tokens:
        seqs = [[PAD_ID] * adapter.row_tokens + s for s in seqs]  # the adapter writes its prompts into these slots
    ids, positions, cu, max_seqlen = _pack(seqs, device)
    hidden = model(ids, positions, cu, max_seqlen)
    last = hidden[cu[1:].long() - 1]
    weight = model.lm_head_weight
    return torch.nn.functional.linear(last, weight.to(last.dtype)).float()


def _chunks(indices: list[int], seqs: list[list[int]], budget: int):
    chunk, used = [], 0
    for i in indices:
        n = len(seqs[i])
        if chunk and used + n > budget:
            yield chunk
            chunk, used = [], 0
        chunk.append(i)
        used += n
    if chunk:
        yield chunk


def pick_tokens(logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator | None):
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k > 0:
        k = min(top_k, logits.shape[-1])
        threshold = logits.topk(k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_batch(
    model: torch.nn.Module,
    prompts: list[list[int]],
    max_new_tokens: int,
    stop_ids=(),
    temperature: float = 0.0,
    top_k: int = 0,
    seed: int = 0,
    max_tokens_per_forward: int = MAX_TOKENS_PER_FORWARD,
) -> list[list[int]]:
    """New token ids for each prompt (stop token excluded), greedy when temperature <= 0.

    Each step reads the chosen tokens on the host (a sync per new token): fine here, never used inside training."""
    device = _model_device(model)
    stops = {int(s) for s in stop_ids}
    seqs = [list(map(int, p)) for p in prompts]
    outputs: list[list[int]] = [[] for _ in prompts]
    active = [i for i, p in enumerate(seqs) if p]
    generator = torch.Generator().manual_seed(seed) if temperature > 0 else None
    for _ in range(max_new_tokens):
        if not active:
            break
        still = []
        for chunk in _chunks(active, seqs, max_tokens_per_forward):
            logits = _next_token_logits(model, [seqs[i] for i in chunk], device)
            chosen = pick_tokens(logits, temperature, top_k, generator).tolist()
            for i, token in zip(chunk, chosen, strict=True):
                if token in stops:
                    continue
                outputs[i].append(token)
                seqs[i].append(token)
                still.append(i)
        active = sorted(still)
    return outputs
