"""`fastsft export`: a fastsft checkpoint -> a Hugging Face model directory with its tokenizer.

Sits after training: `fastsft export --checkpoint OUT/checkpoint-00001000 --out my-model` writes config.json,
generation_config.json, model.safetensors (or shards + index) and the tokenizer files, which
`transformers.AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` load offline. --checkpoint may
also be a run directory (OUT): its newest checkpoint that verifies is exported. The weights come from
`fastsft.train.checkpoint.load_model_state`: the checkpoint's files are checked against its checksums, and the shards
of a torchrun run are put back together into full tensors in this one process (no process group, no pickle).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fastsft.train import checkpoint as ckpt

DTYPES = ("auto", "float32", "bfloat16", "float16")


def export_checkpoint(checkpoint, out, dtype: str = "auto", max_shard_size: str = "5GB", tokenizer=None,
                      merge: bool = False, base=None) -> Path:
    """Write `checkpoint` (a checkpoint or a run directory: its newest checkpoint that verifies) as a Hugging Face
    model directory at `out`; returns the checkpoint exported. A checkpoint of an adapter run becomes a PEFT adapter
    directory, or with `merge` a full model with the adapters folded in (bf16 unless `dtype` says otherwise)."""
    import torch

    from fastsft.adapters.peft_io import adapter_run_config, load_adapter_checkpoint, save_merged, save_peft_adapter
    from fastsft.hf_checkpoint import save_pretrained
    from fastsft.train.generate_command import checkpoint_model, load_tokenizer_for

    checkpoint = ckpt.resolve(checkpoint)  # read once to verify, once to load
    if adapter_run_config(checkpoint) is not None:
        model, section, base_dir = load_adapter_checkpoint(checkpoint, ckpt.load_model_state(checkpoint), base=base)
        tok = load_tokenizer_for(checkpoint, tokenizer)
        if merge:
            save_merged(model, Path(out), torch.bfloat16 if dtype == "auto" else getattr(torch, dtype), max_shard_size)
        else:
            save_peft_adapter(model, section, Path(out), base_model_name_or_path=base_dir)
        tok.save_pretrained(Path(out))
        return checkpoint
    if merge:
        raise ValueError(f"--merge: {checkpoint} is a full fine-tuning checkpoint (no adapters to merge); drop --merge")
    model = checkpoint_model(checkpoint)
    tok = load_tokenizer_for(checkpoint, tokenizer)
    torch_dtype = None if dtype == "auto" else getattr(torch, dtype)
    out = Path(out)
    save_pretrained(model, out, max_shard_size=max_shard_size, dtype=torch_dtype)
    tok.save_pretrained(out)
    return checkpoint


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="a checkpoint directory (OUT/checkpoint-<step>) or a run directory (its newest one)")
    parser.add_argument("--out", required=True, metavar="HF_DIR", help="where to write the Hugging Face model")
    parser.add_argument("--dtype", default="auto", choices=DTYPES, help="dtype of the saved weights (auto: as trained)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 5GB or 500MB")
    parser.add_argument("--tokenizer", default=None, help="tokenizer to save with it, if not the checkpoint's")
    parser.add_argument("--merge", action="store_true",
                        help="adapter runs: write a full model with the adapters merged (default: a PEFT adapter dir)")
    parser.add_argument("--base", default=None, metavar="DIR",
                        help="adapter runs: the base model directory, if not the run's model.path")


def run(args) -> int:
    try:
        exported = export_checkpoint(args.checkpoint, args.out, args.dtype, args.max_shard_size, args.tokenizer,
                                     merge=args.merge, base=args.base)
    except (FileNotFoundError, ValueError, ckpt.CheckpointError) as e:
        print(f"fastsft export: error: {e}", file=sys.stderr)
        return 2
    out = args.out
    print(f"exported {exported} -> {out} (load with transformers "
          f"AutoModelForCausalLM.from_pretrained('{out}') and AutoTokenizer.from_pretrained('{out}'))")
    return 0
