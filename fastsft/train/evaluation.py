"""Evaluation during a run: held-out loss and token accuracy, exact match of greedy generations, and early stopping.

Sits beside the trainer loop (`fastsft.train.trainer`), which calls an `Evaluator` at step 0 (eval.eval_at_start),
every eval.eval_steps steps and at the end, then `early_stopping` with the result. The validation rows come from the
same packing loader as training (this rank's share); the sums are all-reduced once per evaluation (the one host sync).
Generation runs on held-out prompts: everything before a document's last supervised run is the prompt, that run
(without stop tokens) the expected answer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fastsft.train import distributed


@dataclass
class GenerationExample:
    prompt_ids: list
    reference_ids: list


def generation_examples(dataset, tokenizer, count: int) -> list[GenerationExample]:
    """Prompt and reference answer of the first `count` documents of a split: the prompt is every token before the
    document's last supervised run (the final assistant turn), the reference is that run without stop tokens."""
    stops = set(tokenizer.stop_ids)
    examples = []
    for i in range(min(count, len(dataset))):
        tokens, mask = dataset[i]
        mask = np.asarray(mask, dtype=bool)
        where = np.flatnonzero(mask)
        if len(where) == 0:
            continue
        end = int(where[-1]) + 1
        start = end - 1
        while start > 0 and mask[start - 1]:
            start -= 1
        reference = [int(t) for t in tokens[start:end] if int(t) not in stops]
        examples.append(GenerationExample([int(t) for t in tokens[:start]], reference))
    return examples


class Evaluator:
    """Validation loss / token accuracy over the val split (or eval.eval_max_batches rows of it), plus exact-match
    accuracy of greedy generations when eval.generation_samples > 0. `make_loader(dataset, seed)` builds this rank's
    packed rows of a split; `precision` supplies the autocast context (`fastsft.train.step.Precision`)."""

    def __init__(self, cfg, val_data, tokenizer, make_loader, precision, info: distributed.DistInfo):
        self.cfg, self.val_data, self.tokenizer, self.info = cfg, val_data, tokenizer, info
        self.make_loader, self.precision = make_loader, precision
        count = cfg.eval.generation_samples
        self.examples = generation_examples(val_data, tokenizer, count) if val_data is not None and count else []

    @property
    def has_work(self) -> bool:
        return self.val_data is not None or bool(self.examples)

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, step: int) -> dict:
        result: dict = {"step": step}
        was_training = model.training
        model.eval()
        try:
            if self.val_data is not None:
                result.update(self._validation_loss(model))
            if self.examples:
                result.update(self._generation_accuracy(model))
        finally:
            model.train(was_training)
        return result

    def _validation_loss(self, model) -> dict:
        loader = self.make_loader(self.val_data, seed=0)
        device = self.info.device
        totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, tokens
        limit = self.cfg.eval.eval_max_batches
        for i, batch in enumerate(loader):
            if limit and i >= limit:
                break
            batch = batch.to(device)
            with self.precision.autocast(device):
                loss_sum, correct = model.loss(batch, num_items=1.0, return_num_correct=True)
            totals[0] += loss_sum.double()
            totals[1] += correct.double()
            totals[2] += batch.num_loss_tokens
        totals = distributed.all_reduce_sum(totals, self.info).cpu()  # the one sync of the evaluation
        tokens = max(totals[2].item(), 1.0)
        return {"val_loss": totals[0].item() / tokens, "val_token_accuracy": totals[1].item() / tokens,
                "val_tokens": int(totals[2].item())}

    def _generation_accuracy(self, model) -> dict:
        from fastsft.generate import generate_batch

        prompts = [e.prompt_ids for e in self.examples]
        max_new = max(len(e.reference_ids) for e in self.examples) + 2
        max_new = min(max_new, self.cfg.eval.generation_max_new_tokens)
        with self.precision.autocast(self.info.device):
            outputs = generate_batch(model, prompts, max_new, stop_ids=self.tokenizer.stop_ids)
        decode = self.tokenizer.decode
        matches = 0
        samples = []
        for example, output in zip(self.examples, outputs, strict=True):
            got, want = decode(output).strip(), decode(example.reference_ids).strip()
            matches += got == want
            if len(samples) < self.cfg.eval.show_samples:
                samples.append({"prompt": decode(example.prompt_ids), "expected": want, "generated": got})
        return {"exact_match": matches / len(self.examples), "exact_match_count": matches,
                "generation_samples": len(self.examples), "samples": samples}


def early_stopping(state, val_loss: float, patience: int) -> str:
    """Update the loop state's best val loss and patience counter with a new evaluation: "improved" (save it as
    the best checkpoint when patience > 0), "worse", or "stop" (patience evaluations in a row without improvement).
    `state` is the trainer's LoopState (best_val_loss, evals_without_improvement: carried by checkpoints)."""
    if state.best_val_loss is None or val_loss < state.best_val_loss:
        state.best_val_loss = val_loss
        state.evals_without_improvement = 0
        return "improved"
    state.evals_without_improvement += 1
    return "stop" if patience and state.evals_without_improvement >= patience else "worse"


def format_eval(result: dict) -> str:
    parts = []
    if "val_loss" in result:
        parts.append(f"val loss {result['val_loss']:.4f}, token accuracy {result['val_token_accuracy']:.1%}")
    if "exact_match" in result:
        parts.append(
            f"exact match {result['exact_match_count']}/{result['generation_samples']} ({result['exact_match']:.1%})"
        )
    return "; ".join(parts) or "nothing to evaluate"
