"""The SFT run: data -> model -> compiled step in a loop, with evaluation, logging, checkpoints and exact resume.

Sits at the top of the flow, called by `fastsft train` (`fastsft.train.run`) with a resolved `TrainConfig`:

    tokenizer (fastsft.data.tokenizer) -> prepared shards (fastsft.data.prepare, cached by content hash)
    -> PackedLoader rows (fastsft.data.loader, this rank's share) -> Transformer (fastsft.model)
    -> [FSDP2 shards (fastsft.train.distributed)] -> optimizer, schedule, TrainStep (fastsft.train.step)
    -> loop: step, log (fastsft.train.metrics), eval, checkpoint (fastsft.train.checkpoint), stop on signal

Host syncs: the step's metrics are device tensors; they are read once per logging interval (and at evaluations and
saves), never per step. The host numbers the loop needs per step (supervised-token counts, a stop flag) come from
the loader and the signal handler, and are all-reduced on CPU tensors across ranks.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from fastsft.train import checkpoint as ckpt
from fastsft.train import distributed
from fastsft.train.config import TrainConfig, to_dict, to_yaml
from fastsft.train.metrics import RunLogger, format_duration, plot_loss_curve
from fastsft.train.signals import GracefulStop

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class RunError(RuntimeError):
    """The run cannot go on for a reason the user can act on; the message says what to do."""


class NonFiniteLossError(RunError):
    pass


@dataclass
class LoopState:
    """Everything about the loop's progress that a checkpoint must carry (besides model/optimizer/loader/RNG)."""

    step: int = 0
    micro_batches_seen: int = 0  # this rank's micro-batches consumed (epoch = micro_batches_seen / len(loader))
    tokens_seen: int = 0  # non-padding tokens over all ranks
    loss_tokens_seen: int = 0  # supervised tokens over all ranks
    nonfinite_in_a_row: int = 0
    nonfinite_total: int = 0
    best_val_loss: float | None = None
    best_checkpoint: str | None = None
    evals_without_improvement: int = 0
    initial_eval: dict | None = None
    last_eval: dict | None = None
    train_time_s: float = 0.0
    stop_reason: str | None = None
    history: list = field(default_factory=list)  # evaluation results, for the final report


@dataclass
class GenerationExample:
    prompt_ids: list
    reference_ids: list


def oom_message(cfg: TrainConfig) -> str:
    return (
        "CUDA out of memory. Lower the memory a step needs with one of these (then run again; the run resumes from "
        "its last checkpoint):\n"
        f"  data.seq_len={cfg.data.seq_len}  -> a smaller packed row, e.g. data.seq_len={max(1, cfg.data.seq_len // 2)}\n"
        f"  train.gradient_checkpointing={cfg.train.gradient_checkpointing}  -> train.gradient_checkpointing=true "
        "(activation checkpointing: recompute blocks in backward)\n"
        f"  train.gradient_accumulation_steps={cfg.train.gradient_accumulation_steps}  -> micro-batches are one row "
        "each, so memory does not grow with it; keep the tokens per step by raising it when you lower seq_len\n"
        "  more GPUs: torchrun --nproc_per_node N -m fastsft train ... shards parameters and optimizer state (FSDP2)"
    )


# ---------------------------------------------------------------------------------------------------------------------
# Building blocks (plain functions: each takes what it needs)


def resolve_tokenizer_spec(cfg: TrainConfig) -> str:
    if cfg.model.tokenizer:
        return cfg.model.tokenizer
    if cfg.model.path:
        return cfg.model.path
    return "byte"


def default_cache_dir(cfg: TrainConfig) -> Path:
    if cfg.data.cache_dir:
        return Path(cfg.data.cache_dir)
    return Path(cfg.output_dir).resolve().parent / ".cache" / "fastsft"


def prepare_data(cfg: TrainConfig, tokenizer, info: distributed.DistInfo, say) -> tuple[tuple, tuple | None]:
    """((train_dir, split), (val_dir, split) or None). Raw files are prepared once (rank 0), cached by content hash."""
    from fastsft.data.manifest import split_documents
    from fastsft.data.prepare import prepare_cached

    files = [str(f) for f in cfg.data.train_files]
    if not files:
        raise RunError("no training data: pass --data FILE.jsonl (or a prepared directory), or data.train_files=...")
    options = dict(
        max_len=cfg.data.max_len,
        format=cfg.data.format,
        workers=cfg.data.workers,
        seed=cfg.train.seed,
        skip_bad=cfg.data.skip_bad,
        train_on=cfg.data.train_on,
    )
    cache = default_cache_dir(cfg)

    def prepare(paths, val_fraction):
        if len(paths) == 1 and Path(paths[0]).is_dir():
            check_prepared_tokenizer(Path(paths[0]), tokenizer, say if info.is_main else lambda _: None)
            return Path(paths[0])
        for p in paths:
            if Path(p).is_dir():
                raise RunError(f"data: {p} is a directory; give either one prepared directory or only .jsonl/.json files")
        result = None
        if info.is_main:
            result = str(prepare_cached(paths, tokenizer, cache, val_fraction=val_fraction, progress=True, **options))
            say(f"data: {', '.join(paths)} -> {result} (tokenized once, cached by content hash)")
        return Path(distributed.broadcast_object(result, info))

    train_dir = prepare(files, 0.0 if cfg.data.val_files else cfg.data.val_fraction)
    if cfg.data.val_files:
        val = (prepare([str(f) for f in cfg.data.val_files], 0.0), "train")
    elif split_documents(train_dir, "val"):  # None: no manifest; 0: no val split
        val = (train_dir, "val")
    else:
        val = None
    return (train_dir, "train"), val


