"""`fastsft train` end to end: the built-in demo in short form, the evaluation's numbers against an independent
computation, non-finite losses (skipped and counted; K in a row stop the run), early stopping keeping the best
checkpoint, metrics and progress output."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import stop_after, tiny_config, write_tiny_data

from fastsft.cli import main
from fastsft.train import checkpoint as ckpt
from fastsft.train.build import RunError
from fastsft.train.evaluation import generation_examples
from fastsft.train.metrics import read_metrics
from fastsft.train.run import DEMO_DIR, train
from fastsft.train.trainer import NonFiniteLossError, Trainer


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("data")
    write_tiny_data(directory)
    return directory


def test_demo_short_form(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["train", f"output_dir={out}", f"data.cache_dir={tmp_path / 'cache'}", "train.max_steps=3",
            "train.gradient_accumulation_steps=1", "eval.generation_samples=6", "eval.eval_max_batches=2",
            "log.logging_steps=1", "log.progress_bar=false", "log.tensorboard=false", "train.cpu_threads=1"]
    assert main(argv) == 0
    printed = capsys.readouterr()
    text = printed.out + printed.err
    assert "running the built-in demo" in text
    assert "exact match" in text and "before" in text and "after" in text
    records = read_metrics(out / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 and r["lr"] > 0 for r in steps)
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 3] and all("exact_match" in r for r in evals)
    state = ckpt.read_trainer_state(ckpt.latest_checkpoint(out))
    assert state["step"] == 3 and state["loop"]["initial_eval"]["generation_samples"] == 6


def test_demo_data_is_what_the_generator_writes(tmp_path):
    import subprocess
    import sys

    script = DEMO_DIR.parent.parent / "scripts" / "make_demo_data.py"
    subprocess.run([sys.executable, str(script), "--out", str(tmp_path)], check=True, capture_output=True)
    for path in DEMO_DIR.iterdir():
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), f"{path.name}: regenerate the demo data"
    info = json.loads((DEMO_DIR / "info.json").read_text())
    train_inputs, val_inputs = set(), set()
    for names, inputs in ((info["train_files"], train_inputs), (info["val_files"], val_inputs)):
        for name in names:
            for line in (DEMO_DIR / name).read_text().splitlines():
                record = json.loads(line)
                if "messages" in record:
                    inputs.add(record["messages"][0]["content"])
                else:
                    inputs.add(f"{record['instruction']}: {record['input']}")
    assert len(val_inputs) >= 300 and not train_inputs & val_inputs  # held out for real


def test_evaluation_matches_direct_computation(tmp_path, data_dir):
    """val loss / token accuracy / exact match recomputed document by document with plain PyTorch in float64."""
    trainer = Trainer(tiny_config(tmp_path, data_dir, train__max_steps=4, eval__generation_samples=5))
    summary = trainer.fit()
    final = summary["final_eval"]
    model = trainer.model.eval()
    total, correct, count = 0.0, 0, 0
    for i in range(len(trainer.val_data)):
        tokens, mask = trainer.val_data[i]
        ids = torch.as_tensor(tokens.astype("int64"))
        target_mask = torch.as_tensor(mask.copy())[1:]  # token t+1 is a target when mask[t+1]
        with torch.no_grad():
            logits = model.logits(ids, torch.arange(len(ids), dtype=torch.int32),
                                  torch.tensor([0, len(ids)], dtype=torch.int32), len(ids)).double()[:-1]
        targets = ids[1:]
        losses = F.cross_entropy(logits, targets, reduction="none")
        total += losses[target_mask].sum().item()
        correct += (logits.argmax(-1) == targets)[target_mask].sum().item()
        count += int(target_mask.sum())
    assert final["val_tokens"] == count
    assert final["val_loss"] == pytest.approx(total / count, rel=1e-5)
    assert final["val_token_accuracy"] == pytest.approx(correct / count, abs=1e-9)
    # The generation examples are the val records' prompts and answers.
    examples = generation_examples(trainer.val_data, trainer.tokenizer, 5)
    decoded = [(trainer.tokenizer.decode(e.prompt_ids), trainer.tokenizer.decode(e.reference_ids)) for e in examples]
    lines = (data_dir / "val.jsonl").read_text().splitlines()
    first = json.loads(lines[0])["messages"]
    assert decoded[0] == (f"<bos><|user|>{first[0]['content']}<|end|><|assistant|>", first[1]["content"])
    assert final["generation_samples"] == 5 and 0 <= final["exact_match_count"] <= 5


def _poison_steps(trainer: Trainer, bad_steps: set[int]):
    """Make the loss NaN during the given optimizer steps (1-based) by putting a NaN into the final norm's weight
    for that step only; the step must skip the update."""
    step_fn = trainer.train_step
    calls = {"n": 0}

    def poisoned(micro, num_items):
        calls["n"] += 1
        if calls["n"] not in bad_steps:
            return step_fn(micro, num_items)
        weight = trainer.model.norm.weight
        saved = weight.detach().clone()
        with torch.no_grad():
            weight[0] = float("nan")
        try:
            return step_fn(micro, num_items)
        finally:  # the skipped step left the weights alone; put the poisoned value back too
            with torch.no_grad():
                weight.copy_(saved)

    trainer.train_step = poisoned
    return trainer


def test_nonfinite_steps_are_skipped_and_counted(tmp_path, data_dir):
    trainer = _poison_steps(Trainer(tiny_config(tmp_path, data_dir, train__max_steps=6)), {2, 3})
    summary = trainer.fit()
    assert summary["steps"] == 6 and summary["nonfinite_steps"] == 2 and summary["stop_reason"] is None
    rows = {r["step"]: r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r}
    assert [s for s, r in rows.items() if r["skipped_steps"]] == [2, 3]
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_nonfinite_in_a_row_stops_with_a_clear_message(tmp_path, data_dir):
    cfg = tiny_config(tmp_path, data_dir, train__max_steps=20, train__max_nonfinite_steps=3)
    trainer = _poison_steps(Trainer(cfg), set(range(4, 100)))
    with pytest.raises(NonFiniteLossError) as info:
        trainer.fit()
    message = str(info.value)
    assert "not finite for 3 optimizer steps in a row" in message and "optim.learning_rate" in message
    assert trainer.state.step == 6  # steps 4, 5, 6 were bad: stopped right after the third
    assert ckpt.latest_checkpoint(tmp_path) is None
    assert isinstance(info.value, RunError)  # `fastsft train` prints it as one line, exit code 1


def test_early_stopping_keeps_best_checkpoint(tmp_path, data_dir):
    # A learning rate far too high makes the val loss get worse after the first evaluations.
    cfg = tiny_config(tmp_path, data_dir, train__max_steps=40, eval__eval_steps=2, eval__early_stopping_patience=2,
                      optim__learning_rate=0.3, optim__max_grad_norm=0.0, log__save_total_limit=1)
    trainer = Trainer(cfg)
    summary = trainer.fit()
    evals = [(r["step"], r["val_loss"]) for r in read_metrics(tmp_path / "metrics.jsonl") if "val_loss" in r]
    # Where the run must stop, recomputed from the logged evaluations: the second one in a row not below the best.
    best_loss, best_step, worse, expected_stop = math.inf, None, 0, None
    for step, loss in evals:
        if loss < best_loss:
            best_loss, best_step, worse = loss, step, 0
        else:
            worse += 1
            if worse == 2:
                expected_stop = step
                break
    assert expected_stop is not None and expected_stop < 40, evals  # the setup must really make it stop early
    assert summary["steps"] == expected_stop and evals[-1][0] == expected_stop
    assert summary["stop_reason"].startswith("early stopping: val loss did not improve for 2 evaluations")
    assert summary["best_val_loss"] == best_loss
    assert summary["best_checkpoint"].endswith(f"checkpoint-{best_step:08d}")
    # The best checkpoint survived pruning (limit 1) beside the last one, and holds the best weights: evaluating
    # them again gives the best val loss.
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == sorted({best_step, expected_stop})
    from fastsft.train.generate_command import load_model

    again = trainer.evaluator(load_model(summary["best_checkpoint"]), best_step)
    assert again["val_loss"] == pytest.approx(best_loss, rel=1e-6)


def test_out_of_memory_names_the_knobs(tmp_path, data_dir, capsys, monkeypatch):
    def fit(self):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Trainer, "fit", fit)
    assert train(tiny_config(tmp_path, data_dir)) == 1
    err = capsys.readouterr().err
    for knob in ("data.seq_len=32", "train.gradient_checkpointing=true", "train.gradient_accumulation_steps"):
        assert knob in err


def test_val_fraction_split_and_loss_curve(tmp_path, data_dir):
    """No val files: a fraction of the training records is held out; the loss curve PNG is written when matplotlib
    is installed."""
    cfg = tiny_config(tmp_path, data_dir, data__val_files="[]", data__val_fraction=0.25, log__plot=True)
    trainer = Trainer(cfg)
    summary = trainer.fit()
    assert trainer.val_data is not None and 0 < len(trainer.val_data) < 96 // 2
    assert len(trainer.val_data) + len(trainer.train_data) == 96  # write_tiny_data's two training files
    assert summary["final_eval"]["val_tokens"] > 0
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert not (tmp_path / "loss.png").exists()
    else:
        assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_real_use_hf_model_dir_and_prepared_data(tmp_path, data_dir, capsys):
    """--model DIR (a transformers Llama checkpoint with its tokenizer) and --data DIR (a prepared directory whose
    val split is used for evaluation); the result exports back to a directory transformers loads."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from fastsft.data.prepare import prepare_dataset
    from fastsft.data.tokenizer import load_tokenizer

    model_dir = tmp_path / "base"
    hf_config = LlamaConfig(vocab_size=263, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(1)
    LlamaForCausalLM(hf_config).save_pretrained(model_dir)
    load_tokenizer("byte").save_pretrained(model_dir)
    prepared = tmp_path / "prepared"
    prepare_dataset([data_dir / "train.jsonl"], "byte", prepared, val_fraction=0.25, progress=False)

    out = tmp_path / "run"
    argv = ["train", "--model", str(model_dir), "--data", str(prepared), "--out", str(out), "train.max_steps=3",
            "data.seq_len=64", "data.max_docs=8", "train.gradient_accumulation_steps=2", "log.progress_bar=false",
            "log.tensorboard=false", "log.plot=false", "optim.learning_rate=1e-3", "eval.eval_at_start=true"]
    assert main(argv) == 0
    text = capsys.readouterr().err
    assert "val documents" in text and "no validation split" not in text
    evals = [r for r in read_metrics(out / "metrics.jsonl") if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 3] and evals[1]["val_loss"] < evals[0]["val_loss"]
    exported = tmp_path / "exported"
    assert main(["export", "--checkpoint", str(out), "--out", str(exported)]) == 0
    reloaded = AutoModelForCausalLM.from_pretrained(exported)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    changed = [n for n, p in reloaded.state_dict().items() if not torch.equal(p, base.state_dict()[n])]
    assert changed, "training changed no weight"


def test_stopped_run_reports_no_after_evaluation(tmp_path, data_dir):
    """A run stopped (SIGINT) before any evaluation past step 0 must not present the step-0 numbers as "after"."""
    from fastsft.train.metrics import format_report

    summary = stop_after(Trainer(tiny_config(tmp_path, data_dir, eval__eval_at_start=True)), 2).fit()
    assert summary["steps"] == 2 and summary["initial_eval"]["step"] == 0
    assert summary["final_eval"] is None
    loss_row = next(line for line in format_report(summary).splitlines() if "held-out loss" in line)
    assert loss_row.split()[-1] == "-"
    # An evaluation taken before the stop is labelled with its step.
    later = {**summary, "steps": 5, "final_eval": {"step": 3, "val_loss": 1.5}}
    assert "step 3" in format_report(later) and " after" not in format_report(later)


def test_bad_model_or_tokenizer_is_a_clear_error_not_a_traceback(tmp_path, data_dir, capsys):
    """--model that is not a model directory, a checkpoint of an unsupported architecture and a bad --tokenizer are
    reported by name (exit code 1), not raised."""
    import transformers

    missing = tmp_path / "no_such_model"
    assert train(tiny_config(tmp_path / "a", data_dir, model__path=str(missing), model__tokenizer="null")) == 1
    err = capsys.readouterr().err
    assert f"model.path={missing} (--model): no config.json there" in err and "--tokenizer" not in err

    gpt2 = tmp_path / "gpt2"
    transformers.GPT2Config(vocab_size=300, n_embd=16, n_layer=1, n_head=2).save_pretrained(gpt2)
    assert train(tiny_config(tmp_path / "b", data_dir, model__path=str(gpt2))) == 1
    err = capsys.readouterr().err
    assert "model_type 'gpt2' is not supported; supported: llama" in err and str(gpt2) in err

    assert train(tiny_config(tmp_path / "c", data_dir, model__tokenizer=str(tmp_path / "no_tok"))) == 1
    assert "not 'byte' and not a directory" in capsys.readouterr().err


def test_prepared_directory_of_another_tokenizer_is_refused(tmp_path, data_dir, capsys):
    """--data PREPARED_DIR tokenized by the byte tokenizer, trained with a Hugging Face tokenizer of another
    vocabulary: its ids would train silently on the wrong text, so the run stops and says how to fix it."""
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    from fastsft.data.prepare import prepare_dataset

    prepared = tmp_path / "prepared_byte"
    prepare_dataset([str(data_dir / "train.jsonl")], "byte", prepared, progress=False)
    vocab = {f"w{i}": i for i in range(300)} | {"<unk>": 300, "<|end|>": 301}
    hf = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    hf.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=hf, unk_token="<unk>", eos_token="<|end|>")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}<|end|>{% endfor %}"
    tok.save_pretrained(tmp_path / "hf_tok")
    cfg = tiny_config(tmp_path / "run", data_dir, data__train_files=json.dumps([str(prepared)]),
                      data__val_files="[]", model__tokenizer=str(tmp_path / "hf_tok"))
    assert train(cfg) == 1
    err = capsys.readouterr().err
    assert f"{prepared} was prepared with tokenizer 'byte'" in err and "prepare the data again" in err
    # The same kind of tokenizer with another vocabulary (Llama 3's ids would fit Qwen3's) is refused too.
    from fastsft.data.tokenizer import load_tokenizer

    prepared_hf = tmp_path / "prepared_hf"
    prepare_dataset([str(data_dir / "train.jsonl")], str(tmp_path / "hf_tok"), prepared_hf, progress=False)
    hf_big = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab | {"<extra>": 302}, unk_token="<unk>"))
    hf_big.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    big = PreTrainedTokenizerFast(tokenizer_object=hf_big, unk_token="<unk>", eos_token="<|end|>")
    big.chat_template = tok.chat_template
    big.save_pretrained(tmp_path / "hf_big")
    assert load_tokenizer(str(tmp_path / "hf_big")).identity()["kind"] == load_tokenizer(str(tmp_path / "hf_tok")).identity()["kind"]
    cfg = tiny_config(tmp_path / "run2", data_dir, data__train_files=json.dumps([str(prepared_hf)]),
                      data__val_files="[]", model__tokenizer=str(tmp_path / "hf_big"))
    assert train(cfg) == 1
    err = capsys.readouterr().err
    assert f"{prepared_hf} was prepared with tokenizer" in err and "vocab 302" in err and "vocab 303" in err
    # The same directory with the tokenizer it was prepared with trains.
    cfg = tiny_config(tmp_path / "ok", data_dir, data__train_files=json.dumps([str(prepared)]), data__val_files="[]",
                      train__max_steps=1)
    assert train(cfg) == 0
