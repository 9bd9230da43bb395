"""Fine-tune with TRL's SFTTrainer, fastsft's RMSNorm patched into the model with one line (TRL is optional).

    pip install trl
    python examples/trl_sft.py                # tiny random Llama, demo conversations, padding-free batches, CPU
    python examples/trl_sft.py --no-fastsft   # the same run without the patch, to compare the losses

The dataset is in TRL's conversational prompt-completion form ({"prompt": [user turn], "completion": [assistant
turn]}), so TRL applies the tokenizer's chat template and trains on the completion only.

What fastsft changes inside TRL: `apply(model)` swaps every RMSNorm for fastsft's. The loss is TRL's own: recent
SFTTrainer versions (checked with trl 1.16) wrap `model.forward` with their own chunked fused LM head and call it
with `fused_lm_head=True`, which runs the decoder and TRL's loss and never reaches fastsft's loss patch. With a TRL
that calls the model with plain `labels` instead, the loss would be fastsft's fused linear cross-entropy; such
versions read `outputs.logits` for their token-accuracy metric, which the fused path leaves None, so there pass
`apply(model, loss=False)`.

Tiny model, byte tokenizer and data loading come from `examples/hf_trainer.py`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # hf_trainer.py beside this file

from hf_trainer import byte_tokenizer, load_conversations, tiny_llama, train_and_report  # noqa: E402

from fastsft.integrations.transformers import apply as apply_fastsft  # noqa: E402


def prompt_completion_dataset(conversations: list[list[dict]]):
    from datasets import Dataset

    return Dataset.from_list([{"prompt": c[:-1], "completion": c[-1:]} for c in conversations])


def sft_config(output_dir: str, steps: int, batch_size: int, accumulation: int):
    import torch
    from trl import SFTConfig

    return SFTConfig(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation, learning_rate=3e-3, lr_scheduler_type="constant",
        logging_steps=1, report_to="none", save_strategy="no", use_cpu=not torch.cuda.is_available(), seed=0,
        disable_tqdm=True, dataloader_num_workers=0,
        padding_free=True, max_length=None,  # padding-free rows; the demo conversations are short
    )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=8, help="conversations per micro-batch")
    parser.add_argument("--accumulation", type=int, default=2, help="gradient accumulation steps")
    parser.add_argument("--no-fastsft", action="store_true", help="run the unpatched model, for comparison")
    parser.add_argument("--output-dir", default=None, help="where the trainer writes (default: a temp dir)")
    return parser.parse_args(argv)


def main(argv=None) -> list[float]:
    try:
        from trl import SFTTrainer
    except ImportError:
        print("TRL is not installed: `pip install trl` to run this example.")
        return []
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = byte_tokenizer(Path(tmp) / "tokenizer")
        model = tiny_llama(len(tokenizer), tokenizer.pad_token_id)
        if not args.no_fastsft:
            model = apply_fastsft(model)  # <- the one line, before the trainer wraps the model
        conversations = load_conversations(args.steps * args.batch_size * args.accumulation)
        trainer = SFTTrainer(
            model=model, processing_class=tokenizer, train_dataset=prompt_completion_dataset(conversations),
            args=sft_config(args.output_dir or tmp, args.steps, args.batch_size, args.accumulation),
        )
        return train_and_report(trainer, model, tokenizer, conversations, patched=not args.no_fastsft)


if __name__ == "__main__":
    main()