def check_prepared_tokenizer(prepared: Path, tokenizer, say) -> None:
    """A prepared directory must hold the ids of the run's tokenizer: another tokenizer's ids that fit the vocabulary
    would train silently on the wrong text. A different kind (byte vs Hugging Face) with a different vocabulary size
    is an error; any other difference only a note: re-saving a tokenizer changes its files, not its ids, the byte
    tokenizer saved as a Hugging Face one gives the same ids, and added tokens keep the old ids."""
    from fastsft.data.manifest import recorded_tokenizer

    saved = recorded_tokenizer(prepared)
    if saved is None:
        return  # a bare directory of shards: nothing recorded to compare
    now = tokenizer.identity()
    if saved.get("kind") != now["kind"] and saved.get("vocab_size") != now["vocab_size"]:
        raise RunError(
            f"data: {prepared} was prepared with tokenizer {saved.get('name')!r} ({saved.get('kind')}, vocab "
            f"{saved.get('vocab_size')}) but this run uses {now['name']!r} ({now['kind']}, vocab {now['vocab_size']}); "
            "prepare the data again with the run's tokenizer (fastsft prepare --tokenizer DIR), or pass the raw "
            ".jsonl files to --data"
        )
    if saved.get("hash") != now["hash"]:
        say(f"note: {prepared} was prepared with tokenizer {saved.get('name')!r} (vocab {saved.get('vocab_size')}), "
            f"not exactly this run's {now['name']!r} (vocab {now['vocab_size']}); make sure they give the same ids")


def require_model_dir(cfg: TrainConfig) -> Path:
    """model.path as a Path, or a RunError naming the option when it is not a Hugging Face model directory."""
    path = Path(cfg.model.path)
    if not (path / "config.json").is_file():
        raise RunError(f"model.path={path} (--model): no config.json there; give a local Hugging Face model directory "
                       "(config.json + safetensors). Nothing is downloaded.")
    return path


def build_model(cfg: TrainConfig, vocab_size: int, device: torch.device):
    """The model on `device`: loaded from model.path, or new from the model.* fields (seeded by train.seed)."""
    from fastsft.hf_checkpoint import config_from_hf, load_pretrained
    from fastsft.model import Transformer

    dtype = DTYPES["bfloat16" if cfg.model.dtype == "bfloat16" else "float32"]
    if cfg.model.dtype == "auto":
        dtype = torch.float32  # fp32 master weights; compute runs in bf16 through autocast / FSDP's param_dtype
    if cfg.model.path:
        path = require_model_dir(cfg)
        try:
            model = load_pretrained(str(path), dtype=dtype, device=device)
        except ValueError as e:  # an unsupported or inconsistent checkpoint: the message says what is supported
            raise RunError(str(e) if str(path) in str(e) else f"model.path={path}: {e}") from None
        embed_rows = model.config.vocab_size
        if vocab_size > embed_rows:
            raise RunError(
                f"the tokenizer has {vocab_size} ids but {path} embeds only {embed_rows}; use the model's own tokenizer"
            )
        return model
    hf = dict(
        model_type="llama",
        vocab_size=vocab_size,
        hidden_size=cfg.model.hidden_size,
        intermediate_size=cfg.model.intermediate_size,
        num_hidden_layers=cfg.model.num_hidden_layers,
        num_attention_heads=cfg.model.num_attention_heads,
        num_key_value_heads=cfg.model.num_key_value_heads,
        max_position_embeddings=cfg.model.max_position_embeddings,
        rope_theta=cfg.model.rope_theta,
        tie_word_embeddings=cfg.model.tie_word_embeddings,
    )
    return Transformer.from_config(config_from_hf(hf, source="model.* options"), dtype=dtype, device=device,
                                   seed=cfg.train.seed)


