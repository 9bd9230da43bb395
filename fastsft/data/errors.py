"""The error a broken prepared dataset raises: shard files (fastsft/data/shards.py) and their manifest
(fastsft/data/manifest.py) both use it, so `fastsft train` reports either as one line. Imports nothing."""


class ShardError(ValueError):
    """A shard file, a directory of them or their manifest is missing, corrupt, or does not fit the request; the
    message names the file (and the field)."""
