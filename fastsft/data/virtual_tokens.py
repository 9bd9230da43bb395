"""Room for virtual tokens: n slots in front of every document of an assembled row, for prompt tuning and P-tuning
(fastsft/adapters/prompt.py writes the learned prompts into them).

Where it sits: `PackedLoader(virtual_tokens=n)` truncates documents to seq_len - n, plans rows with every kept
document counted as n tokens longer, lets the assembler (C++ or the numpy reference) write the documents back to
back as usual, then `insert_virtual_tokens` moves each document n slots to the right of the previous one's end, in
place. The slots hold PAD_ID, no label, and positions 0..n-1; the document's own positions continue at n (PEFT's
prompt tuning on a transformers model places them there). Slots belong to their document's segment in cu_seqlens,
so no document sees another's prompt. Host numpy, in the loader's background thread: O(seq_len) per row.
"""

from __future__ import annotations

import numpy as np

from fastsft.data.batch import IGNORE_INDEX, PAD_ID


def insert_virtual_tokens(out: dict, num_virtual: int) -> None:
    """Rewrite the assembled rows in `out` (the assembler's buffers: input_ids, position_ids, labels, cu_seqlens,
    loss_positions [rows, ...] and counts [rows, 3] = (loss tokens, tokens, docs)) with `num_virtual` slots before
    each document. The rows must have room: tokens + num_virtual * docs <= seq_len."""
    n = num_virtual
    seq_len = out["input_ids"].shape[1]
    for i in range(out["counts"].shape[0]):
        num_loss, used, docs = (int(c) for c in out["counts"][i])
        if docs == 0:
            continue
        cu = out["cu_seqlens"][i]
        ends = cu[1:docs + 1].astype(np.int64)
        total = used + n * docs
        if total > seq_len:
            raise ValueError(f"row {i}: {used} tokens and {docs} x {n} virtual slots do not fit seq_len {seq_len}")
        segment = np.searchsorted(ends, np.arange(used), side="right")  # document of each token
        dest = np.arange(used) + n * (segment + 1)
        starts = np.concatenate(([0], ends[:-1])) + n * np.arange(docs)  # first slot of each document
        slots = (starts[:, None] + np.arange(n)).ravel()

        input_ids, position_ids, labels = out["input_ids"][i], out["position_ids"][i], out["labels"][i]
        tokens, positions, targets = input_ids[:used].copy(), position_ids[:used].copy(), labels[:used].copy()
        input_ids[:] = PAD_ID
        input_ids[dest] = tokens
        labels[:] = IGNORE_INDEX
        labels[dest] = targets
        position_ids[dest] = positions + n
        position_ids[slots] = np.tile(np.arange(n, dtype=position_ids.dtype), docs)
        position_ids[total:] = np.arange(seq_len - total, dtype=position_ids.dtype)
        cu[1:docs + 1] = ends + n * np.arange(1, docs + 1)
        cu[docs + 1:] = seq_len
        loss_positions = out["loss_positions"][i]
        loss_positions[:num_loss] = dest[loss_positions[:num_loss]]
