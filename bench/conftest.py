"""Benchmarks run with `pytest bench --benchmark-only`. GPU benchmarks skip without CUDA."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import requires_cuda  # noqa: E402,F401  (kept importable from here too)
