"""The `fastsft train` config tree: YAML files, dotted overrides with type conversion, clear errors, rendering."""

import dataclasses

import pytest
import yaml

from fastsft.train import config as C
from fastsft.train.run import add_arguments, resolve_config


def test_defaults_use_transformers_names():
    keys = set(C.all_keys())
    for name in ("optim.learning_rate", "optim.warmup_ratio", "optim.lr_scheduler_type", "optim.max_grad_norm",
                 "train.num_train_epochs", "train.max_steps", "train.gradient_accumulation_steps", "train.seed",
                 "log.logging_steps", "eval.eval_steps", "log.save_steps", "log.save_total_limit"):
        assert name in keys


def test_every_option_has_a_doc_and_its_default_converts_to_its_type():
    for key, tp, default, doc, choices in C.iter_options():
        assert doc, f"{key} has no doc"
        assert C.convert_value(default, tp, key, "defaults") == default
        if choices:
            assert default in choices or default is None


def test_overrides_convert_types():
    cfg = C.load_config(None, [
        "optim.learning_rate=3e-4", "data.seq_len=2048", "train.torch_compile=true", "model.tokenizer=null",
        "data.train_files=a.jsonl,b.jsonl", "train.freeze=[embed_tokens.*, norm.*]", "train.num_train_epochs=2",
        "data.max_len=1_024",
    ])
    assert cfg.optim.learning_rate == pytest.approx(3e-4) and isinstance(cfg.optim.learning_rate, float)
    assert cfg.data.seq_len == 2048 and isinstance(cfg.data.seq_len, int)
    assert cfg.train.torch_compile is True
    assert cfg.model.tokenizer is None
    assert cfg.data.train_files == ["a.jsonl", "b.jsonl"]
    assert cfg.train.freeze == ["embed_tokens.*", "norm.*"]
    assert cfg.train.num_train_epochs == 2.0 and isinstance(cfg.train.num_train_epochs, float)
    assert cfg.data.max_len == 1024


def test_chat_template_options_from_the_command_line_and_yaml(tmp_path):
    cfg = C.load_config(None, ['data.chat_template_kwargs={"enable_thinking": false}', "data.earlier_reasoning=keep",
                               "data.columns=messages=conversations", "data.split=test"])
    assert cfg.data.chat_template_kwargs == {"enable_thinking": False}
    assert (cfg.data.earlier_reasoning, cfg.data.columns, cfg.data.split) == ("keep", "messages=conversations", "test")
    file = tmp_path / "run.yaml"
    file.write_text("data:\n  chat_template_kwargs:\n    enable_thinking: false\n    tools_style: 2\n")
    assert C.load_config(str(file)).data.chat_template_kwargs == {"enable_thinking": False, "tools_style": 2}
    for bad in ("data.chat_template_kwargs=3", "data.chat_template_kwargs=[a, b]", "data.chat_template_kwargs={a: "):
        with pytest.raises(C.ConfigError, match="data.chat_template_kwargs must be dict"):
            C.load_config(None, [bad])
    with pytest.raises(C.ConfigError, match="must be one of template, keep"):
        C.load_config(None, ["data.earlier_reasoning=drop"])


def test_bare_leaf_names_work_when_unique():
    cfg = C.load_config(None, ["learning_rate=1e-3", "max_steps=7", "seq_len=128"])
    assert (cfg.optim.learning_rate, cfg.train.max_steps, cfg.data.seq_len) == (1e-3, 7, 128)


@pytest.mark.parametrize("override, expected", [
    ("optim.lr=3e-4", "optim.learning_rate"),
    ("lr=3e-4", "optim.learning_rate"),
    ("data.seq_lenn=5", "data.seq_len"),
    ("train.epochs=3", "train.num_train_epochs"),
    ("warmup=10", "optim.warmup_steps"),
])
def test_unknown_key_is_named_with_a_suggestion(override, expected):
    with pytest.raises(C.ConfigError) as err:
        C.load_config(None, [override])
    message = str(err.value)
    assert repr(override.split("=")[0]) in message
    assert "command line" in message
    assert expected in message


@pytest.mark.parametrize("override, fragment", [
    ("data.seq_len=abc", "data.seq_len must be int"),
    ("data.seq_len=1.5", "data.seq_len must be int"),
    ("train.precision=fp16", "must be one of auto, bf16, fp32"),
    ("train.torch_compile=maybe", "must be bool"),
    ("data.seq_len=0", "data.seq_len must be > 0"),
    ("data.seq_len=1", "data.seq_len must be between 2 (a row needs a next token"),  # no supervised token at all
    (f"data.seq_len={2**31 - 1}", "and 1,048,576 (2**20; the step allocates"),  # passed, then allocated 64 GB
    ("optim.warmup_ratio=1.5", "warmup_ratio"),
    ("seq_len", "not an override"),
])
def test_bad_values_are_clear_errors(override, fragment):
    with pytest.raises(C.ConfigError) as err:
        C.load_config(None, [override])
    assert fragment in str(err.value)


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  learning_rate: 1.0e-4\n  lr_scheduler_type: linear\ndata:\n  seq_len: 512\n"
                    "max_steps: 50\n")
    cfg = C.load_config(str(path), ["data.seq_len=1024"])
    assert cfg.optim.learning_rate == 1e-4
    assert cfg.optim.lr_scheduler_type == "linear"
    assert cfg.data.seq_len == 1024  # the command line wins over the file
    assert cfg.train.max_steps == 50


