"""Hugging Face model directories that are broken, inconsistent or hostile (issue 14 items 5, 7, 9, 12): each is
a one-line ModelDirError naming the file or field (and `fastsft train` prints it with exit code 1, no traceback);
a distinct lm_head under tie_word_embeddings and disagreeing rope fields resolve exactly as transformers 5 resolves
them (checked against transformers itself)."""

import json
import shutil

import pytest
import torch
from helpers import SMALL, random_docs, rel_err, spread_weights, tiny_config, write_tiny_data
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from fastsft.hf_checkpoint import ModelDirError, config_from_hf, load_pretrained, save_pretrained
from fastsft.model import ModelConfig, Transformer, rope_inv_freq
from fastsft.train.run import train


@pytest.fixture
def model_dir(tmp_path):
    """A tiny Llama directory written by fastsft, in 4+ shards (so shard cases have something to break)."""
    directory = tmp_path / "model"
    save_pretrained(Transformer.from_config(ModelConfig(**SMALL), seed=0), directory, max_shard_size="20KB")
    return directory


def edit_config(directory, **changes):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def first_shard(directory):
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    return directory / sorted(set(index["weight_map"].values()))[0]


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def garbage(path):
    path.write_bytes(b"\x93NUMPY not a safetensors file" * 10)


def as_single_bin(directory):
    for p in directory.glob("model*"):
        p.unlink()
    (directory / "pytorch_model.bin").write_bytes(b"pickled weights")


def dir_for_shard(directory):
    shard = first_shard(directory)
    shard.unlink()
    shard.mkdir()


def escape_index(directory, name):
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = sorted(index["weight_map"])[0]
    index["weight_map"][first] = name
    index_path.write_text(json.dumps(index))


