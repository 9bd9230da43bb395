"""fastsft: performance-first supervised fine-tuning of Llama-style language models.

Flow: `fastsft.data` (prepare -> shards -> C++ packing loader -> Batch) -> `fastsft.model` (packed varlen model,
ops from `fastsft.ops` backed by Triton kernels in `fastsft.kernels`) -> `fastsft.train` (compiled step, trainer).
"""

__version__ = "0.1.0"