def test_yaml_unknown_key_names_file_and_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  learning_rate: 1.0e-4\n  warmup_stepz: 3\n")
    with pytest.raises(C.ConfigError) as err:
        C.load_config(str(path))
    message = str(err.value)
    assert f"{path}:3" in message and "optim.warmup_stepz" in message and "optim.warmup_steps" in message


def test_yaml_wrong_type_and_section_misuse(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  seq_len: [1, 2]\n")
    with pytest.raises(C.ConfigError, match=r"run.yaml:2: data.seq_len must be int"):
        C.load_config(str(path))
    path.write_text("optim: 3\n")
    with pytest.raises(C.ConfigError, match=r"run.yaml:1: optim is a section"):
        C.load_config(str(path))
    with pytest.raises(C.ConfigError, match="does not exist"):
        C.load_config(str(tmp_path / "missing.yaml"))


def test_yaml_round_trip(tmp_path):
    """A run's saved config.yaml (to_yaml) is a --config file that gives the same options back."""
    cfg = C.load_config(None, ["optim.learning_rate=5e-5", "data.train_files=x.jsonl", "eval.eval_steps=9"])
    (tmp_path / "config.yaml").write_text(C.to_yaml(cfg))
    again = C.load_config(str(tmp_path / "config.yaml"))
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)
    assert dataclasses.asdict(again) != dataclasses.asdict(C.TrainConfig())


def test_markdown_table_lists_every_option():
    table = C.markdown_table()
    for key in C.all_keys():
        assert f"| `{key}` |" in table
    assert table.count("\n") == len(C.all_keys()) + 2


def _parse(argv):
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_readme_options_table_is_the_generated_one():
    """The README's table of `fastsft train` options is `python -m fastsft.train.config --markdown`, row for row."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert C.markdown_table().strip() in readme, "README.md's options table is stale: paste `python -m " \
        "fastsft.train.config --markdown` over it"


def test_command_line_demo_detection_and_flags(tmp_path):
    cfg, is_demo = resolve_config(_parse([]))
    assert is_demo and cfg.model.tokenizer == "byte" and cfg.data.val_files
    cfg, is_demo = resolve_config(_parse(["max_steps=3"]))
    assert is_demo and cfg.train.max_steps == 3
    data = tmp_path / "a.jsonl"
    data.write_text("{}\n")
    cfg, is_demo = resolve_config(_parse(["--data", str(data), "max_steps=5", "--out", str(tmp_path / "o")]))
    assert not is_demo
    assert cfg.data.train_files == [str(data)] and cfg.train.max_steps == 5 and cfg.output_dir == str(tmp_path / "o")
    cfg, _ = resolve_config(_parse(["--model", "m", "--resume"]))
    assert cfg.model.path == "m" and cfg.resume == "always"


def test_dry_run_prints_resolved_yaml(capsys):
    from fastsft.cli import main

    assert main(["train", "--dry-run", "optim.learning_rate=0.01", "data.seq_len=64"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["optim"]["learning_rate"] == 0.01 and printed["data"]["seq_len"] == 64
    assert main(["train", "--dry-run", "optim.lr=0.01"]) == 2
    assert "optim.learning_rate" in capsys.readouterr().err


def test_resume_note_names_only_what_changed():
    """A checkpoint written before an option existed counts that option as its default; a dict-valued option is
    compared whole."""
    from fastsft.train.trainer import config_drift

    saved = C.to_dict(C.TrainConfig())
    del saved["data"]["earlier_reasoning"], saved["data"]["chat_template_kwargs"]  # an older fastsft's config
    assert config_drift(saved, C.to_dict(C.TrainConfig())) == []
    now = C.to_dict(C.load_config(None, ['data.chat_template_kwargs={"enable_thinking": false}', "output_dir=x"]))
    assert config_drift(saved, now) == ["data.chat_template_kwargs: None -> {'enable_thinking': False}"]
    saved["data"]["chat_template_kwargs"] = {"enable_thinking": False, "extra": 1}
    assert config_drift(saved, now) == ["data.chat_template_kwargs: {'enable_thinking': False, 'extra': 1} -> "
                                        "{'enable_thinking': False}"]
