"""Training: config -> components -> loop, with checkpoints, evaluation and distribution beside it.

`fastsft.train.build` turns a config into the run's components (tokenizer, data, model, loader); `fastsft.train.step`
holds the plain functions applied to a model from outside (freeze, activation checkpointing, compile), the precision,
optimizer and schedule, and `TrainStep` (one optimizer step over packed micro-batches, no host sync). The trainer
(`fastsft.train.trainer`, `fastsft train` via `fastsft.train.run`) runs the loop; `checkpoint` (the only code that
saves and loads training state), `evaluation`, `metrics`, `signals` and `distributed` sit beside it; `export` turns a
checkpoint into a Hugging Face model directory.
"""
