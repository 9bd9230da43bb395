"""Triton kernels, installed as `fastsft.kernels`. Kernels and their launch helpers only: no autograd, no nn.Module
(those are in `fastsft.ops`). Importing this package must not require a GPU."""
