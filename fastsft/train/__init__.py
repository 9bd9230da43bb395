"""Training: the compiled train step and the trainer around it.

`fastsft.train.step` holds the plain functions applied to a model from outside (freeze, activation checkpointing,
compile), the optimizer and schedule builders, and `TrainStep` (one optimizer step over packed micro-batches, no host
sync). The trainer (`fastsft.train.trainer`, `fastsft train` via `fastsft.train.run`) builds on them with its config,
checkpoints, export and distributed setup.
"""
