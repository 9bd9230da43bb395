"""`python -m fastsft ...` is the same as the `fastsft` command (torchrun launches it this way)."""

from fastsft.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
