"""`fastsft generate`: a quick look at what a model says.

Sits after training, beside `fastsft export`: `fastsft generate --model DIR --prompt "..."` where DIR is a Hugging Face
model directory (e.g. from `fastsft export`) or a fastsft checkpoint directory (OUT/checkpoint-<step>). The prompt goes
through the tokenizer's chat template as one user turn (--raw feeds it as plain text instead); the tokens come from
`fastsft.generate.generate_batch` (greedy by default; --temperature > 0 samples, optionally from the top-k).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from fastsft.adapters.peft_io import adapter_run_config, apply_peft_dir, load_adapter_checkpoint, read_adapter_config
from fastsft.adapters.prompt_peft import load_peft_prompt_adapter
from fastsft.data.prepare import json_object_arg
from fastsft.data.tokenizer import load_tokenizer
from fastsft.generate import generate_batch
from fastsft.hf_checkpoint import config_from_hf, load_pretrained, read_json
from fastsft.model import Transformer
from fastsft.train import checkpoint as ckpt

# ---------------------------------------------------------------------------------------------------------------------
# Loading a model directory or a fastsft checkpoint


def is_fastsft_checkpoint(path: Path) -> bool:
    return (path / ckpt.CHECKSUMS).is_file() or ckpt.is_old_format(path)


def load_tokenizer_for(path: Path, override: str | None = None):
    """The tokenizer saved with a model directory or checkpoint (the built-in byte tokenizer when it was used)."""
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
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"--model {path}: no such directory")
    if not is_fastsft_checkpoint(path):
        return load_pretrained(path, dtype=dtype, device=device)
    path = ckpt.resolve(path)  # verified against its checksums; an older format is an error
    if adapter_run_config(path) is not None:  # adapters only: the base from the run's model.path, adapters on top
        return load_adapter_checkpoint(path, ckpt.load_model_state(path), device=device)[0]
    model = checkpoint_model(path)
    return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)


def checkpoint_model(path: Path) -> Transformer:
    """The model of a (verified) fastsft checkpoint on the CPU: config.json + the full weights, shards put together."""
    config = config_from_hf(read_json(path / "config.json"), source=str(path / "config.json"))
    model = Transformer(config, device="cpu")
    model.load_state_dict(ckpt.load_model_state(path))
    return model


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
    parser.add_argument("--chat-template-kwargs", type=json_object_arg, default=None, metavar="JSON",
                        help="keyword arguments for the chat template, as a JSON object (e.g. '{\"enable_thinking\": "
                             "false}'): the ones the data was prepared with")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory or 'byte' (default: the model's)")
    parser.add_argument("--adapter", default=None, metavar="DIR",
                        help="a PEFT adapter directory to apply to --model (LoRA/DoRA, e.g. from fastsft export; prompt "
                             "tuning, P-tuning, prefix tuning)")
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
            if read_adapter_config(args.adapter).get("peft_type") == "LORA":
                apply_peft_dir(model, args.adapter)
            else:
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
        try:
            prompt_ids = tokenizer.prompt_ids(messages, args.chat_template_kwargs)
        except ValueError as e:  # a template that rejects these keyword arguments
            print(f"fastsft generate: {e}", file=sys.stderr)
            return 2
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
