"""`fastsft inspect DIR`: print prepared documents with the tokens that carry loss marked, to see what trains.

Reads a directory written by `fastsft prepare` (shards + manifest) and decodes documents with the tokenizer the
manifest records (or --tokenizer). Trained spans are shown in green on a terminal, between [[ and ]] otherwise
(--color always|never to choose). Special tokens are written out, so headers and end-of-turn markers are visible.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

GREEN, RESET = "\033[32m", "\033[0m"
OPEN, CLOSE = "[[", "]]"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", metavar="DIR", help="a directory written by fastsft prepare")
    parser.add_argument("-n", "--num", type=int, default=3, metavar="N", help="documents to print (default 3)")
    parser.add_argument("--start", type=int, default=0, metavar="I", help="index of the first document")
    parser.add_argument("--split", default="train", help="train or val")
    parser.add_argument("--tokenizer", default=None, metavar="PATH|byte",
                        help="tokenizer to decode with (default: the one recorded in the manifest)")
    parser.add_argument("--color", default="auto", choices=("auto", "always", "never"),
                        help="mark trained spans in colour (auto: when printing to a terminal) or with [[ ]]")


def run(args) -> int:
    try:
        text = inspect_dataset(args.data, args.num, args.start, args.split, args.tokenizer,
                               color=args.color == "always" or (args.color == "auto" and sys.stdout.isatty()))
    except (ValueError, OSError) as e:
        print(f"fastsft inspect: error: {e}", file=sys.stderr)
        return 1
    print(text)
    return 0


def _recorded_tokenizer(directory, given):
    from fastsft.data.manifest import recorded_tokenizer

    if given is not None:
        return given
    identity = recorded_tokenizer(directory)
    if not identity:
        raise ValueError(f"{directory}: no tokenizer recorded in its manifest; pass --tokenizer")
    if identity.get("kind") == "byte":
        return "byte"
    return identity.get("path") or identity.get("name")


def mark_trained(tokenizer, ids, mask, color: bool) -> str:
    """The document's text with each run of trained tokens marked."""
    mask = np.asarray(mask, dtype=bool)
    edges = np.flatnonzero(np.diff(np.concatenate([[False], mask, [False]]).astype(np.int8)))
    out, pos = [], 0
    for start, end in zip(edges[::2], edges[1::2], strict=True):
        out.append(tokenizer.decode(ids[pos:start]))
        trained = tokenizer.decode(ids[start:end])
        out.append(f"{GREEN}{trained}{RESET}" if color else f"{OPEN}{trained}{CLOSE}")
        pos = end
    out.append(tokenizer.decode(ids[pos:]))
    return "".join(out)


def inspect_dataset(directory, num=3, start=0, split="train", tokenizer=None, color=False) -> str:
    from fastsft.data.shards import open_shards
    from fastsft.data.tokenizer import load_tokenizer

    documents = open_shards(directory, split)
    tok = load_tokenizer(_recorded_tokenizer(directory, tokenizer))
    if not 0 <= start < len(documents):
        raise ValueError(f"--start {start}: the {split} split has {len(documents)} documents")
    legend = "trained tokens in green" if color else f"trained tokens between {OPEN} and {CLOSE}"
    lines = [f"{directory} ({split}: {len(documents)} documents; {legend})"]
    for i in range(start, min(start + num, len(documents))):
        ids, mask = documents[i]
        ids, mask = np.asarray(ids), np.asarray(mask)
        lines.append(f"--- document {i}: {len(ids)} tokens, {int(mask.sum())} trained ---")
        lines.append(mark_trained(tok, ids, mask, color))
    return "\n".join(lines)
