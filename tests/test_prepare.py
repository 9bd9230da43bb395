"""`fastsft prepare` end to end: shards read back with `open_shards` hold exactly the tokens and masks of tokenizing
each record directly; workers=1 and 2 give identical bytes; the validation split is disjoint and deterministic;
truncation/drop/bad-record counts in the manifest match counts computed independently; output-directory safety."""

import json
import random

import numpy as np
import pytest

from fastsft.data.formats import DataError
from fastsft.data.prepare import prepare_cached, prepare_dataset
from fastsft.data.shards import open_shards
from fastsft.data.sources import read_documents
from fastsft.data.tokenizer import ByteTokenizer, load_tokenizer

WORDS = ["sort", "the", "letters", "héllo", "数据", "fox", "12+7", "reverse", "word", "line\nbreak"]


def random_text(rng, n=(1, 8)):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(*n)))


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def alpaca_records(rng, n):
    return [{"instruction": random_text(rng), "input": random_text(rng, (0, 3)), "output": random_text(rng)}
            for _ in range(n)]


def messages_records(rng, n):
    records = []
    for i in range(n):
        msgs = [{"role": "system", "content": random_text(rng)}] if i % 3 == 0 else []
        for _ in range(rng.randint(1, 3)):
            msgs += [{"role": "user", "content": random_text(rng)}, {"role": "assistant", "content": random_text(rng)}]
        records.append({"messages": msgs})
    return records


def direct(tokenizer, files, train_on="all"):
    """Reference: tokenize every record of every file in order, without prepare."""
    docs = []
    for f in files:
        for _, _, document in read_documents(f):
            ids, mask = tokenizer.encode_document(document, train_on)
            docs.append((ids.tolist(), mask.astype(bool).tolist()))
    return docs


def read_split(out, split):
    ds = open_shards(out, split=split)
    return [(t.astype(np.int64).tolist(), m.tolist()) for t, m in (ds[i] for i in range(len(ds)))]


def assert_interleaving(expected, train, val):
    """Every expected document is the next one of train or of val, in order: no loss, no duplication, no reordering."""
    i = j = 0
    for doc in expected:
        if i < len(train) and train[i] == doc:
            i += 1
        elif j < len(val) and val[j] == doc:
            j += 1
        else:
            raise AssertionError(f"document {doc} missing or out of order")
    assert (i, j) == (len(train), len(val))


@pytest.fixture
def data(tmp_path):
    rng = random.Random()  # fresh inputs every run
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", alpaca_records(rng, 60))
    chat = tmp_path / "chat.json"
    chat.write_text(json.dumps(messages_records(rng, 60), ensure_ascii=False, indent=1))
    return [alpaca, chat]


def test_cli_end_to_end_matches_direct_tokenization(tmp_path, data, capsys):
    from fastsft.cli import main

    out = tmp_path / "out"
    rc = main(["prepare", "--data", *map(str, data), "--tokenizer", "byte", "--out", str(out),
               "--val-fraction", "0.3", "--seed", "3"])
    assert rc == 0, capsys.readouterr().err
    assert "train:" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    train, val = read_split(out, "train"), read_split(out, "val")
    assert_interleaving(direct(ByteTokenizer(), data), train, val)
    assert len(val) > 0 and len(train) > len(val)
    assert manifest["splits"]["train"]["documents"] == len(train) and manifest["splits"]["val"]["documents"] == len(val)
    assert manifest["splits"]["train"]["tokens"] == sum(len(t) for t, _ in train)
    assert manifest["splits"]["val"]["loss_tokens"] == sum(sum(m) for _, m in val)
    assert manifest["tokenizer"]["kind"] == "byte" and manifest["vocab_size"] == 263
    assert [f["format"] for f in manifest["data_files"]] == ["alpaca", "messages"]
    assert all(len(f["sha256"]) == 64 and f["bytes"] > 0 for f in manifest["data_files"])
    assert sum(b["documents"] for b in manifest["length_histogram"]) == 120
    for bucket in manifest["length_histogram"]:
        lengths = [len(t) for t, _ in train + val if bucket["min"] <= len(t) <= bucket["max"]]
        assert len(lengths) == bucket["documents"] and bucket["max"] & (bucket["max"] - 1) == 0
    open_shards(out, split="train", vocab_size=263, verify=True)


