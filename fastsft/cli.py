"""The `fastsft` command: one subcommand per stage of the flow.

Each subcommand lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`; this file only
dispatches, so `fastsft --help` lists them and `fastsft SUBCOMMAND --help` shows each one's options.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "prepare": ("fastsft.data.prepare", "tokenize instruction data into verified shards with a loss mask"),
    "inspect": ("fastsft.data.inspect_data", "print prepared documents with the trained tokens marked"),
    "train": ("fastsft.train.run", "run supervised fine-tuning (no arguments: the built-in demo)"),
    "export": ("fastsft.train.export", "write a checkpoint as a Hugging Face model directory"),
    "generate": ("fastsft.train.generate_command", "generate text from a model directory or checkpoint"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastsft", description="Performance-first supervised fine-tuning of Llama-style language models."
    )
    from fastsft import __version__

    parser.add_argument("--version", action="version", version=f"fastsft {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip().splitlines()[0])
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return int(args._module.run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
