"""Tokenizers: the loss mask is checked by DECODING the tokens that carry loss and comparing them with the assistant
texts and end-of-turn markers, for the byte tokenizer and for tiny local Hugging Face tokenizers (a Llama-3-style
template, a ChatML/Qwen-style template with a default system prompt, a template whose renderings are not prefixes of
each other, and no template at all). Token ids are checked against transformers' own apply_chat_template."""

import random

import numpy as np
import pytest
from helpers import CHATML_TEMPLATE, HF_KINDS, build_hf_tokenizer
from helpers import TOKENIZER_WORDS as WORDS

from fastsft.data.formats import DataError
from fastsft.data.tokenizer import FALLBACK_CHAT_TEMPLATE, ByteTokenizer, load_tokenizer


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_tokenizers")
    return {kind: build_hf_tokenizer(root / kind, kind) for kind in HF_KINDS}


def random_text(rng):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 7)))


def random_conversation(rng, turns, system):
    messages = [{"role": "system", "content": random_text(rng)}] if system else []
    for _ in range(turns):
        messages += [{"role": "user", "content": random_text(rng)}, {"role": "assistant", "content": random_text(rng)}]
    return messages


def loss_runs(tokenizer, ids, mask):
    """Decoded text of each maximal run of loss-carrying tokens."""
    runs, start = [], None
    for i, m in enumerate(list(mask) + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append(tokenizer.decode(ids[start:i]))
            start = None
    return runs


def expected_runs(messages, end_marker, train_on="all"):
    answers = [m["content"] + end_marker for m in messages if m["role"] == "assistant"]
    return answers[-1:] if train_on == "last" else answers


# ---------------------------------------------------------------------------------------------- byte tokenizer


def test_byte_encode_decode_round_trip():
    tok = ByteTokenizer()
    rng = random.Random(1)
    for _ in range(20):
        text = random_text(rng)
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8"))
        assert tok.decode(ids) == text
    assert tok.vocab_size == 263 and tok.eos_id < tok.vocab_size and tok.pad_id < tok.vocab_size


@pytest.mark.parametrize("train_on", ["all", "last"])
def test_byte_conversation_mask(train_on):
    tok = ByteTokenizer()
    rng = random.Random(train_on)
    for turns, system in [(1, False), (3, True), (2, True)]:
        messages = random_conversation(rng, turns, system)
        ids, mask = tok.encode_conversation(messages, train_on)
        assert ids.dtype == np.int32 and mask.dtype == np.uint8 and ids.shape == mask.shape
        assert ids.max() < tok.vocab_size and ids.min() >= 0
        assert loss_runs(tok, ids, mask) == expected_runs(messages, "<|end|>", train_on)
        # the untrained part holds everything else: bos, headers, system and user turns
        expected_text = "<bos>" + "".join(f"<|{m['role']}|>{m['content']}<|end|>" for m in messages)
        assert tok.decode(ids) == expected_text


def test_byte_text_and_prompt():
    tok = ByteTokenizer()
    ids, mask = tok.encode_text("héllo wörld")
    assert tok.decode(ids) == "<bos>héllo wörld<eos>"
    assert mask.tolist() == [0] + [1] * (len(ids) - 1)  # position 0 is never a target
    messages = [{"role": "user", "content": "2+2?"}]
    assert tok.decode(tok.prompt_ids(messages)) == "<bos><|user|>2+2?<|end|><|assistant|>"
    assert set(tok.stop_ids) == {tok.eos_id, tok.end_id}


def test_decode_can_skip_special_tokens():
    """Generation output shows text only: special tokens (a sampled <pad>, the closing <|end|>) are dropped."""
    tok = load_tokenizer("byte")
    ids = tok.prompt_ids([{"role": "user", "content": "héllo"}]) + tok.encode("wörld") + [tok.pad_id, tok.eos_id]
    assert tok.decode(ids, skip_special_tokens=True) == "héllowörld"
    assert tok.decode(ids).startswith("<bos><|user|>héllo<|end|><|assistant|>wörld")


def test_byte_special_strings_in_content_stay_bytes():
    tok = ByteTokenizer()
    ids, _ = tok.encode_conversation([{"role": "user", "content": "<|end|>"}, {"role": "assistant", "content": "x"}])
    assert ids.tolist().count(tok.end_id) == 2  # only the two real turn ends


def test_byte_save_pretrained_loads_in_transformers(tmp_path):
    from transformers import AutoTokenizer

    tok = ByteTokenizer()
    tok.save_pretrained(tmp_path)
    hf = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    rng = random.Random(5)
    messages = random_conversation(rng, 2, system=True)
    ids, _ = tok.encode_conversation(messages)
    as_hf = hf.apply_chat_template(messages, tokenize=True, return_dict=False)
    assert list(as_hf) == ids.tolist()
    prompt = hf.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True, return_dict=False)
    assert list(prompt) == tok.prompt_ids(messages[:-1])
    text = random_text(rng)
    assert hf(text)["input_ids"] == tok.encode_text(text)[0].tolist()[:-1]  # HF adds <bos>, not <eos>
    assert hf.decode(tok.encode(text)) == text
    # and fastsft loading the exported directory behaves exactly like the byte tokenizer
    again = load_tokenizer(tmp_path)
    for t_on in ("all", "last"):
        a, b = again.encode_conversation(messages, t_on), tok.encode_conversation(messages, t_on)
        assert a[0].tolist() == b[0].tolist() and a[1].tolist() == b[1].tolist()
    assert again.vocab_size == tok.vocab_size and again.encode_text(text)[0].tolist() == tok.encode_text(text)[0].tolist()