def test_hf_tokenizer_prepare_and_no_loss_drop(tmp_path):
    from helpers import build_hf_tokenizer

    tok_dir = build_hf_tokenizer(tmp_path / "tok", "chatml")
    rng = random.Random()
    chats = write_jsonl(tmp_path / "chat.jsonl", messages_records(rng, 20))
    # a ChatML tokenizer has no BOS: "" becomes [eos], and position 0 never carries loss -> dropped, counted
    texts = write_jsonl(tmp_path / "text.jsonl", [{"text": random_text(rng)}, {"text": ""}, {"text": "fox"}])
    manifest = prepare_dataset([chats, texts], str(tok_dir), tmp_path / "out", progress=False)
    tokenizer = load_tokenizer(tok_dir)
    expected = [d for d in direct(tokenizer, [chats, texts]) if any(d[1])]
    assert read_split(tmp_path / "out", "train") == expected
    assert manifest["records"]["dropped"] == {"no_loss_tokens": 1, "no_loss_tokens_after_truncation": 0}
    assert manifest["records"]["read"] == 23 and manifest["records"]["kept"] == 22
    assert manifest["tokenizer"]["kind"] == "hf" and manifest["vocab_size"] == tokenizer.vocab_size
    assert "val" not in manifest["splits"]


def test_workers_give_identical_output(tmp_path):
    rng = random.Random()
    files = [write_jsonl(tmp_path / "a.jsonl", alpaca_records(rng, 700)),  # several 256-record chunks
             write_jsonl(tmp_path / "b.jsonl", messages_records(rng, 300))]
    manifests = {}
    for workers in (1, 2):
        manifests[workers] = prepare_dataset(files, "byte", tmp_path / f"w{workers}", workers=workers,
                                             val_fraction=0.2, progress=False)
    for split in ("train", "val"):
        for name in manifests[1]["splits"][split]["files"]:
            assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes()

    def stable(m):
        return {k: v for k, v in m.items() if k not in ("created_at", "seconds", "options")}

    assert stable(manifests[1]) == stable(manifests[2])
    assert manifests[1]["records"]["read"] == 1000


def test_val_split_deterministic_disjoint_by_seed(tmp_path):
    rng = random.Random()
    records = alpaca_records(rng, 300)
    unique = {json.dumps(r, sort_keys=True): r for r in records}
    records = list(unique.values())
    duplicated = records + records[:50]  # identical documents must land in the same split
    path = write_jsonl(tmp_path / "d.jsonl", duplicated)

    def split(seed, name):
        prepare_dataset([path], "byte", tmp_path / name, val_fraction=0.25, seed=seed, progress=False)
        return read_split(tmp_path / name, "train"), read_split(tmp_path / name, "val")

    train, val = split(1, "s1")
    assert split(1, "s1again") == (train, val)
    train_keys, val_keys = {str(d) for d in train}, {str(d) for d in val}
    assert not train_keys & val_keys
    assert len(train) + len(val) == len(duplicated)
    assert 0.15 < len(val_keys) / len(records) < 0.35
    other_train, other_val = split(2, "s2")
    assert {str(d) for d in other_val} != val_keys


def test_truncation_and_drop_counts(tmp_path):
    rng = random.Random()
    max_len = 48
    records = []
    for _ in range(40):
        user = "u" * rng.randint(1, 70)  # sometimes the assistant turn starts after max_len
        records.append({"prompt": user, "completion": random_text(rng, (1, 12))})
    path = write_jsonl(tmp_path / "p.jsonl", records)
    manifest = prepare_dataset([path], "byte", tmp_path / "out", max_len=max_len, progress=False)

    truncated = kept_after = dropped_after = 0
    expected = []
    for ids, mask in direct(ByteTokenizer(), [path]):
        if len(ids) > max_len:
            truncated += 1
            ids, mask = ids[:max_len], mask[:max_len]
            if not any(mask):
                dropped_after += 1
                continue
            kept_after += 1
        expected.append((ids, mask))
    assert truncated > kept_after > 0 and dropped_after > 0  # the random lengths exercise every case
    records_info = manifest["records"]
    assert records_info["truncated"] == truncated
    assert records_info["dropped"] == {"no_loss_tokens": 0, "no_loss_tokens_after_truncation": dropped_after}
    assert records_info["kept"] == len(expected) == 40 - dropped_after
    assert read_split(tmp_path / "out", "train") == expected


def test_train_on_last(tmp_path):
    rng = random.Random()
    path = write_jsonl(tmp_path / "m.jsonl", messages_records(rng, 30))
    manifest = prepare_dataset([path], "byte", tmp_path / "out", train_on="last", progress=False)
    expected = direct(ByteTokenizer(), [path], train_on="last")
    assert read_split(tmp_path / "out", "train") == expected
    assert manifest["splits"]["train"]["loss_tokens"] < sum(sum(m) for _, m in direct(ByteTokenizer(), [path]))


