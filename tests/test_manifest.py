"""manifest.json (fastsft/data/manifest.py): the one reader validates the file and checks it against the shards.
Every broken manifest is a ShardError naming the manifest and the field; paths never leave the dataset directory and
no error prints the bytes of a file the manifest pointed at."""

import json
import os

import numpy as np
import pytest

from fastsft.data.manifest import MANIFEST_NAME, read_manifest, split_documents
from fastsft.data.prepare import prepare_dataset
from fastsft.data.shards import ShardError, ShardWriter, open_shards

SECRET = "root:x:0:0:do-not-print-me:/root:/bin/bash\n" * 4


@pytest.fixture
def prepared(tmp_path):
    """A prepared dataset (byte tokenizer) with train and val splits; returns (directory, manifest dict)."""
    rng = np.random.default_rng()
    words = ["alpha", "beta", "gamma", "delta", "sort", "reverse"]
    records = [{"instruction": " ".join(rng.choice(words, int(rng.integers(1, 6)))),
                "output": " ".join(rng.choice(words, int(rng.integers(1, 6))))} for _ in range(80)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "ds"
    manifest = prepare_dataset([data], "byte", out, val_fraction=0.3, progress=False)
    assert manifest["splits"]["val"]["documents"] > 0
    return out, manifest


def rewrite(directory, manifest):
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest))


def expect(directory, match, split="train"):
    with pytest.raises(ShardError, match=match) as info:
        open_shards(directory, split=split)
    message = str(info.value)
    assert str(directory / MANIFEST_NAME) in message and "\n" not in message
    assert "do-not-print-me" not in message
    return message


def test_valid_manifest_round_trip(prepared):
    out, manifest = prepared
    assert read_manifest(out) == json.loads((out / MANIFEST_NAME).read_text())
    for split in ("train", "val"):
        ds = open_shards(out, split=split)
        assert len(ds) == manifest["splits"][split]["documents"] == split_documents(out, split)
        assert ds.num_loss_tokens == manifest["splits"][split]["loss_tokens"]
    assert split_documents(out, "test") == 0
    assert split_documents(out / "train", "train") is None  # no manifest there


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "not_a_shard"])
def test_paths_stay_inside_the_directory(prepared, tmp_path, kind):
    out, manifest = prepared
    # a valid shard outside the dataset directory: today's reader would have trained on it
    with ShardWriter(tmp_path / "elsewhere", 300) as writer:
        writer.add(np.array([1, 2, 3]), np.array([0, 1, 1]))
    outside = tmp_path / "elsewhere" / writer.close()["files"][0]
    secret = tmp_path / "passwd"
    secret.write_text(SECRET)
    entry = {
        "dotdot": os.path.relpath(outside, out),
        "absolute": str(outside),
        "symlink": "train/link.shard",
        "not_a_shard": str(secret),
    }[kind]
    if kind == "symlink":
        (out / "train" / "link.shard").symlink_to(outside)
    assert entry.startswith("..") or kind != "dotdot"
    manifest["splits"]["train"]["files"].append(entry)
    rewrite(out, manifest)
    message = expect(out, r"splits\.train\.files\[\d+\]")
    assert any(word in message for word in ("relative", "'..'", "outside", "not a .shard"))


def test_shard_error_never_prints_file_bytes(prepared):
    out, manifest = prepared
    fake = out / "train" / "fake.shard"  # inside the directory, named like a shard, holding something else
    fake.write_text(SECRET)
    manifest["splits"]["train"]["files"].append("train/fake.shard")
    rewrite(out, manifest)
    with pytest.raises(ShardError, match="not a fastsft shard") as info:
        open_shards(out)
    assert "do-not-print-me" not in str(info.value) and "x:0:0" not in str(info.value)


def test_counts_checked_against_the_shards(prepared):
    out, manifest = prepared
    for field in ("documents", "tokens", "loss_tokens"):
        broken = json.loads(json.dumps(manifest))
        broken["splits"]["train"][field] += 1
        rewrite(out, broken)
        expect(out, rf"splits\.train\.{field} = \d+ but its shards hold")
        open_shards(out, split="val")  # the other split's counts are still right


def test_another_vocabulary(prepared):
    out, manifest = prepared
    ds = open_shards(out)
    broken = dict(manifest, vocab_size=ds.max_token_id)  # one too small for the largest id
    rewrite(out, broken)
    expect(out, f"vocab_size = {ds.max_token_id} but .* holds token id {ds.max_token_id}")
    rewrite(out, dict(manifest, vocab_size=100_000))  # ids fit, but 100k ids need 4-byte storage: another vocabulary
    expect(out, "vocab_size = 100000 implies 4-byte token ids")


def test_val_listed_as_train_and_file_listed_twice(prepared):
    out, manifest = prepared
    broken = json.loads(json.dumps(manifest))
    broken["splits"]["train"]["files"].append(manifest["splits"]["val"]["files"][0])
    rewrite(out, broken)
    expect(out, "also listed as splits.train.files")

    broken = json.loads(json.dumps(manifest))
    broken["splits"]["train"]["files"] = broken["splits"]["val"]["files"]
    broken["splits"]["val"] = {"files": []}
    rewrite(out, broken)
    expect(out, "lies in the 'val' split's directory but is listed under 'train'")

    broken = json.loads(json.dumps(manifest))
    broken["splits"]["train"]["files"] *= 2
    rewrite(out, broken)
    expect(out, "listed twice would train its documents twice")


@pytest.mark.parametrize("content, match", [
    ("{not json", "not valid JSON"),
    (b"\xff\xfe garbage", "not UTF-8"),
    ("[1, 2]", "expected a JSON object"),
    ('{"format_version": 99, "splits": {"train": {"files": []}}}', "format_version 99"),
    ('{"splits": {}}', "'splits' must be a non-empty object"),
    ('{"splits": {"train": {"files": "train/shard-00000.shard"}}}', r"splits\.train\.files must be a list"),
    ('{"splits": {"train": {"files": [], "documents": "3"}}}', r"splits\.train\.documents must be a non-negative"),
    ('{"vocab_size": -5, "splits": {"train": {"files": []}}}', "vocab_size must be a positive integer"),
    ("[" * 100_000, "not valid JSON|nested too deeply"),
])
def test_invalid_manifest_is_one_line_naming_the_field(prepared, content, match):
    out, _ = prepared
    path = out / MANIFEST_NAME
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    expect(out, match)


def test_trainer_readers_use_the_validated_manifest(prepared):
    """The trainer's split-size and tokenizer checks go through the same reader: a broken manifest is a ShardError
    (one line from `fastsft train`), not a JSONDecodeError traceback."""
    from fastsft.data.tokenizer import load_tokenizer
    from fastsft.train.build import check_prepared_tokenizer

    out, _ = prepared
    (out / MANIFEST_NAME).write_text("{truncated")
    with pytest.raises(ShardError, match="not valid JSON"):
        check_prepared_tokenizer(out, load_tokenizer("byte"), print)
    with pytest.raises(ShardError, match="not valid JSON"):
        split_documents(out, "val")