# (break the directory, text the one-line error must contain)
BROKEN = {
    "truncated shard": (lambda d: truncate(first_shard(d)), "not a readable safetensors file (truncated or corrupt)"),
    "garbage shard": (lambda d: garbage(first_shard(d)), "not a readable safetensors file"),
    "missing shard": (lambda d: first_shard(d).unlink(), "is listed in model.safetensors.index.json but is missing"),
    "directory in place of a shard": (dir_for_shard, "is not a file"),
    "pytorch_model.bin only": (as_single_bin, "found pytorch_model.bin: fastsft reads safetensors only"),
    "null field": (lambda d: edit_config(d, hidden_size=None), "config.json: hidden_size is null, expected an integer"),
    "string for an int": (lambda d: edit_config(d, num_hidden_layers="2"), "num_hidden_layers is \"2\", expected an integer"),
    "string for a bool": (lambda d: edit_config(d, tie_word_embeddings="false"),
                          "tie_word_embeddings is \"false\", expected true or false"),
    "null epsilon": (lambda d: edit_config(d, rms_norm_eps=None), "rms_norm_eps is null, expected a number"),
    "string rope factor": (lambda d: edit_config(d, rope_scaling={"rope_type": "linear", "factor": "2"}),
                           "rope_scaling factor must be a number"),
    "config not an object": (lambda d: (d / "config.json").write_text("[1, 2]"), "expected a JSON object"),
    "index path outside (relative)": (lambda d: escape_index(d, "../outside.safetensors"),
                                      "lists '../outside.safetensors', outside the model directory"),
    "index path outside (absolute)": (lambda d: escape_index(d, "/etc/passwd"),
                                      "lists '/etc/passwd', outside the model directory"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_model_directory_is_a_one_line_error_naming_it(case, model_dir):
    breaks, expected = BROKEN[case]
    breaks(model_dir)
    with pytest.raises(ModelDirError) as caught:
        load_pretrained(model_dir)
    message = str(caught.value)
    assert expected in message and str(model_dir) in message and "\n" not in message, message
    assert "root:" not in message  # nothing read from a file outside the directory ends up in the message


def test_train_reports_broken_model_directories_without_traceback(tmp_path, model_dir, capsys):
    """The same errors through `fastsft train`: exit code 1, one line on stderr, no traceback; and a sliding window
    shorter than data.seq_len is refused at setup, before any step."""
    data = tmp_path / "data"
    write_tiny_data(data, num_train=16, num_val=4)
    byte_vocab = ModelConfig(**{**SMALL, "vocab_size": 263})
    for case in ("truncated shard", "null field", "index path outside (absolute)"):
        directory = tmp_path / case.replace(" ", "_")
        save_pretrained(Transformer.from_config(byte_vocab, seed=0), directory, max_shard_size="20KB")
        BROKEN[case][0](directory)
        assert train(tiny_config(tmp_path / f"out_{case}", data, model__path=str(directory))) == 1
        err = capsys.readouterr().err
        assert "Traceback" not in err and str(directory) in err and BROKEN[case][1] in err, err
        assert len([line for line in err.splitlines() if "error" in line]) == 1, err
    windowed = tmp_path / "mistral"
    save_pretrained(Transformer.from_config(ModelConfig(**{**SMALL, "vocab_size": 263, "model_type": "mistral",
                                                           "sliding_window": 32}), seed=0), windowed)
    out = tmp_path / "out_window"
    assert train(tiny_config(out, data, model__path=str(windowed))) == 1  # data.seq_len is 64
    err = capsys.readouterr().err
    assert "Traceback" not in err and "sliding_window=32 but max_seqlen=64" in err and "data.seq_len" in err, err
    assert not (out / "metrics.jsonl").exists() or "\"step\"" not in (out / "metrics.jsonl").read_text()


def test_distinct_lm_head_under_tied_config_is_kept_like_transformers(tmp_path):
    """config.json says tie_word_embeddings=true but the file holds its own lm_head.weight: transformers keeps the
    file's head untied (and warns); so does fastsft, and an export writes that untied head back."""
    hf = LlamaForCausalLM(LlamaConfig(**SMALL, tie_word_embeddings=False)).float()
    spread_weights(hf)
    hf.save_pretrained(tmp_path / "hf")
    edit_config(tmp_path / "hf", tie_word_embeddings=True)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").float()
    assert not torch.equal(reference.lm_head.weight, reference.model.embed_tokens.weight)  # transformers kept it

    with pytest.warns(UserWarning, match="tie_word_embeddings is true but the weights hold a distinct lm_head"):
        ours = load_pretrained(tmp_path / "hf")
    assert ours.config.tie_word_embeddings is False
    ids = random_docs([17])[0]
    n = len(ids)
    row = dict(input_ids=torch.tensor(ids), position_ids=torch.arange(n, dtype=torch.int32),
               cu_seqlens=torch.tensor([0, n], dtype=torch.int32), max_seqlen=n)
    with torch.no_grad():
        assert rel_err(ours.logits(**row), reference(torch.tensor([ids])).logits[0]) < 1e-4

    save_pretrained(ours, tmp_path / "exported")
    assert json.loads((tmp_path / "exported" / "config.json").read_text())["tie_word_embeddings"] is False
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "exported").float()
    assert torch.equal(again.lm_head.weight, reference.lm_head.weight)

    # The same file with lm_head equal to the embeddings is simply tied, without a warning.
    shutil.rmtree(tmp_path / "hf")
    LlamaForCausalLM(LlamaConfig(**SMALL, tie_word_embeddings=True)).save_pretrained(tmp_path / "hf")
    assert load_pretrained(tmp_path / "hf").config.tie_word_embeddings is True


ROPE_CASES = {
    "rope_scaling wins, theta from the top level": dict(
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4},
        rope_scaling={"rope_type": "linear", "factor": 4.0}, rope_theta=5e5),
    "rope_scaling over a default rope_parameters": dict(
        rope_parameters={"rope_type": "default", "rope_theta": 1e4}, rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "rope_parameters' own theta over the top level": dict(
        rope_parameters={"rope_type": "default", "rope_theta": 1e4}, rope_theta=5e5),
    "null rope_scaling": dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 2e4},
                              rope_scaling=None, rope_theta=5e5),
    "legacy llama3 under 'type'": dict(
        rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8}, rope_theta=5e5),
}


@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_rope_fields_resolve_like_transformers(case, tmp_path):
    raw = {**SMALL, "model_type": "llama", "architectures": ["LlamaForCausalLM"], **ROPE_CASES[case]}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    reference = LlamaRotaryEmbedding(AutoConfig.from_pretrained(tmp_path))
    assert reference.attention_scaling == 1.0
    ours = rope_inv_freq(config_from_hf(raw))
    torch.testing.assert_close(ours, reference.inv_freq.float(), rtol=1e-6, atol=0)
