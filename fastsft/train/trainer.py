"""The SFT run: its components built once from the config, then the loop (step, log, evaluate, checkpoint, stop on a
signal) with exact resume.

Sits at the top of the flow, called by `fastsft train` (`fastsft.train.run`) with a resolved `TrainConfig`. The
constructor builds every component, in the order data flows (`fastsft.train.build`):

    tokenizer -> prepared shards -> PackedLoader rows (this rank's share) -> Transformer -> [FSDP2 shards]
    -> optimizer, schedule, TrainStep (fastsft.train.step) ; Evaluator (fastsft.train.evaluation)

and `fit()` runs: resume from the newest checkpoint that verifies (`fastsft.train.checkpoint`), then the loop, the
final evaluation and the final save, all under `GracefulStop` (`fastsft.train.signals`). A test replaces a component
on the built Trainer (e.g. wraps `trainer.train_step`) rather than patching the construction.

Host syncs: the step's metrics are device tensors; they are read once per logging interval (and at evaluations and
saves), never per step. The host numbers the loop needs per step (supervised-token counts, a stop flag) come from
the loader and the signal handler, and are all-reduced on CPU tensors across ranks.

(Over 500 lines on purpose: the loop, its logging, evaluation calls and checkpoint calls share the run's state;
every component it uses is built elsewhere, in fastsft/train/build.py.)
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path

import torch

from fastsft._fsutil import DirectoryLock
from fastsft.adapters.config import PROMPT_METHODS
from fastsft.train import build, distributed, evaluation
from fastsft.train import checkpoint as ckpt
from fastsft.train.build import RunError
from fastsft.train.config import TrainConfig, to_dict, to_yaml
from fastsft.train.metrics import RunLogger, format_report, peak_matmul_flops, plot_loss_curve, strip_samples
from fastsft.train.signals import GracefulStop

LOCK_NAME = ".fastsft.lock"


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


class Trainer:
    """One training run. Building it prepares data, model and optimizer; `fit()` trains and returns a summary dict;
    rank 0 prints progress and the final report."""

    def __init__(self, cfg: TrainConfig, info: distributed.DistInfo | None = None, print_fn=print):
        from fastsft.data.shards import open_shards
        from fastsft.data.tokenizer import load_tokenizer
        from fastsft.train import step as step_lib

        self.cfg = cfg
        self.info = info = info or distributed.DistInfo(device=distributed.pick_device(cfg.train.device))
        self.out_dir = Path(cfg.output_dir)
        self._print = print_fn
        self.logger: RunLogger | None = None
        self.state = LoopState()
        self._last_save_step = -1
        self._lock = DirectoryLock(self.out_dir / LOCK_NAME, what="--out") if info.is_main else None
        try:
            if cfg.train.cpu_threads:
                torch.set_num_threads(cfg.train.cpu_threads)
            torch.manual_seed(cfg.train.seed)
            if self._lock is not None:
                self._claim_out_dir()
                for stale in ckpt.remove_stale_temporaries(self.out_dir):
                    self.say(f"removed {stale.name} (a checkpoint save that did not finish)")
            distributed.barrier(info)

            if cfg.model.path:
                build.require_model_dir(cfg)  # before the tokenizer, which defaults to the model directory
            try:
                self.tokenizer = load_tokenizer(build.resolve_tokenizer_spec(cfg))
            except ValueError as e:  # not 'byte' and not a tokenizer directory: the message says what to give
                raise RunError(str(e)) from None
            (train_dir, train_split), val = build.prepare_data(cfg, self.tokenizer, info, self.say)
            vocab, verify = self.tokenizer.vocab_size, cfg.data.verify
            self.train_data = open_shards(train_dir, train_split, vocab_size=vocab, verify=verify)
            self.val_data = open_shards(val[0], val[1], vocab_size=vocab, verify=verify) if val else None
            self.loader = build.make_loader(self.train_data, cfg, info, seed=cfg.train.seed)
            if len(self.loader) == 0:
                raise RunError(f"the training data gives no packed rows for rank {info.rank}; use more data or fewer "
                               "ranks")

            self.precision = step_lib.resolve_precision(cfg.train.precision, cfg.model.dtype, info.device.type,
                                                        sharded=info.enabled)
            self.adapter = None  # the LoRA-family adapter section in use (fastsft.adapters), None: full fine-tuning
            adapted = cfg.adapter.method != "none"
            model = build.build_model(cfg, self.tokenizer.vocab_size, info.device,
                                      self._base_dtype() if adapted else self.precision.param_dtype)
            self.model_config = model.config
            self.param_dtype = model.embed_tokens.weight.dtype
            self.num_parameters = model.num_parameters()
            self.flops_per_token = model.flops_per_token(build.attention_context(self.train_data, cfg.data.seq_len))
            if cfg.train.freeze:
                step_lib.freeze_parameters(model, cfg.train.freeze)
            if adapted:
                model, self.adapter = self._build_adapters(model)
            if cfg.train.gradient_checkpointing:
                step_lib.apply_activation_checkpointing(model)
            if info.enabled:
                distributed.shard_model(model, info, param_dtype=self.precision.fsdp_param_dtype)
            if cfg.train.torch_compile:
                try:
                    step_lib.apply_compile(model, "blocks", compile_mode=cfg.train.compile_mode)  # in place
                except ValueError as e:
                    raise RunError(f"train.compile_mode: {e}") from None
            self.model = model

            o = cfg.optim
            self.optimizer = step_lib.build_optimizer(
                model, lr=o.learning_rate, weight_decay=o.weight_decay, betas=(o.adam_beta1, o.adam_beta2),
                eps=o.adam_epsilon, fused=o.fused,
            )
            self.total_steps = build.total_optimizer_steps(cfg, len(self.loader))
            schedule = step_lib.lr_lambda(
                build.warmup_steps(cfg, self.total_steps), self.total_steps, o.lr_scheduler_type, o.min_lr_ratio
            )
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
            self.train_step = step_lib.TrainStep(model, self.optimizer, self.scheduler, o.max_grad_norm,
                                                 self.precision)
            self.evaluator = evaluation.Evaluator(
                cfg, self.val_data, self.tokenizer, lambda data, seed: build.make_loader(data, cfg, info, seed),
                self.precision, info,
            )
            self.peak_flops = peak_matmul_flops(info.device) if info.device.type == "cuda" else None
        except BaseException:
            self.close()
            raise

    def _base_dtype(self) -> torch.dtype:
        """An adapter run keeps its frozen base in the compute dtype: bf16 under bf16 autocast (no fp32 copy), else
        the parameter dtype. The adapters themselves are fp32 masters."""
        return torch.bfloat16 if self.precision.autocast_dtype == torch.bfloat16 else self.precision.param_dtype

    def _build_adapters(self, model):
        from fastsft.adapters.peft_io import build_adapters

        cfg = self.cfg
        if not cfg.model.path:
            raise RunError(f"adapter.method={cfg.adapter.method} trains adapters on a pretrained base: pass --model DIR "
                           "(model.path)")
        try:
            model, section = build_adapters(model, cfg.adapter, self._base_dtype(), tokenizer=self.tokenizer)
        except (ValueError, FileNotFoundError, ImportError) as e:
            raise RunError(str(e)) from None
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        size = f"{section.num_virtual_tokens} virtual tokens" if section.method in PROMPT_METHODS else f"r={section.rank}"
        self.say(f"adapter: {section.method} {size}, {trainable:,} trainable parameters of "
                 f"{sum(p.numel() for p in model.parameters()):,}")
        return model, section

    def _claim_out_dir(self) -> None:
        """Create --out and take its lock (one run per output directory), or a RunError saying what is wrong."""
        where = f"output_dir={self.out_dir} (--out)"
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._lock.acquire()
        except BlockingIOError as e:
            raise RunError(str(e)) from None
        except (FileExistsError, NotADirectoryError):
            raise RunError(f"{where}: a file is in the way (not a directory); give a directory path") from None
        except OSError as e:
            raise RunError(f"{where}: cannot write there ({e.strerror or e}); choose a writable directory") from None

    def close(self) -> None:
        """Release the output directory (fit() does this when it ends)."""
        if self._lock is not None:
            self._lock.release()

    # -- output -------------------------------------------------------------------------------------------------
    def say(self, text: str) -> None:
        if not self.info.is_main:
            return
        if self.logger is not None:
            self.logger.write(text)
        else:
            self._print(text, file=sys.stderr, flush=True)

    # -- checkpoints ----------------------------------------------------------------------------------------------
    def find_resume_checkpoint(self) -> Path | None:
        mode = self.cfg.resume
        if mode == "never":
            found = ckpt.latest_checkpoint(self.out_dir) if self.info.is_main else None
            found = distributed.broadcast_object(str(found) if found else None, self.info)
            if found:
                # Starting over beside an older run's checkpoints would mix the two (and pruning by step number
                # could delete the new ones), so this is refused rather than guessed.
                raise RunError(f"resume=never but {self.out_dir} already holds checkpoints ({Path(found).name}); use a "
                               "new output_dir (--out) or delete them")
            return None
        found = ckpt.find_resumable(self.out_dir, self.info, self.say)
        if found is None and mode == "always":
            raise RunError(f"--resume: no checkpoint in {self.out_dir} (looked for {ckpt.PREFIX}* directories)")
        return found

    def _write_extras(self, directory: Path) -> None:
        """config.yaml, config.json + tokenizer files, so export/generate can rebuild the model from a checkpoint."""
        import json

        from fastsft.hf_checkpoint import config_to_hf

        (directory / "config.yaml").write_text(to_yaml(self.cfg), encoding="utf-8")
        hf = config_to_hf(self.model_config, self.param_dtype)
        (directory / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
        self.tokenizer.save_pretrained(directory)

    def save(self) -> Path:
        step = self.state.step
        info = self.info
        path = ckpt.save(
            self.out_dir, step, model=self.model, optimizer=self.optimizer,
            rank_state={"scheduler": self.scheduler.state_dict(), "loader": self.loader.state_dict()},
            trainer_state={"loop": asdict(self.state), "total_steps": self.total_steps,
                           "world_size": info.world_size, "tokenizer": self.tokenizer.identity()},
            write_shared=self._write_extras, info=info, trainable_only=self.adapter is not None,
        )
        if info.is_main:
            keep = (Path(self.state.best_checkpoint),) if self.state.best_checkpoint else ()
            ckpt.prune_checkpoints(self.out_dir, self.cfg.log.save_total_limit, keep=keep)
        distributed.barrier(info)
        self._last_save_step = step
        return path

    def load(self, path: Path) -> None:
        trainer_state, rank_state = ckpt.load(path, model=self.model, optimizer=self.optimizer, info=self.info,
                                              trainable_only=self.adapter is not None)
        try:
            self.scheduler.load_state_dict(rank_state["scheduler"])
            self.loader.load_state_dict(rank_state["loader"])
            loop = trainer_state["loop"]
            self.state = LoopState(**{k: v for k, v in loop.items() if k in LoopState.__dataclass_fields__})
        except (KeyError, TypeError, ValueError) as e:
            raise RunError(f"{path}: its schedule, loader or loop state does not fit this run ({e}); resume with the "
                           "same data and options, or start a new --out") from None
        self.state.stop_reason = None
        self._last_save_step = self.state.step
        self._check_config_drift(path)

    def _check_config_drift(self, path: Path) -> None:
        import yaml

        saved_file = path / "config.yaml"
        if not saved_file.is_file() or not self.info.is_main:
            return
        changed = config_drift(yaml.safe_load(saved_file.read_text()), to_dict(self.cfg))
        if changed:
            self.say(f"note: resuming with options that differ from the checkpoint's: {', '.join(changed)}")

    # -- evaluation -----------------------------------------------------------------------------------------------
    def evaluate(self) -> dict:
        result = self.evaluator(self.model, self.state.step)
        self._after_eval(result)
        return result

    def _after_eval(self, result: dict) -> None:
        s = self.state
        s.last_eval = result
        s.history.append(strip_samples(result))
        if self.logger is not None:
            self.logger.log({k: v for k, v in result.items() if isinstance(v, (int, float))})
        self.say(f"eval at step {s.step}: " + evaluation.format_eval(result))
        for sample in result.get("samples", []):
            prompt = sample["prompt"].replace("\n", "\\n")
            self.say(f"  prompt {prompt!r}\n    expected {sample['expected']!r}  generated {sample['generated']!r}")
        if result.get("val_loss") is None:
            return
        patience = self.cfg.eval.early_stopping_patience
        verdict = evaluation.early_stopping(s, result["val_loss"], patience)
        if verdict == "improved" and patience > 0 and s.step > 0:
            s.best_checkpoint = str(self.save())
        elif verdict == "stop":
            s.stop_reason = (f"early stopping: val loss did not improve for {patience} evaluations "
                             f"(best {s.best_val_loss:.4f}, checkpoint {s.best_checkpoint})")

    # -- the run --------------------------------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg, info = self.cfg, self.info
        try:
            resume_from = self.find_resume_checkpoint()
            if resume_from is not None:
                self.load(resume_from)
                self.say(f"resumed from {resume_from} at step {self.state.step}")
                if self.state.step >= self.total_steps:
                    self.say(f"this run is already complete ({self.state.step}/{self.total_steps} steps); to train "
                             "again use a new --out, or raise train.max_steps / train.num_train_epochs to continue it")
            if info.is_main:
                # A resumed run drops the log rows of the steps after its checkpoint: they are trained again.
                self.logger = RunLogger(self.out_dir, self.total_steps, start_step=self.state.step,
                                        progress_bar=cfg.log.progress_bar, tensorboard=cfg.log.tensorboard)
            self._announce()
            # The handlers stay installed until the final checkpoint is written: a signal at any moment ends with a
            # complete checkpoint, and one during a save does not interrupt it.
            with GracefulStop() as stop:
                self._run(stop)
        finally:
            if self.logger is not None:
                self.logger.close()
                self.logger = None
            self.close()
        if info.is_main and cfg.log.plot:
            png = plot_loss_curve(self.out_dir / "metrics.jsonl", self.out_dir / "loss.png")
            if png is not None:
                self.say(f"loss curve: {png}")
        summary = self.summary()
        if info.is_main:
            self._print(format_report(summary), flush=True)  # the report on stdout, progress on stderr
        return summary

    def _run(self, stop: GracefulStop) -> None:
        s = self.state
        if s.step == 0 and self.cfg.eval.eval_at_start and s.initial_eval is None and self.evaluator.has_work:
            s.initial_eval = self.evaluate()
        self._loop(stop)
        finished = s.stop_reason is None or s.stop_reason.startswith("early stopping") or s.step >= self.total_steps
        # Every rank takes the same decision (the evaluation is collective), whichever got a signal.
        signalled = distributed.all_reduce_host([float(stop.requested)], self.info)[0] > 0
        if finished and not signalled and self._needs_final_eval():
            self.evaluate()
        if self._last_save_step != s.step:
            with stop.protected():
                path = self.save()
            self.say(f"checkpoint written: {path}")
        if (signalled or stop.requested) and s.stop_reason is None:
            name = stop.signal_name or "a signal"
            s.stop_reason = f"{name} received after the last step; the final checkpoint was written"

    def _needs_final_eval(self) -> bool:
        s = self.state
        if s.last_eval is not None and s.last_eval.get("step") == s.step:
            return False
        return self.evaluator.has_work

    def _announce(self) -> None:
        cfg, info = self.cfg, self.info
        val = f", {len(self.val_data)} val documents" if self.val_data is not None else ", no validation split"
        self.say(
            f"fastsft train: {self.num_parameters / 1e6:.2f}M parameters on {info.device}"
            f"{f' x {info.world_size} ranks' if info.enabled else ''}, {len(self.train_data)} train documents{val}, "
            f"{len(self.loader)} rows of {cfg.data.seq_len} tokens per epoch per rank (loss over "
            f"{self.loader.bucket} positions per row: {self.loader.stats['lm_head_rows_skipped']:.0%} of lm_head rows "
            "skipped), "
            f"{cfg.train.gradient_accumulation_steps} rows per step, {self.total_steps} steps, "
            f"precision {self.precision.name}, output {self.out_dir}"
        )

    def _micro_batch_stream(self):
        while True:  # epochs back to back; the loader's state says where in which epoch we are
            yield from self.loader

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
                    self.evaluate()
            if stop_votes:
                s.stop_reason = f"stopped by {stop.signal_name or 'a signal on another rank'} at step {s.step}"
            due = cfg.log.save_steps and s.step % cfg.log.save_steps == 0
            if (due or stop_votes) and self._last_save_step != s.step:
                with clock.paused(), stop.protected():
                    path = self.save()
                note = f"{s.stop_reason}; " if stop_votes else ""
                resume = " Run the same command again to resume." if stop_votes else ""
                self.say(f"{note}checkpoint written: {path}.{resume}")
        if pending:
            unlogged.extend(self._read_pending(pending))
        if unlogged:
            self._flush_log(unlogged, clock)

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

    def _flush_log(self, rows: list[dict], clock: _IntervalClock) -> None:
        seconds = clock.lap()
        self.state.train_time_s += seconds
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
            "tokens_per_s": tokens / seconds,
            "loss_tokens_per_s": loss_tokens / seconds,
            "skipped_steps": len(rows) - len(finite),
            "elapsed_s": round(self.state.train_time_s, 2),
        }
        if self.peak_flops is not None:  # model FLOPs utilisation of this rank against its measured bf16 peak
            from fastsft.train.step import mfu

            record["mfu"] = mfu(record["tokens_per_s"] / self.info.world_size, self.flops_per_token, self.peak_flops)
        if self.logger is not None:
            self.logger.log(record)
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
            "initial_eval": strip_samples(s.initial_eval),
            # A run stopped before any evaluation after step 0 has no "after": the start's evaluation is not one.
            "final_eval": strip_samples(s.last_eval if s.last_eval and s.last_eval.get("step", 0) > 0 else None),
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


def config_drift(saved: dict, now: dict) -> list[str]:
    """"key: saved -> now" for each option that differs between a checkpoint's config.yaml and this run's (both as
    nested dicts). An option the checkpoint's fastsft did not have yet counts as its default, so a newer fastsft
    resuming an older run names only what the user changed."""
    saved, now = _flatten(saved), _flatten(now)
    defaults = _flatten(to_dict(TrainConfig()))
    ignore = {"resume", "output_dir"}
    return [f"{k}: {saved.get(k, defaults.get(k))!r} -> {now.get(k)!r}" for k in sorted(now.keys() | saved.keys())
            if k not in ignore and saved.get(k, defaults.get(k)) != now.get(k, defaults.get(k))]


def _flatten(d: dict) -> dict:
    """{"section.option": value} from the config as nested dicts (one level of sections; a dict-valued option such
    as data.chat_template_kwargs stays one value)."""
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict) and k in _SECTIONS:
            out.update({f"{k}.{option}": value for option, value in v.items()})
        else:
            out[k] = v
    return out


_SECTIONS = {name for name, value in vars(TrainConfig()).items() if is_dataclass(value)}
