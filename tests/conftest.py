"""Shared test setup: `gpu` tests skip without CUDA, `slow` tests run only with --runslow."""

import os

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    skip_gpu = pytest.mark.skip(reason="gpu: needs CUDA")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def triton_interpret(monkeypatch):
    """Run the real Triton kernels on CPU tensors through the interpreter (TRITON_INTERPRET must be set before
    triton is first imported: tests/conftest sets it for the whole session when no GPU is present)."""
    monkeypatch.setenv("FASTSFT_BACKEND", "triton")
    yield


# The interpreter flag is read when triton compiles a kernel; set it for the whole CPU session.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