def test_bad_line_stops_with_location(tmp_path, capsys):
    from fastsft.data.prepare import add_arguments, run

    good = json.dumps({"instruction": "a", "output": "b"})
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([good, good, '{"instruction": "a", "output": ', good]) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:3: malformed JSON"):
        prepare_dataset([path], "byte", tmp_path / "out", progress=False)
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert run(parser.parse_args(["--data", str(path), "--tokenizer", "byte", "--out", str(tmp_path / "out")])) == 1
    assert "bad.jsonl:3: malformed JSON" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]  # no output, no staging left behind


def test_skip_bad_counts_and_examples(tmp_path):
    good = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    lines = [good, "{not json", good, json.dumps({"messages": [{"role": "robot", "content": "x"}]}),
             json.dumps({"messages": [{"role": "user", "content": "only"}]}), good]
    path = tmp_path / "s.jsonl"
    path.write_text("\n".join(lines) + "\n")
    manifest = prepare_dataset([path], "byte", tmp_path / "out", skip_bad=True, progress=False)
    records = manifest["records"]
    assert (records["read"], records["kept"], records["skipped_bad"]) == (6, 3, 3)
    assert records["skipped_bad_by_field"] == {"json": 1, "messages[].role": 1, "messages": 1}
    assert [e.split(": ")[0].split("/")[-1] for e in records["bad_examples"]] == ["s.jsonl:2", "s.jsonl:4", "s.jsonl:5"]
    assert len(open_shards(tmp_path / "out")) == 3


def test_empty_dataset_is_an_error(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_text("{oops\n" + json.dumps({"text": 3}) + "\n")
    with pytest.raises(DataError, match="empty dataset: no document left"):
        prepare_dataset([path], "byte", tmp_path / "out", format="text", skip_bad=True, progress=False)
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n")
    with pytest.raises(DataError, match=r"blank\.jsonl: no records"):
        prepare_dataset([blank], "byte", tmp_path / "out2", progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()


def test_output_directory_safety(tmp_path):
    rng = random.Random()
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": random_text(rng)} for _ in range(5)])
    out = tmp_path / "out"
    prepare_dataset([path], "byte", out, progress=False)
    with pytest.raises(FileExistsError, match="already holds a prepared dataset; pass --overwrite"):
        prepare_dataset([path], "byte", out, progress=False)
    write_jsonl(path, [{"text": random_text(rng)} for _ in range(7)])
    manifest = prepare_dataset([path], "byte", out, overwrite=True, progress=False)
    assert manifest["splits"]["train"]["documents"] == len(open_shards(out)) == 7
    (out / "manifest.json").unlink()  # an interrupted run looks like this
    with pytest.raises(FileExistsError, match="incomplete dataset"):
        prepare_dataset([path], "byte", out, progress=False)
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a fastsft dataset"):
        prepare_dataset([path], "byte", other, overwrite=True, progress=False)
    assert (other / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "out", "t.jsonl"]


def test_bad_options(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "x"}])
    for kwargs, message in [({"max_len": 1}, "--max-len 1"), ({"val_fraction": 1.0}, "--val-fraction 1.0"),
                            ({"workers": 0}, "--workers 0"), ({"train_on": "first"}, "--train-on first"),
                            ({"format": "csv"}, "--format csv")]:
        with pytest.raises(ValueError, match=message):
            prepare_dataset([path], "byte", tmp_path / "out", progress=False, **kwargs)
    with pytest.raises(FileNotFoundError, match="--data .*missing.jsonl: no such file"):
        prepare_dataset([tmp_path / "missing.jsonl"], "byte", tmp_path / "out", progress=False)


def test_prepare_cached_reuses_by_content(tmp_path):
    rng = random.Random()
    path = write_jsonl(tmp_path / "c.jsonl", alpaca_records(rng, 10))
    cache = tmp_path / "cache"
    first = prepare_cached([path], "byte", cache, progress=False)
    stamp = (first / "manifest.json").stat().st_mtime_ns
    assert prepare_cached([path], "byte", cache, progress=False) == first
    assert (first / "manifest.json").stat().st_mtime_ns == stamp  # not prepared again
    assert prepare_cached([path], "byte", cache, max_len=4096, progress=False) != first
    write_jsonl(path, alpaca_records(rng, 11))
    changed = prepare_cached([path], "byte", cache, progress=False)
    assert changed != first and len(open_shards(changed)) == 11
