"""Fine-tune with the transformers Trainer, fastsft's fused ops patched into the model with one line.

    python examples/hf_trainer.py                 # tiny random Llama, demo data, padding-free batches, CPU
    python examples/hf_trainer.py --padded        # padded batches (attention_mask) instead
    python examples/hf_trainer.py --no-fastsft    # the same run without the patch, to compare the losses

The one line is `fastsft.integrations.transformers.apply(model)`: fastsft's RMSNorm in every norm, and a training
loss computed by fastsft's fused linear cross-entropy without the [tokens x vocab] logits. Everything else is the
plain transformers recipe. The model is a tiny random Llama built from a config (nothing is downloaded), the
tokenizer fastsft's byte tokenizer saved as a transformers tokenizer, the data fastsft's demo conversations (a few
inline ones when the demo files are absent). Labels train the assistant replies only.

`examples/trl_sft.py` reuses the pieces below.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    DataCollatorWithFlattening,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainingArguments,
)

import fastsft
from fastsft.data.sources import read_documents
from fastsft.data.tokenizer import load_tokenizer
from fastsft.integrations.transformers import apply as apply_fastsft

DEMO_FILE = Path(fastsft.__file__).parent / "demo_data" / "train_messages.jsonl"
INLINE_CONVERSATIONS = [
    [{"role": "user", "content": "Reverse the word.\n\nsnake"}, {"role": "assistant", "content": "ekans"}],
    [{"role": "user", "content": "Add the numbers.\n\n12+30"}, {"role": "assistant", "content": "42"}],
    [{"role": "user", "content": "Write the word in capitals.\n\nlamp"}, {"role": "assistant", "content": "LAMP"}],
    [{"role": "user", "content": "Sort the letters.\n\ndcab"}, {"role": "assistant", "content": "abcd"}],
]


def load_conversations(limit: int) -> list[list[dict]]:
    """Up to `limit` demo conversations (role/content messages); the inline ones when the demo data is absent."""
    if not DEMO_FILE.is_file():
        print(f"demo data not found at {DEMO_FILE}: using {len(INLINE_CONVERSATIONS)} inline conversations")
        return list(itertools.islice(itertools.cycle(INLINE_CONVERSATIONS), limit))
    return [doc for _, _, doc in itertools.islice(read_documents(DEMO_FILE), limit)]


def byte_tokenizer(directory: Path):
    """fastsft's byte tokenizer (its ids and chat template), saved and reloaded as a transformers tokenizer."""
    load_tokenizer("byte").save_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory)


def tokenize_conversations(conversations: list[list[dict]]) -> list[dict]:
    """input_ids and labels (-100 except on the assistant replies), unshifted as transformers expects."""
    tokenizer = load_tokenizer("byte")
    examples = []
    for messages in conversations:
        ids, loss_mask = tokenizer.encode_conversation(messages)
        ids = ids.tolist()
        labels = [t if m else -100 for t, m in zip(ids, loss_mask.tolist(), strict=True)]
        examples.append({"input_ids": ids, "labels": labels})
    return examples


def tiny_llama(vocab_size: int, pad_token_id: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=pad_token_id,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def training_arguments(output_dir: str, steps: int, batch_size: int, accumulation: int) -> TrainingArguments:
    return TrainingArguments(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation, learning_rate=3e-3, lr_scheduler_type="constant", warmup_steps=0,
        logging_steps=1, report_to="none", save_strategy="no", use_cpu=not torch.cuda.is_available(), seed=0,
        disable_tqdm=True, dataloader_num_workers=0,
    )


def greedy_reply(model, tokenizer, messages: list[dict], max_new_tokens: int = 12) -> str:
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    model.eval()
    with torch.no_grad():
        # Stop at the end of the assistant turn as well as at eos (the byte tokenizer's template closes turns with
        # <|end|>).
        stop_ids = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|end|>")]
        out = model.generate(**prompt, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=[i for i in stop_ids if i is not None])
    return tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)


def train_and_report(trainer, model, tokenizer, conversations, patched: bool) -> list[float]:
    """Train, print the logged losses and one greedy reply; return the losses (the tests compare them)."""
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    print("fastsft" if patched else "unpatched", "losses:", " ".join(f"{x:.4f}" for x in losses))
    print("greedy reply:", repr(greedy_reply(model, tokenizer, conversations[0][:1])))
    return losses


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=16, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch")
    parser.add_argument("--accumulation", type=int, default=2, help="gradient accumulation steps")
    parser.add_argument("--padded", action="store_true", help="padded batches instead of padding-free ones")
    parser.add_argument("--no-fastsft", action="store_true", help="run the unpatched model, for comparison")
    parser.add_argument("--output-dir", default=None, help="where the Trainer writes (default: a temp dir)")
    return parser.parse_args(argv)


def main(argv=None) -> list[float]:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = byte_tokenizer(Path(tmp) / "tokenizer")
        model = tiny_llama(len(tokenizer), tokenizer.pad_token_id)
        if not args.no_fastsft:
            model = apply_fastsft(model)  # <- the one line
        conversations = load_conversations(args.steps * args.batch_size * args.accumulation)
        collator = (DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100) if args.padded
                    else DataCollatorWithFlattening())
        trainer = Trainer(
            model=model, args=training_arguments(args.output_dir or tmp, args.steps, args.batch_size,
                                                 args.accumulation),
            train_dataset=tokenize_conversations(conversations), data_collator=collator,
        )
        return train_and_report(trainer, model, tokenizer, conversations, patched=not args.no_fastsft)


if __name__ == "__main__":
    main()