def make_loader(dataset, cfg: TrainConfig, info: distributed.DistInfo, seed: int):
    from fastsft.data.loader import PackedLoader

    return PackedLoader(
        dataset,
        seq_len=cfg.data.seq_len,
        max_docs=cfg.data.max_docs,
        seed=seed,
        rank=info.rank,
        world_size=info.world_size,
        long_docs=cfg.data.long_docs,
        prefetch=cfg.data.prefetch,
        loss_bucket="auto",  # loss over the supervised positions only, bucket chosen from the data
    )


def total_optimizer_steps(cfg: TrainConfig, micro_batches_per_epoch: int) -> int:
    if cfg.train.max_steps > 0:
        return cfg.train.max_steps
    steps = math.ceil(cfg.train.num_train_epochs * micro_batches_per_epoch / cfg.train.gradient_accumulation_steps)
    return max(1, steps)


def warmup_steps(cfg: TrainConfig, total: int) -> int:
    if cfg.optim.warmup_steps > 0:
        return cfg.optim.warmup_steps
    return int(round(cfg.optim.warmup_ratio * total))


def generation_examples(dataset, tokenizer, count: int) -> list[GenerationExample]:
    """Prompt and reference answer of the first `count` documents of a split: the prompt is every token before the
    document's last supervised run (the final assistant turn), the reference is that run without stop tokens."""
    import numpy as np

    stops = set(tokenizer.stop_ids)
    examples = []
    for i in range(min(count, len(dataset))):
        tokens, mask = dataset[i]
        mask = np.asarray(mask, dtype=bool)
        where = np.flatnonzero(mask)
        if len(where) == 0:
            continue
        end = int(where[-1]) + 1
        start = end - 1
        while start > 0 and mask[start - 1]:
            start -= 1
        reference = [int(t) for t in tokens[start:end] if int(t) not in stops]
        examples.append(GenerationExample([int(t) for t in tokens[:start]], reference))
    return examples


def attention_context(dataset, seq_len: int) -> float:
    """Mean attention context of a token in packed rows: sum(len^2) / sum(len) over documents (capped at seq_len),
    what `Transformer.flops_per_token` wants for its attention term."""
    import numpy as np

    lengths = np.minimum(np.asarray(dataset.lengths, dtype=np.float64), seq_len)
    return float((lengths**2).sum() / max(lengths.sum(), 1.0))


