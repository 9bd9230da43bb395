"""Data: `fastsft prepare` (records -> token ids + loss mask -> checksummed shards) and the packing loader
(C++ best-fit-decreasing packing -> fixed-shape `Batch` rows for FlashAttention varlen).

Exports are resolved lazily so importing `fastsft.data` stays cheap.
"""

from fastsft.data.batch import IGNORE_INDEX, LOSS_POSITION_FILL, Batch

_LAZY = {
    "open_shards": "fastsft.data.shards",
    "ShardDataset": "fastsft.data.shards",
    "ShardWriter": "fastsft.data.shards",
    "ShardError": "fastsft.data.shards",
    "PackedLoader": "fastsft.data.loader",
    "load_tokenizer": "fastsft.data.tokenizer",
    "prepare_dataset": "fastsft.data.prepare",
}

__all__ = ["IGNORE_INDEX", "LOSS_POSITION_FILL", "Batch", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fastsft.data' has no attribute {name!r}")