# ---------------------------------------------------------------------------------------------- Hugging Face


@pytest.mark.parametrize("kind", list(HF_KINDS))
def test_hf_conversation_mask_by_decoding(hf_dirs, kind):
    from transformers import AutoTokenizer

    tok = load_tokenizer(hf_dirs[kind])
    reference = AutoTokenizer.from_pretrained(str(hf_dirs[kind]), local_files_only=True)
    if HF_KINDS[kind][1] is None:
        reference.chat_template = FALLBACK_CHAT_TEMPLATE
    end_marker = HF_KINDS[kind][4]
    rng = random.Random(kind)
    for turns, system in [(1, False), (1, True), (3, False), (2, True)]:
        messages = random_conversation(rng, turns, system)
        for train_on in ("all", "last"):
            ids, mask = tok.encode_conversation(messages, train_on)
            assert loss_runs(tok, ids, mask) == expected_runs(messages, end_marker, train_on), (kind, messages)
        ref_ids = reference.apply_chat_template(messages, tokenize=True, return_dict=False)
        assert ids.tolist() == list(ref_ids)
        assert ids.max() < tok.vocab_size


@pytest.mark.parametrize("kind", ["chatml", "thinking"])
def test_hf_user_quoting_the_answer_is_not_trained(hf_dirs, kind):
    tok = load_tokenizer(hf_dirs[kind])
    messages = [{"role": "user", "content": "say fox then dog"}, {"role": "assistant", "content": "fox"},
                {"role": "user", "content": "now dog"}, {"role": "assistant", "content": "dog"}]
    ids, mask = tok.encode_conversation(messages)
    assert loss_runs(tok, ids, mask) == ["fox<|im_end|>", "dog<|im_end|>"]


def test_hf_default_system_prompt_is_not_trained(hf_dirs):
    tok = load_tokenizer(hf_dirs["chatml"])
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "the dog"}]
    ids, mask = tok.encode_conversation(messages)
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
    assert tok.decode(ids[mask == 1]) == "the dog<|im_end|>"
    assert tok.decode(tok.prompt_ids(messages[:1])).endswith("<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n")
    assert tok.stop_ids == [tok.tok.convert_tokens_to_ids("<|im_end|>")]


def test_hf_llama_stop_ids_and_text(hf_dirs):
    tok = load_tokenizer(hf_dirs["llama3"])
    convert = tok.tok.convert_tokens_to_ids
    assert tok.stop_ids == [convert("<|end_of_text|>"), convert("<|eot_id|>")]
    ids, mask = tok.encode_text("the quick fox")
    assert tok.decode(ids) == "the quick fox<|end_of_text|>"  # this tokenizer adds no bos by itself
    assert mask[0] == 0 and mask[1:].all()


def test_hf_fallback_template_is_saved(hf_dirs, tmp_path):
    tok = load_tokenizer(hf_dirs["plain"])
    assert tok.identity()["chat_template"] == "fastsft-fallback"
    tok.save_pretrained(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.identity()["chat_template"] == "own"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "fox"}]
    assert again.encode_conversation(messages)[0].tolist() == tok.encode_conversation(messages)[0].tolist()


def test_hf_identity_tracks_content(hf_dirs, tmp_path):
    a = load_tokenizer(hf_dirs["chatml"]).identity()
    b = load_tokenizer(hf_dirs["thinking"]).identity()
    assert a["kind"] == "hf" and a["vocab_size"] > 0 and a["hash"] != b["hash"]
    assert load_tokenizer(hf_dirs["chatml"]).identity()["hash"] == a["hash"]


def test_template_rejection_is_a_data_error(hf_dirs, tmp_path):
    from transformers import AutoTokenizer

    strict = AutoTokenizer.from_pretrained(str(hf_dirs["chatml"]), local_files_only=True)
    strict.chat_template = ("{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('must start with user') }}"
                            "{% endif %}" + CHATML_TEMPLATE)
    strict.save_pretrained(str(tmp_path))
    tok = load_tokenizer(tmp_path)
    with pytest.raises(DataError, match="chat template rejected this conversation: must start with user"):
        tok.encode_conversation([{"role": "assistant", "content": "hi"}])


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="not 'byte' and not a directory"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(ValueError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="train_on='first'"):
        ByteTokenizer().encode_conversation([{"role": "assistant", "content": "x"}], "first")