def measure_peak_flops(device: torch.device) -> float:
    """Measured dense bf16 matmul rate of this GPU in FLOP/s (the MFU denominator), median of a few timed runs."""
    n = 4096
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / 5)
    times.sort()
    return 2 * n**3 / times[len(times) // 2]




# ---------------------------------------------------------------------------------------------------------------------
# The run


class Trainer:
    """One training run. `fit()` returns a summary dict; rank 0 prints progress and the final report."""

    def __init__(self, cfg: TrainConfig, info: distributed.DistInfo | None = None, print_fn=print,
                 stop_at_step: int | None = None):
        self.cfg = cfg
        self.stop_at_step = stop_at_step  # tests: behave as if SIGTERM arrived during this step
        self.info = info or distributed.DistInfo(device=distributed.pick_device(cfg.train.device))
        self.out_dir = Path(cfg.output_dir)
        self._print = print_fn
        self.logger: RunLogger | None = None
        self.state = LoopState()

    # -- output -------------------------------------------------------------------------------------------------
    def say(self, text: str) -> None:
        if not self.info.is_main:
            return
        if self.logger is not None:
            self.logger.write(text)
        else:
            self._print(text, file=sys.stderr, flush=True)

    # -- setup --------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        from fastsft.data.shards import open_shards
        from fastsft.data.tokenizer import load_tokenizer
        from fastsft.train import step as step_lib

        cfg, info = self.cfg, self.info
        if cfg.train.cpu_threads:
            torch.set_num_threads(cfg.train.cpu_threads)
        torch.manual_seed(cfg.train.seed)
        if info.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            for stale in ckpt.remove_stale_temporaries(self.out_dir):
                self.say(f"removed {stale.name} (a checkpoint save that did not finish)")
        distributed.barrier(info)

        if cfg.model.path:
            require_model_dir(cfg)  # before the tokenizer, which defaults to the model directory
        try:
            self.tokenizer = load_tokenizer(resolve_tokenizer_spec(cfg))
        except ValueError as e:  # not 'byte' and not a tokenizer directory: the message says what to give
            raise RunError(str(e)) from None
        (train_dir, train_split), val = prepare_data(cfg, self.tokenizer, info, self.say)
        vocab, verify = self.tokenizer.vocab_size, cfg.data.verify
        self.train_data = open_shards(train_dir, train_split, vocab_size=vocab, verify=verify)
        self.val_data = open_shards(val[0], val[1], vocab_size=vocab, verify=verify) if val else None
        self.loader = make_loader(self.train_data, cfg, info, seed=cfg.train.seed)
        if len(self.loader) == 0:
            raise RunError(f"the training data gives no packed rows for rank {info.rank}; use more data or fewer ranks")
        self.examples = (
            generation_examples(self.val_data, self.tokenizer, cfg.eval.generation_samples) if self.val_data else []
        )

        model = build_model(cfg, self.tokenizer.vocab_size, info.device)
        self.model_config = model.config
        self.param_dtype = model.embed_tokens.weight.dtype
        if cfg.train.freeze:
            step_lib.freeze_parameters(model, cfg.train.freeze)
        if cfg.train.gradient_checkpointing:
            step_lib.apply_activation_checkpointing(model)
        precision = self._precision()
        if info.enabled:
            param_dtype = torch.bfloat16 if precision == "bf16" else None
            distributed.shard_model(model, info, param_dtype=param_dtype)
            precision = "fp32" if param_dtype is not None else precision  # FSDP casts; no autocast on top
        if cfg.train.torch_compile:
            model = step_lib.apply_compile(model, compile_mode=cfg.train.compile_mode)  # per block, in place
        self.model = model
        self.num_parameters = model.num_parameters()

        o = cfg.optim
        self.optimizer = step_lib.build_optimizer(
            model, lr=o.learning_rate, weight_decay=o.weight_decay, betas=(o.adam_beta1, o.adam_beta2),
            eps=o.adam_epsilon, fused=o.fused,
        )
        self.total_steps = total_optimizer_steps(cfg, len(self.loader))
        schedule = step_lib.lr_lambda(
            warmup_steps(cfg, self.total_steps), self.total_steps, o.lr_scheduler_type, o.min_lr_ratio
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        if self.param_dtype == torch.bfloat16 and precision != "fp32":
            precision = "pure_bf16"  # bf16 parameters and optimizer state, no autocast
        self.train_step = step_lib.TrainStep(model, self.optimizer, self.scheduler, o.max_grad_norm, precision)
        self.precision = precision
        self.flops_per_token = model.flops_per_token(attention_context(self.train_data, cfg.data.seq_len))
        self.peak_flops = measure_peak_flops(info.device) if info.device.type == "cuda" else None

    def _precision(self) -> str:
        if self.cfg.train.precision != "auto":
            return self.cfg.train.precision
        return "bf16" if self.info.device.type == "cuda" else "fp32"

    # -- checkpoints ----------------------------------------------------------------------------------------------
    def find_resume_checkpoint(self) -> Path | None:
        mode = self.cfg.resume
        found = str(ckpt.latest_checkpoint(self.out_dir) or "") if self.info.is_main else None
        found = distributed.broadcast_object(found, self.info)
        if mode == "never":
            if found:
                # Starting over beside an older run's checkpoints would mix the two (and pruning by step number
                # could delete the new ones), so this is refused rather than guessed.
                raise RunError(f"resume=never but {self.out_dir} already holds checkpoints ({Path(found).name}); use a "
                               "new output_dir (--out) or delete them")
            return None
        if not found:
            if mode == "always":
                raise RunError(f"--resume: no checkpoint in {self.out_dir} (looked for {ckpt.PREFIX}* directories)")
            return None
        return Path(found)

    def _trainer_state_json(self) -> dict:
        return {"loop": asdict(self.state), "total_steps": self.total_steps, "world_size": self.info.world_size,
                "tokenizer": self.tokenizer.identity()}

    def _rank_state(self) -> dict:
        return {
            "scheduler": self.scheduler.state_dict(),
            "loader": self.loader.state_dict(),
            "rng": ckpt.capture_rng_state(),
        }

    def _write_extras(self, directory: Path) -> None:
        """config.json + tokenizer files, so export/generate can rebuild the model from a checkpoint alone."""
        import json

        from fastsft.hf_checkpoint import config_to_hf

        hf = config_to_hf(self.model_config, self.param_dtype)
        (directory / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
        self.tokenizer.save_pretrained(directory)

    def save(self) -> Path:
        step = self.state.step
        info = self.info
        if not info.enabled:
            path = ckpt.save_local(
                self.out_dir, step,
                model_state=self.model.state_dict(),
                optimizer_state=self.optimizer.state_dict(),
                rank_state=self._rank_state(),
                trainer_state=self._trainer_state_json(),
                config_yaml=to_yaml(self.cfg),
                write_extras=self._write_extras,
            )
        else:
            path = self._save_sharded(step)
        if info.is_main:
            keep = (Path(self.state.best_checkpoint),) if self.state.best_checkpoint else ()
            ckpt.prune_checkpoints(self.out_dir, self.cfg.log.save_total_limit, keep=keep)
        distributed.barrier(info)
        self._last_save_step = step
        return path

    def _save_sharded(self, step: int) -> Path:
        info = self.info
        tmp = self.out_dir / f"{ckpt.TMP_PREFIX}{step:08d}-sharded"
        if info.is_main:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        distributed.barrier(info)
        distributed.save_sharded(tmp / "dcp", self.model, self.optimizer)
        ckpt.save_pause_hook(step)
        torch.save(self._rank_state(), tmp / f"state-rank{info.rank}.pt")
        distributed.barrier(info)
        path = self.out_dir / ckpt.checkpoint_name(step)
        if info.is_main:
            (tmp / "config.yaml").write_text(to_yaml(self.cfg), encoding="utf-8")
            self._write_extras(tmp)
            ckpt.write_json(tmp / ckpt.STATE_JSON, {**self._trainer_state_json(), "step": step})
            path = ckpt.commit_save(tmp, step)
        distributed.barrier(info)
        return path

    def load(self, path: Path) -> None:
        info = self.info
        trainer_state = ckpt.read_trainer_state(path)
        if trainer_state.get("world_size", 1) != info.world_size:
            raise RunError(
                f"{path} was written by {trainer_state.get('world_size')} processes, this run has {info.world_size}; "
                "resume with the same number of processes (the data order is split per rank)"
            )
        if (path / "dcp").is_dir():
            if not info.enabled:
                raise RunError(f"{path} is a sharded (multi-process) checkpoint; resume it under torchrun")
            distributed.load_sharded(path / "dcp", self.model, self.optimizer)
            rank_state = ckpt.load_rank_state(path, info.rank)
        else:
            if info.enabled:
                raise RunError(f"{path} is a one-process checkpoint; resume it without torchrun (or start a new --out)")
            model_state, optimizer_state, rank_state, _ = ckpt.load_local(path)
            self.model.load_state_dict(model_state)
            self.optimizer.load_state_dict(optimizer_state)
        self.scheduler.load_state_dict(rank_state["scheduler"])
        self.loader.load_state_dict(rank_state["loader"])
        ckpt.restore_rng_state(rank_state["rng"])
        loop = trainer_state["loop"]
        self.state = LoopState(**{k: v for k, v in loop.items() if k in LoopState.__dataclass_fields__})
        self.state.stop_reason = None
        self._last_save_step = self.state.step
        self._check_config_drift(path)

    def _check_config_drift(self, path: Path) -> None:
        import yaml

        saved_file = path / "config.yaml"
        if not saved_file.is_file() or not self.info.is_main:
            return
        saved = _flatten(yaml.safe_load(saved_file.read_text()))
        now = _flatten(to_dict(self.cfg))
        ignore = {"resume", "output_dir"}
        changed = sorted(k for k in now if k not in ignore and saved.get(k) != now[k])
        if changed:
            details = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in changed)
            self.say(f"note: resuming with options that differ from the checkpoint's: {details}")

    # -- evaluation -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Validation loss and token accuracy over the val split (or eval_max_batches rows of it), plus exact-match
        accuracy of greedy generations on held-out prompts when eval.generation_samples > 0."""
        result: dict = {"step": self.state.step}
        model = self.model
        was_training = model.training
        model.eval()
        try:
            if self.val_data is not None:
                result.update(self._validation_loss())
            if self.examples:
                result.update(self._generation_accuracy())
        finally:
            model.train(was_training)
        return result

    def _validation_loss(self) -> dict:
        loader = make_loader(self.val_data, self.cfg, self.info, seed=0)
        device = self.info.device
        totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, tokens
        limit = self.cfg.eval.eval_max_batches
        autocast = self._autocast()
        for i, batch in enumerate(loader):
            if limit and i >= limit:
                break
            batch = batch.to(device)
            with autocast:
                loss_sum, correct = self.model.loss(batch, num_items=1.0, return_num_correct=True)
            totals[0] += loss_sum.double()
            totals[1] += correct.double()
            totals[2] += batch.num_loss_tokens
        totals = distributed.all_reduce_sum(totals, self.info).cpu()  # the one sync of the evaluation
        tokens = max(totals[2].item(), 1.0)
        return {"val_loss": totals[0].item() / tokens, "val_token_accuracy": totals[1].item() / tokens,
                "val_tokens": int(totals[2].item())}

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.info.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _generation_accuracy(self) -> dict:
        from fastsft.generate import generate_batch

        prompts = [e.prompt_ids for e in self.examples]
        max_new = max(len(e.reference_ids) for e in self.examples) + 2
        max_new = min(max_new, self.cfg.eval.generation_max_new_tokens)
        with self._autocast():
            outputs = generate_batch(self.model, prompts, max_new, stop_ids=self.tokenizer.stop_ids)
        decode = self.tokenizer.decode
        matches = 0
        samples = []
        for example, output in zip(self.examples, outputs, strict=True):
            got, want = decode(output).strip(), decode(example.reference_ids).strip()
            matches += got == want
            if len(samples) < self.cfg.eval.show_samples:
                samples.append({"prompt": decode(example.prompt_ids), "expected": want, "generated": got})
        return {"exact_match": matches / len(self.examples), "exact_match_count": matches,
                "generation_samples": len(self.examples), "samples": samples}

    def _after_eval(self, result: dict) -> None:
        s = self.state
        s.last_eval = result
        s.history.append({k: v for k, v in result.items() if k != "samples"})
        record = {k: v for k, v in result.items() if isinstance(v, (int, float))}
        if self.logger is not None:
            self.logger.log(record)
        self.say(f"eval at step {s.step}: " + _format_eval(result))
        for sample in result.get("samples", []):
            prompt = sample["prompt"].replace("\n", "\\n")
            self.say(f"  prompt {prompt!r}\n    expected {sample['expected']!r}  generated {sample['generated']!r}")
        val_loss = result.get("val_loss")
        if val_loss is None:
            return
        if s.best_val_loss is None or val_loss < s.best_val_loss:
            s.best_val_loss = val_loss
            s.evals_without_improvement = 0
            if self.cfg.eval.early_stopping_patience > 0 and s.step > 0:
                s.best_checkpoint = str(self.save())
        else:
            s.evals_without_improvement += 1
            patience = self.cfg.eval.early_stopping_patience
            if patience and s.evals_without_improvement >= patience:
                s.stop_reason = (
                    f"early stopping: val loss did not improve for {patience} evaluations "
                    f"(best {s.best_val_loss:.4f}, checkpoint {s.best_checkpoint})"
                )

    # -- the loop ------------------------------------------------------------------------------------------------
    def _micro_batch_stream(self):
        while True:  # epochs back to back; the loader's state says where in which epoch we are
            yield from self.loader

    def _read_pending(self, pending: list) -> list[dict]:
        """Read the device metrics of the steps since the last read (one sync), summed over ranks where partial."""
        if not pending:
            return []
        stacked = torch.stack([
            torch.stack([m.loss.float().reshape(()), m.num_correct.float().reshape(())]) for m, _ in pending
        ])
        stacked = distributed.all_reduce_sum(stacked, self.info).cpu()
        norms = torch.stack([m.grad_norm.float().reshape(()) for m, _ in pending]).cpu()
        skipped = torch.stack([m.skipped.reshape(()).to(torch.int32) for m, _ in pending]).cpu()
        rows = []
        for i, (_m, host) in enumerate(pending):
            rows.append({
                "loss": stacked[i, 0].item(),
                "correct": stacked[i, 1].item(),
                "grad_norm": norms[i].item(),
                "skipped": bool(skipped[i].item()),
                **host,
            })
        pending.clear()
        return rows

    def _account_nonfinite(self, rows: list[dict]) -> None:
        s = self.state
        for row in rows:
            if row["skipped"] or not math.isfinite(row["loss"]):
                s.nonfinite_in_a_row += 1
                s.nonfinite_total += 1
                if s.nonfinite_in_a_row >= self.cfg.train.max_nonfinite_steps:
                    raise NonFiniteLossError(
                        f"the loss was not finite for {s.nonfinite_in_a_row} optimizer steps in a row (up to step "
                        f"{row['step']}); those updates were skipped, and the run stops here "
                        f"(train.max_nonfinite_steps={self.cfg.train.max_nonfinite_steps}). Lower "
                        f"optim.learning_rate (now {self.cfg.optim.learning_rate}), keep optim.max_grad_norm > 0, "
                        "check the data, or try train.precision=fp32."
                    )
            else:
                s.nonfinite_in_a_row = 0

    def _log_interval(self, rows: list[dict], interval_s: float) -> None:
        finite = [r for r in rows if math.isfinite(r["loss"]) and not r["skipped"]]
        tokens = sum(r["tokens"] for r in rows)
        loss_tokens = sum(r["loss_tokens"] for r in rows)
        record = {
            "step": rows[-1]["step"],
            "epoch": round(self.state.micro_batches_seen / len(self.loader), 4),
            "loss": sum(r["loss"] for r in finite) / len(finite) if finite else float("nan"),
            "token_accuracy": sum(r["correct"] for r in finite) / max(1, sum(r["loss_tokens"] for r in finite)),
            "lr": rows[-1]["lr"],
            "grad_norm": sum(r["grad_norm"] for r in finite) / len(finite) if finite else float("nan"),
            "tokens_per_s": tokens / interval_s if interval_s > 0 else 0.0,
            "loss_tokens_per_s": loss_tokens / interval_s if interval_s > 0 else 0.0,
            "skipped_steps": len(rows) - len(finite),
            "elapsed_s": round(self.state.train_time_s, 2),
        }
        mfu = self._mfu(record["tokens_per_s"])
        if mfu is not None:
            record["mfu"] = mfu
        if self.logger is not None:
            self.logger.log(record)

    def _mfu(self, tokens_per_s: float) -> float | None:
        """Model FLOPs utilisation on a GPU: this rank's tokens/s x FLOPs per token / its measured bf16 peak."""
        if self.peak_flops is None:
            return None
        from fastsft.train.step import mfu

        return mfu(tokens_per_s / self.info.world_size, self.flops_per_token, self.peak_flops)

    def fit(self) -> dict:
        cfg, info, s = self.cfg, self.info, self.state
        self.setup()
        resume_from = self.find_resume_checkpoint()
        if resume_from is not None:
            self.load(resume_from)
            s = self.state
            self.say(f"resumed from {resume_from} at step {s.step}")
            if s.step >= self.total_steps:
                self.say(f"this run is already complete ({s.step}/{self.total_steps} steps); to train again use a new "
                         "--out, or raise train.max_steps / train.num_train_epochs to continue it")
        else:
            self._last_save_step = -1
        if info.is_main:
            self.logger = RunLogger(self.out_dir, self.total_steps, start_step=s.step,
                                    progress_bar=cfg.log.progress_bar, tensorboard=cfg.log.tensorboard)
        self._announce()
        try:
            with GracefulStop() as stop:
                if s.step == 0 and cfg.eval.eval_at_start and s.initial_eval is None:
                    s.initial_eval = self.evaluate()
                    self._after_eval(s.initial_eval)
                self._loop(stop)
            if s.stop_reason is None or s.stop_reason.startswith("early stopping") or s.step >= self.total_steps:
                self._final_eval()
            if self._last_save_step != s.step:
                path = self.save()
                self.say(f"checkpoint written: {path}")
        finally:
            if self.logger is not None:
                self.logger.close()
                self.logger = None
        if info.is_main and cfg.log.plot:
            png = plot_loss_curve(self.out_dir / "metrics.jsonl", self.out_dir / "loss.png")
            if png is not None:
                self.say(f"loss curve: {png}")
        summary = self.summary()
        if info.is_main:
            self._print(format_report(summary), flush=True)  # the report on stdout, progress on stderr
        return summary

    def _announce(self) -> None:
        cfg, info = self.cfg, self.info
        params = f"{self.num_parameters / 1e6:.2f}M parameters" if self.num_parameters else "model"
        val = f", {len(self.val_data)} val documents" if self.val_data is not None else ", no validation split"
        self.say(
            f"fastsft train: {params} on {info.device}{f' x {info.world_size} ranks' if info.enabled else ''}, "
            f"{len(self.train_data)} train documents{val}, {len(self.loader)} rows of {cfg.data.seq_len} tokens "
            f"per epoch per rank (loss over {self.loader.bucket} positions per row: "
            f"{self.loader.stats['lm_head_rows_skipped']:.0%} of lm_head rows skipped), "
            f"{cfg.train.gradient_accumulation_steps} rows per step, {self.total_steps} steps, "
            f"precision {self.precision}, output {self.out_dir}"
        )

    def _final_eval(self) -> None:
        s = self.state
        if s.last_eval is not None and s.last_eval.get("step") == s.step:
            return
        if self.val_data is None and not self.examples:
            return
        self._after_eval(self.evaluate())

    def _loop(self, stop: GracefulStop) -> None:
        cfg, info, s = self.cfg, self.info, self.state
        accum = cfg.train.gradient_accumulation_steps
        # Device metrics are read every `read_every` steps: often enough to stop after max_nonfinite_steps bad steps.
        read_every = max(1, min(cfg.log.logging_steps, cfg.train.max_nonfinite_steps))
        stream = self._micro_batch_stream()
        pending: list = []  # (StepMetrics on device, host numbers) not read yet
        unlogged: list[dict] = []  # read but not logged yet
        clock = _IntervalClock()
        while s.step < self.total_steps and s.stop_reason is None:
            micro = [next(stream) for _ in range(accum)]
            if self.stop_at_step is not None and s.step + 1 == self.stop_at_step:
                stop.request("stop_at_step (test)")
            local = [sum(b.num_loss_tokens for b in micro), sum(b.num_tokens for b in micro), float(stop.requested)]
            loss_tokens, tokens, stop_votes = distributed.all_reduce_host(local, info)
            lr = self.scheduler.get_last_lr()[0]
            metrics = self.train_step([b.to(info.device) for b in micro], max(int(loss_tokens), 1))
            s.step += 1
            s.micro_batches_seen += accum
            s.tokens_seen += int(tokens)
            s.loss_tokens_seen += int(loss_tokens)
            pending.append((metrics, {"step": s.step, "tokens": int(tokens), "loss_tokens": int(loss_tokens), "lr": lr}))

            last = s.step == self.total_steps or bool(stop_votes)
            if len(pending) >= read_every or last:
                rows = self._read_pending(pending)
                unlogged.extend(rows)
                self._account_nonfinite(rows)
            if unlogged and (s.step % cfg.log.logging_steps == 0 or last):
                self._flush_log(unlogged, clock)
            if self.logger is not None:
                self.logger.advance(s.step)

            if cfg.eval.eval_steps and s.step % cfg.eval.eval_steps == 0 and s.step < self.total_steps:
                with clock.paused():
                    self._after_eval(self.evaluate())
            if stop_votes:
                s.stop_reason = f"stopped by {stop.signal_name or 'a signal on another rank'} at step {s.step}"
            due = cfg.log.save_steps and s.step % cfg.log.save_steps == 0
            if (due or stop_votes) and self._last_save_step != s.step:
                with clock.paused():
                    path = self.save()
                note = f"{s.stop_reason}; " if stop_votes else ""
                resume = " Run the same command again to resume." if stop_votes else ""
                self.say(f"{note}checkpoint written: {path}.{resume}")
        if pending:
            unlogged.extend(self._read_pending(pending))
        if unlogged:
            self._flush_log(unlogged, clock)

    def _flush_log(self, rows: list[dict], clock: _IntervalClock) -> None:
        seconds = clock.lap()
        self.state.train_time_s += seconds
        self._log_interval(rows, seconds)
        rows.clear()

    def summary(self) -> dict:
        s = self.state
        return {
            "steps": s.step,
            "total_steps": self.total_steps,
            "stop_reason": s.stop_reason,
            "train_time_s": round(s.train_time_s, 2),
            "tokens_seen": s.tokens_seen,
            "nonfinite_steps": s.nonfinite_total,
            "initial_eval": _strip_samples(s.initial_eval),
            # A run stopped before any evaluation after step 0 has no "after": the start's evaluation is not one.
            "final_eval": _strip_samples(s.last_eval if s.last_eval and s.last_eval.get("step", 0) > 0 else None),
            "best_val_loss": s.best_val_loss,
            "best_checkpoint": s.best_checkpoint,
            "output_dir": str(self.out_dir),
            "checkpoint": str(ckpt.latest_checkpoint(self.out_dir) or ""),
        }


class _IntervalClock:
    """Wall time between log points, minus time spent evaluating and saving (so tokens/s is training speed)."""

    def __init__(self):
        self._start = time.perf_counter()
        self._excluded = 0.0

    def lap(self) -> float:
        now = time.perf_counter()
        seconds = max(now - self._start - self._excluded, 1e-9)
        self._start, self._excluded = now, 0.0
        return seconds

    @contextlib.contextmanager
    def paused(self):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._excluded += time.perf_counter() - t0


def _strip_samples(result: dict | None) -> dict | None:
    return None if result is None else {k: v for k, v in result.items() if k != "samples"}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def _format_eval(result: dict) -> str:
    parts = []
    if "val_loss" in result:
        parts.append(f"val loss {result['val_loss']:.4f}, token accuracy {result['val_token_accuracy']:.1%}")
    if "exact_match" in result:
        parts.append(
            f"exact match {result['exact_match_count']}/{result['generation_samples']} ({result['exact_match']:.1%})"
        )
    return "; ".join(parts) or "nothing to evaluate"


def format_report(summary: dict) -> str:
    """The end-of-run report: held-out metrics before and after training, time, where things are."""
    lines = [f"done: {summary['steps']}/{summary['total_steps']} steps in {format_duration(summary['train_time_s'])} "
             f"of training, {summary['tokens_seen']:,} tokens"]
    if summary["stop_reason"]:
        lines.append(f"  ({summary['stop_reason']})")
    before, after = summary["initial_eval"] or {}, summary["final_eval"] or {}
    rows = [("held-out loss", "val_loss", "{:.4f}"), ("token accuracy", "val_token_accuracy", "{:.1%}"),
            ("exact match (greedy)", "exact_match", "{:.1%}")]
    shown = [(label, key, fmt) for label, key, fmt in rows if key in before or key in after]
    if shown:
        # An evaluation older than the last step (a stopped run) is labelled with its step, not "after".
        after_label = "after" if after.get("step", summary["steps"]) == summary["steps"] else f"step {after['step']}"
        lines.append(f"  {'':22s} {'before':>10s} {after_label:>10s}")
        for label, key, fmt in shown:
            b = fmt.format(before[key]) if key in before else "-"
            a = fmt.format(after[key]) if key in after else "-"
            lines.append(f"  {label:22s} {b:>10s} {a:>10s}")
    if summary["nonfinite_steps"]:
        lines.append(f"  steps skipped for a non-finite loss: {summary['nonfinite_steps']}")
    if summary["best_checkpoint"]:
        lines.append(f"  best checkpoint (val loss {summary['best_val_loss']:.4f}): {summary['best_checkpoint']}")
    if summary["checkpoint"]:
        lines.append(f"  last checkpoint: {summary['checkpoint']}")
        lines.append(f"  export: fastsft export --checkpoint {summary['checkpoint']} --out {summary['output_dir']}/hf")
    return "\n".join(lines)
