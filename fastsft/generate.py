"""`fastsft generate`: a quick look at what a model says, and the batched generation the trainer's evaluation uses.

Sits after training: `fastsft generate --model DIR --prompt "..."` where DIR is a Hugging Face model directory (e.g.
from `fastsft export`) or a fastsft checkpoint directory (OUT/checkpoint-<step>). The prompt goes through the
tokenizer's chat template as one user turn (--raw feeds it as plain text instead).

Generation packs every unfinished sequence into one row (the batch contract's varlen layout: documents back to back,
`cu_seqlens` marking their ends) and recomputes the whole row at each new token: no KV cache, so it is meant for short
answers and evaluation, not for serving. Greedy by default; --temperature > 0 samples (optionally from the top-k).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

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


# ---------------------------------------------------------------------------------------------------------------------
# Loading a model directory or a fastsft checkpoint


def is_fastsft_checkpoint(path: Path) -> bool:
    return (path / "trainer_state.json").is_file()


def load_tokenizer_for(path: Path, override: str | None = None):
    """The tokenizer saved with a model directory or checkpoint (the built-in byte tokenizer when it was used)."""
    from fastsft.data.tokenizer import load_tokenizer

    if override:
        return load_tokenizer(override)
    state_file = path / "trainer_state.json"
    if state_file.is_file():
        kind = (json.loads(state_file.read_text()).get("tokenizer") or {}).get("kind")
        if kind == "byte":
            return load_tokenizer("byte")
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{path}: no tokenizer.json here; pass --tokenizer DIR (or 'byte')")
    return load_tokenizer(str(path))


def load_model(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None):
    """A Transformer from a Hugging Face model directory or a fastsft checkpoint (one-process or sharded)."""
    from fastsft.model import ModelConfig, Transformer, read_json

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"--model {path}: no such directory")
    if not is_fastsft_checkpoint(path):
        return Transformer.from_pretrained(path, dtype=dtype, device=device)
    config = ModelConfig.from_hf_config(read_json(path / "config.json"), source=str(path / "config.json"))
    model = Transformer(config, device="cpu")
    if (path / "model.pt").is_file():
        state = torch.load(path / "model.pt", map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    elif (path / "dcp").is_dir():
        from fastsft.train.distributed import load_sharded_into_full_model

        load_sharded_into_full_model(path / "dcp", model)
    else:
        raise FileNotFoundError(f"{path}: a fastsft checkpoint without model.pt or dcp/ (incomplete copy?)")
    return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)


# ---------------------------------------------------------------------------------------------------------------------
# The command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR", help="Hugging Face model directory or fastsft checkpoint")
    parser.add_argument("--prompt", required=True, help="the user message (or plain text with --raw)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    parser.add_argument("--top-k", type=int, default=0, help="sample only from the k most likely tokens (0 = all)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--system", default=None, help="an optional system message")
    parser.add_argument("--raw", action="store_true", help="feed the prompt as plain text, without the chat template")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory or 'byte' (default: the model's)")
    parser.add_argument("--adapter", default=None, metavar="DIR",
                        help="a PEFT adapter directory to apply to --model (prompt tuning, P-tuning, prefix tuning)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))


def run(args) -> int:
    if args.max_new_tokens <= 0:
        print("fastsft generate: --max-new-tokens must be > 0", file=sys.stderr)
        return 2
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    path = Path(args.model)
    if not path.is_dir():  # checked first: the tokenizer lookup would blame a missing tokenizer.json instead
        print(f"fastsft generate: --model {path}: no such directory; give a Hugging Face model directory or a "
              "fastsft checkpoint", file=sys.stderr)
        return 2
    try:
        tokenizer = load_tokenizer_for(path, args.tokenizer)
        model = load_model(path, device=device)
        if args.adapter:
            from fastsft.adapters.prompt_peft import load_peft_prompt_adapter

            load_peft_prompt_adapter(model, args.adapter)
    except (FileNotFoundError, ValueError) as e:
        print(f"fastsft generate: {e}", file=sys.stderr)
        return 2
    model.eval()
    if args.raw:
        prompt_ids = tokenizer.encode(args.prompt)
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}
        ]
        prompt_ids = tokenizer.prompt_ids(messages)
    if len(prompt_ids) + args.max_new_tokens > model.config.max_position_embeddings:
        print(f"note: prompt ({len(prompt_ids)} tokens) + --max-new-tokens exceeds the model's "
              f"max_position_embeddings ({model.config.max_position_embeddings})", file=sys.stderr)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    with autocast:
        (output,) = generate_batch(model, [prompt_ids], args.max_new_tokens, stop_ids=tokenizer.stop_ids,
                                   temperature=args.temperature, top_k=args.top_k, seed=args.seed)
    # Special tokens (a sampled <pad>, the closing end-of-turn) are markup, not text: keep them out of the answer.
    print(tokenizer.decode(output, skip_special_tokens=True))
    return 0
