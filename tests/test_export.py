"""`fastsft export` writes a Hugging Face directory that transformers loads with the same logits and tokenizer, and
`fastsft generate` / the batched packed generation agree with transformers' greedy generate."""

import pytest
import torch
from helpers import tiny_config, write_tiny_data

from fastsft.cli import main
from fastsft.data.tokenizer import load_tokenizer
from fastsft.generate import generate_batch
from fastsft.train import checkpoint as ckpt
from fastsft.train.generate_command import load_model
from fastsft.train.trainer import Trainer

PROMPTS = [
    [{"role": "user", "content": "Upper: abc"}],
    [{"role": "user", "content": "Reverse.\n\nhgfedcba"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "x"}],
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    write_tiny_data(root / "data")
    # Untied embeddings: the export must write lm_head too.
    # A tiny learning rate keeps the model near its random init, so greedy generation does not stop at once.
    Trainer(tiny_config(root / "run", root / "data", model__tie_word_embeddings=False, optim__learning_rate=1e-5,
                        train__max_steps=2)).fit()
    return root / "run"


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "model"
    assert main(["export", "--checkpoint", str(run_dir), "--out", str(out)]) == 0  # a run dir: its newest checkpoint
    return out


def test_transformers_loads_export_with_same_logits(run_dir, exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_model = AutoModelForCausalLM.from_pretrained(exported).float().eval()
    hf_tok = AutoTokenizer.from_pretrained(exported)
    ours = load_model(ckpt.latest_checkpoint(run_dir)).eval()
    byte = load_tokenizer("byte")
    for messages in PROMPTS:
        ids = byte.prompt_ids(messages)
        assert hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                          return_dict=False) == ids
        x = torch.tensor(ids)
        with torch.no_grad():
            expected = hf_model(x[None]).logits[0].double()
            got = ours.logits(x, torch.arange(len(ids), dtype=torch.int32), torch.tensor([0, len(ids)],
                              dtype=torch.int32), len(ids)).double()
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_packed_generation_matches_transformers_greedy(run_dir, exported):
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(exported).float().eval()
    ours = load_model(ckpt.latest_checkpoint(run_dir)).eval()
    byte = load_tokenizer("byte")
    prompts = [byte.prompt_ids(m) for m in PROMPTS]
    new = 6
    outputs = generate_batch(ours, prompts, new, stop_ids=byte.stop_ids)  # all prompts packed in one row
    for prompt, output in zip(prompts, outputs, strict=True):
        with torch.no_grad():
            full = hf_model.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False,
                                     eos_token_id=byte.stop_ids, pad_token_id=byte.pad_id)[0, len(prompt):].tolist()
        cut = next((i for i, t in enumerate(full) if t in byte.stop_ids), len(full))
        assert output == full[:cut]
    assert sum(map(len, outputs)) > 0  # something was generated to compare


def test_generate_command(run_dir, capsys):
    checkpoint = ckpt.latest_checkpoint(run_dir)
    assert main(["generate", "--model", str(checkpoint), "--prompt", "Upper: abc", "--max-new-tokens", "5"]) == 0
    printed = capsys.readouterr().out.rstrip("\n")
    byte = load_tokenizer("byte")
    model = load_model(checkpoint).eval()
    (expected,) = generate_batch(model, [byte.prompt_ids([{"role": "user", "content": "Upper: abc"}])], 5,
                                 stop_ids=byte.stop_ids)
    assert printed == byte.decode(expected)
    # Sampling is seeded: the same seed gives the same text.
    args = ["generate", "--model", str(checkpoint), "--prompt", "hi", "--temperature", "1.0", "--top-k", "5",
            "--max-new-tokens", "8", "--seed", "3"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first


def test_generate_passes_chat_template_kwargs(run_dir, capsys, monkeypatch):
    from fastsft.data.tokenizer import ByteTokenizer

    seen = []
    original = ByteTokenizer.prompt_ids
    monkeypatch.setattr(ByteTokenizer, "prompt_ids", lambda self, m, kw=None: seen.append(kw) or original(self, m, kw))
    checkpoint = ckpt.latest_checkpoint(run_dir)
    args = ["generate", "--model", str(checkpoint), "--prompt", "hi", "--max-new-tokens", "2"]
    assert main(args + ["--chat-template-kwargs", '{"enable_thinking": false}']) == 0
    assert seen == [{"enable_thinking": False}]
    with pytest.raises(SystemExit):
        main(args + ["--chat-template-kwargs", "[1]"])
    assert "must be a JSON object" in capsys.readouterr().err


def test_export_errors_are_clear(tmp_path, capsys):
    assert main(["export", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "neither a fastsft checkpoint" in capsys.readouterr().err


def test_generate_missing_model_directory_is_named(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert f"--model {tmp_path / 'nope'}: no such directory" in err and "tokenizer.json" not in err
