"""Training: the run's config (`config`), the compiled step (`step`), the loop (`trainer`), checkpoints
(`checkpoint`), multi-process sharding (`distributed`), metrics and the `fastsft train` / `fastsft export` commands
(`run`, `export`). Submodules are imported on use, so `import fastsft.train` stays cheap."""
