"""`python -m fastsft ...` is the same as the `fastsft` command (torchrun launches it this way)."""

import os
import sys

from fastsft.cli import main

if __name__ == "__main__":
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ:
        # A torchrun rank has finished: checkpoints are fsynced, metrics flushed and the process group destroyed.
        # Interpreter finalization can still abort on a C++ thread torn down mid-call ("terminate called without an
        # active exception", seen rarely at the exit of CPU/gloo ranks in tests/test_distributed.py), which torchrun
        # reports as a failed run; leave without finalization instead.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(int(code or 0))
    raise SystemExit(code)
