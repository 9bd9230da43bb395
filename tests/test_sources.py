"""Input kinds of `fastsft prepare` (fastsft/data/sources.py): each gives byte-identical shards to the same records as
.jsonl; column mapping; split choice; bad rows and bad JSON located; text after a .json list; a killed prepare's
staging directory is removed by the next one; memory stays bounded on an input many times the budget.
"""

import gzip
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastsft.data.formats import DataError
from fastsft.data.prepare import prepare_dataset

REPO = Path(__file__).resolve().parents[1]


def random_text(rng, n=(1, 12)):
    words = ["alpha", "beta", "gamma", "delta", "ünïcode", "日本", "x", "naïve", "\"quoted\"", "tab\there", "new\nline"]
    return " ".join(rng.choice(words) for _ in range(rng.randint(*n)))


def conversation_records(rng, n):
    records = []
    for _ in range(n):
        messages = [{"role": "system", "content": random_text(rng)}] if rng.random() < 0.5 else []
        for _ in range(rng.randint(1, 3)):
            messages += [{"role": "user", "content": random_text(rng)},
                         {"role": "assistant", "content": random_text(rng)}]
        records.append({"messages": messages})
    return records


def alpaca_records(rng, n):
    """Optional fields present in some records only: parquet/arrow fill the others with null."""
    records = []
    for _ in range(n):
        record = {"instruction": random_text(rng), "output": random_text(rng)}
        if rng.random() < 0.5:
            record["input"] = random_text(rng)
        if rng.random() < 0.3:
            record["system"] = random_text(rng)
        records.append(record)
    return records


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def as_columns(records):
    """Records as {column: values} over every record's keys (from_pylist/from_list would keep only the first's)."""
    keys = list(dict.fromkeys(k for r in records for k in r))
    return {k: [r.get(k) for r in records] for k in keys}


def write_parquet(path, records):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table(as_columns(records))
    pq.write_table(table, path, row_group_size=7)  # several row groups
    return path


def shard_bytes(out):
    """Every shard file of a prepared dataset, by split/name, as bytes."""
    out = Path(out)
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.glob("*/*.shard"))}


def prepare(data, out, **kwargs):
    kwargs.setdefault("progress", False)
    return prepare_dataset(data, "byte", out, **kwargs)


@pytest.fixture(scope="module", params=["messages", "alpaca"])
def records(request):
    rng = random.Random(hash(request.param) % 1000)
    return (conversation_records if request.param == "messages" else alpaca_records)(rng, 60)


@pytest.fixture(scope="module")
def reference(records, tmp_path_factory):
    """The records as one .jsonl, prepared with a val split (so both splits are compared)."""
    tmp = tmp_path_factory.mktemp("reference")
    prepare(write_jsonl(tmp / "ref.jsonl", records), tmp / "out", val_fraction=0.2)
    shards = shard_bytes(tmp / "out")
    assert {name.split("/")[0] for name in shards} == {"train", "val"}
    return shards


def test_compressed_and_list_files_match_jsonl(records, reference, tmp_path):
    gz = tmp_path / "r.jsonl.gz"
    gz.write_bytes(gzip.compress(write_jsonl(tmp_path / "x.jsonl", records).read_bytes()))
    json_gz = tmp_path / "r.json.gz"
    json_gz.write_bytes(gzip.compress(json.dumps(records, indent=1).encode()))
    plain = tmp_path / "r.json"
    plain.write_text(json.dumps(records, indent=2))
    for i, path in enumerate((gz, json_gz, plain)):
        prepare(path, tmp_path / f"out{i}", val_fraction=0.2)
        assert shard_bytes(tmp_path / f"out{i}") == reference, path.name


def test_corrupt_gzip_is_located(tmp_path):
    records = [{"text": f"record {i} " * 20} for i in range(2000)]
    whole = gzip.compress(write_jsonl(tmp_path / "x.jsonl", records).read_bytes())
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=r"cut\.jsonl\.gz: the gzip stream is corrupt or truncated .* after line \d+"):
        prepare(tmp_path / "cut.jsonl.gz", tmp_path / "out")
    (tmp_path / "cut.json.gz").write_bytes(gzip.compress(json.dumps(records).encode())[:2000])
    with pytest.raises(DataError, match=r"cut\.json\.gz: the gzip stream is corrupt or truncated"):
        prepare(tmp_path / "cut.json.gz", tmp_path / "out")
    (tmp_path / "plain.jsonl.gz").write_bytes(b'{"text": "not compressed"}\n')
    with pytest.raises(DataError, match=r"plain\.jsonl\.gz: the gzip stream is corrupt or truncated"):
        prepare(tmp_path / "plain.jsonl.gz", tmp_path / "out")


def test_parquet_file_and_hub_folder_match_jsonl(records, reference, tmp_path):
    prepare(write_parquet(tmp_path / "r.parquet", records), tmp_path / "out", val_fraction=0.2)
    assert shard_bytes(tmp_path / "out") == reference

    # A hub download: train split in two shards, a test split beside it, and files that are not data.
    hub = tmp_path / "hub"
    write_parquet(hub / "data" / "train-00000-of-00002.parquet", records[:25])
    write_parquet(hub / "data" / "train-00001-of-00002.parquet", records[25:])
    write_parquet(hub / "data" / "test-00000-of-00001.parquet", records[:3])
    (hub / "README.md").write_text("# card")
    (hub / "dataset_infos.json").write_text('{"default": {}}')
    (hub / ".cache").mkdir()
    write_parquet(hub / ".cache" / "train-stale.parquet", records[:5])
    with pytest.raises(DataError, match=r"hub: the folder holds the splits test, train: choose one with --split"):
        prepare(hub, tmp_path / "nope")
    with pytest.raises(DataError, match=r"--split dev: no file of this split in the folder \(it has test, train\)"):
        prepare(hub, tmp_path / "nope", split="dev")
    with pytest.raises(ValueError, match=r"--split train: chooses a split of a folder, but --data .*r\.parquet is a file"):
        prepare([hub, tmp_path / "r.parquet"], tmp_path / "nope", split="train")
    prepare(hub, tmp_path / "hub_out", split="train", val_fraction=0.2)
    assert shard_bytes(tmp_path / "hub_out") == reference


def test_save_to_disk_folders_match_jsonl(records, reference, tmp_path):
    datasets = pytest.importorskip("datasets")
    dataset = datasets.Dataset.from_dict(as_columns(records))
    dataset.save_to_disk(str(tmp_path / "ds"), num_shards=3)  # three .arrow files, in state.json's order
    prepare(tmp_path / "ds", tmp_path / "out", val_fraction=0.2)
    assert shard_bytes(tmp_path / "out") == reference

    both = datasets.DatasetDict(train=dataset, test=dataset.select(range(4)))
    both.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"dd: a DatasetDict with splits train, test: choose one with --split"):
        prepare(tmp_path / "dd", tmp_path / "nope")
    with pytest.raises(DataError, match=r"--split validation: not a split of this DatasetDict \(it has train, test\)"):
        prepare(tmp_path / "dd", tmp_path / "nope", split="validation")
    prepare(tmp_path / "dd", tmp_path / "dd_out", split="train", val_fraction=0.2)
    assert shard_bytes(tmp_path / "dd_out") == reference


def test_arrow_files_match_jsonl(records, reference, tmp_path, monkeypatch):
    """Standalone .arrow files in both IPC formats (stream, as `datasets` writes; random-access file), with batches
    larger than the reader's, so they are sliced."""
    import pyarrow as pa

    from fastsft.data import sources

    monkeypatch.setattr(sources, "BATCH_ROWS", 10)
    table = pa.table(as_columns(records))
    for i, new in enumerate((pa.ipc.new_stream, pa.ipc.new_file)):
        path = tmp_path / f"r{i}.arrow"
        with new(str(path), table.schema) as writer:
            writer.write_table(table, max_chunksize=25)
        prepare(path, tmp_path / f"out{i}", val_fraction=0.2)
        assert shard_bytes(tmp_path / f"out{i}") == reference, new.__name__
    (tmp_path / "junk.arrow").write_bytes(b"ARROW1 but not really")
    with pytest.raises(DataError, match=r"junk\.arrow: not a readable Arrow file"):
        prepare(tmp_path / "junk.arrow", tmp_path / "junk_out")


def test_column_mapping(tmp_path):
    rng = random.Random(5)
    conversations = conversation_records(rng, 20)
    prompts = [{"prompt": random_text(rng), "completion": random_text(rng)} for _ in range(20)]
    prepare([write_jsonl(tmp_path / "c.jsonl", conversations), write_jsonl(tmp_path / "p.jsonl", prompts)],
            tmp_path / "ref")
    # The same records under other column names; "conversations" holds role/content turns (not ShareGPT's from/value).
    renamed_conv = [{"conversations": r["messages"], "id": i} for i, r in enumerate(conversations)]
    renamed_prompts = [{"question": r["prompt"], "answer": r["completion"]} for r in prompts]
    write_parquet(tmp_path / "c.parquet", renamed_conv)
    write_jsonl(tmp_path / "p2.jsonl", renamed_prompts)
    prepare([tmp_path / "c.parquet"], tmp_path / "c_out", columns="messages=conversations")
    prepare([tmp_path / "p2.jsonl"], tmp_path / "p_out", columns=["prompt=question", "completion=answer"])
    reference = shard_bytes(tmp_path / "ref")
    from fastsft.data.shards import open_shards

    expected = [d for d in open_shards(tmp_path / "ref", "train")]
    got = [d for d in open_shards(tmp_path / "c_out", "train")] + [d for d in open_shards(tmp_path / "p_out", "train")]
    assert len(expected) == len(got) == 40
    for (e_ids, e_mask), (g_ids, g_mask) in zip(expected, got, strict=True):
        assert e_ids.tolist() == g_ids.tolist() and e_mask.tolist() == g_mask.tolist()
    assert reference  # the two-file reference is itself non-empty

    # Errors name the user's column, not the format field it was mapped to.
    renamed_conv[4]["conversations"][1]["role"] = "bard"
    write_parquet(tmp_path / "bad.parquet", renamed_conv)
    with pytest.raises(DataError, match=r"bad\.parquet: record 4: field 'conversations\[1\]\.role': unknown role"):
        prepare(tmp_path / "bad.parquet", tmp_path / "bad_out", columns="messages=conversations")
    del renamed_prompts[2]["answer"]
    write_jsonl(tmp_path / "p3.jsonl", renamed_prompts)
    with pytest.raises(DataError, match=r"p3\.jsonl:3: field 'answer': missing"):
        prepare(tmp_path / "p3.jsonl", tmp_path / "bad_out", columns="prompt=question,completion=answer")
    for spec, message in [("message=conversations", "'message' is not a field of any format"),
                          ("messages", "expected FIELD=COLUMN"),
                          ("text=a,text=b", "field 'text' is mapped twice")]:
        with pytest.raises(ValueError, match=message):
            prepare(tmp_path / "p2.jsonl", tmp_path / "bad_out", columns=spec)


def test_bad_rows_located_in_parquet_and_arrow(tmp_path):
    rng = random.Random(7)
    records = alpaca_records(rng, 30)
    records[11]["output"] = None
    write_parquet(tmp_path / "a.parquet", records)
    problem = "field 'output': must be a string, got null"
    with pytest.raises(DataError, match=rf"a\.parquet: record 11: {problem}"):
        prepare(tmp_path / "a.parquet", tmp_path / "out")
    manifest = prepare(tmp_path / "a.parquet", tmp_path / "out", skip_bad=True, workers=2)
    assert manifest["records"]["read"] == 30 and manifest["records"]["skipped_bad"] == 1
    assert manifest["records"]["bad_examples"] == [f"{tmp_path / 'a.parquet'}: record 11: {problem}"]
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict(as_columns(records)).save_to_disk(str(tmp_path / "ds"), num_shards=2)
    with pytest.raises(DataError, match=rf"ds/data-00000-of-00002\.arrow: record 11: {problem}"):
        prepare(tmp_path / "ds", tmp_path / "out_ds")
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"junk\.parquet: not a readable parquet file"):
        prepare(tmp_path / "junk.parquet", tmp_path / "out2")


def test_cli_split_and_columns(tmp_path, capsys):
    from fastsft.cli import main

    rng = random.Random(3)
    records = [{"question": random_text(rng), "answer": random_text(rng)} for _ in range(10)]
    write_parquet(tmp_path / "hub" / "train" / "0000.parquet", records)
    write_parquet(tmp_path / "hub" / "validation" / "0000.parquet", records[:2])
    argv = ["prepare", "--data", str(tmp_path / "hub"), "--tokenizer", "byte", "--out", str(tmp_path / "out"),
            "--no-progress", "--columns", "prompt=question,completion=answer"]
    assert main(argv) == 1
    assert "choose one with --split" in capsys.readouterr().err
    assert main(argv + ["--split", "train"]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["documents"] == 10
    assert manifest["options"]["columns"] == {"prompt": "question", "completion": "answer"}
    assert [Path(f["path"]).name for f in manifest["data_files"]] == ["0000.parquet"]


# ---------------------------------------------------------------------------------------------- JSON edge cases


DEEP = "[" * 100_000 + "]" * 100_000
HUGE_INT = "1" + "0" * 5000
BAD_VALUES = {
    "surrogate": ('"a\\ud800b"', "field 'text': holds a lone surrogate"),
    "deep": (DEEP, "nested too deeply"),
    "huge_int": (HUGE_INT, "an integer with more than 4300 digits"),
}


@pytest.mark.parametrize("kind", list(BAD_VALUES))
def test_bad_json_values_are_located(kind, tmp_path, capsys):
    from fastsft.cli import main

    value, message = BAD_VALUES[kind]
    field = "text" if kind == "surrogate" else "extra"
    lines = ['{"text": "fine"}', '{"text": "also fine"}', f'{{"text": "x", "{field}": {value}}}', '{"text": "ok"}']
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"d\.jsonl:3: .*{message}"):
        prepare(path, tmp_path / "out")
    for workers in (1, 2):
        manifest = prepare(path, tmp_path / f"skip{workers}", skip_bad=True, workers=workers)
        assert manifest["records"]["skipped_bad"] == 1 and manifest["splits"]["train"]["documents"] == 3
        assert manifest["records"]["bad_examples"][0].startswith(f"{path}:3: ")
        assert message in manifest["records"]["bad_examples"][0]
    out = tmp_path / "cli"
    assert main(["prepare", "--data", str(path), "--tokenizer", "byte", "--out", str(out), "--no-progress",
                 "--workers", "2"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{path}:3: " in err and message in err

    # In a .json list the record is located by index and line, and reading stops there (the rest cannot be found).
    listed = tmp_path / "d.json"
    listed.write_text("[\n" + ",\n".join(lines) + "\n]\n")
    with pytest.raises(DataError, match=rf"d\.json: record 2, line 4: .*{message}"):
        prepare(listed, tmp_path / "out", skip_bad=(kind != "surrogate"))


def test_text_after_json_list_is_an_error(tmp_path):
    path = tmp_path / "t.json"
    path.write_text('[{"text": "a"},\n {"text": "b"}]\n{"text": "lost"}\n')
    with pytest.raises(DataError, match=r"t\.json:3: text after the list's closing '\]'"):
        prepare(path, tmp_path / "out")
    path.write_text('[{"text": "a"}, {"text": "b"}]  \n\n')
    assert prepare(path, tmp_path / "out")["records"]["read"] == 2
    path.write_text("[]x")
    with pytest.raises(DataError, match=r"t\.json:1: text after"):
        prepare(path, tmp_path / "out2")


def test_json_list_records_across_read_buffers(tmp_path, monkeypatch):
    """The .json walker reads in steps: records cut by a step's end (inside strings, numbers, escapes, literals)
    are read whole, with their line numbers."""
    from fastsft.data import sources

    monkeypatch.setattr(sources, "READ_BYTES", 7)
    rng = random.Random(11)
    records = [{"text": random_text(rng) + "\\u00e9", "n": rng.randint(0, 10**12), "f": rng.random(),
                "b": rng.random() < 0.5, "z": None} for _ in range(40)]
    path = tmp_path / "s.json"
    path.write_text("[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]")
    got = list(sources.iter_raw_records(path))
    assert [obj for _, _, obj, _ in got] == records
    assert [line for line, _, _, _ in got] == list(range(2, 42))
    assert sum(n for *_, n in got) == path.stat().st_size
    path.write_text("[\n" + ",\n".join(json.dumps(r) for r in records[:5]) + ",\n{\"text\": oops}\n]")
    with pytest.raises(DataError, match=r"s\.json: record 5, line 7: malformed JSON"):
        list(sources.iter_raw_records(path))


# ---------------------------------------------------------------------------------------------- staging, memory


def _write_big_jsonl(path, megabytes, seed=0):
    """About `megabytes` MB of text records, written in blocks (the test process stays small)."""
    rng = random.Random(seed)
    words = [("".join(rng.choice("abcdefghij klmnop") for _ in range(rng.randint(3, 12)))) for _ in range(500)]
    block = "".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(150))}) + "\n" for _ in range(500))
    with open(path, "w") as f:
        for _ in range(max(1, megabytes * 2**20 // len(block))):
            f.write(block)
    return path


def test_killed_prepare_staging_is_removed_by_the_next(tmp_path):
    data = _write_big_jsonl(tmp_path / "big.jsonl", 40)
    out = tmp_path / "out"
    code = ("import sys; from fastsft.data.prepare import prepare_dataset; "
            "prepare_dataset(sys.argv[1], 'byte', sys.argv[2], progress=False)")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-c", code, str(data), str(out)], env=env)
    try:
        deadline = time.time() + 120
        while not list(tmp_path.glob(".out.staging-*/train/.*.tmp")):  # writing shards now
            assert child.poll() is None and time.time() < deadline, "prepare ended before it could be killed"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
    staged = list(tmp_path.glob(".out.staging-*"))
    assert len(staged) == 1 and not out.exists()
    # A staging directory of a live process (here: this one) is left alone.
    alive = tmp_path / f".out.staging-{os.getpid()}-0123abcd"
    alive.mkdir()
    small = write_jsonl(tmp_path / "small.jsonl", [{"text": "hello"}])
    prepare(small, out)
    assert not staged[0].exists() and alive.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["big.jsonl", "small.jsonl", "out", alive.name])


def _peak_rss_mb(data, out):
    """Peak RSS (MB) of a fresh process that prepares `data` (workers=1)."""
    code = ("import resource, sys; from fastsft.data.prepare import prepare_dataset; "
            "prepare_dataset(sys.argv[1], 'byte', sys.argv[2], progress=False); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code, str(data), str(out)], env=env, capture_output=True,
                            text=True, check=True)
    return int(result.stdout.split()[-1]) / 1024


def _as_json_list(jsonl, path):
    with open(jsonl) as src, open(path, "w") as dst:
        dst.write("[\n")
        for i, line in enumerate(src):
            dst.write(("," if i else "") + line)
        dst.write("]\n")
    return path


def _peak_growth(tmp_path, suffix, small_mb, big_mb):
    small = _write_big_jsonl(tmp_path / "small.jsonl", small_mb)
    big = _write_big_jsonl(tmp_path / "big.jsonl", big_mb, seed=1)
    if suffix == ".json":
        small, big = _as_json_list(small, tmp_path / "small.json"), _as_json_list(big, tmp_path / "big.json")
    assert big.stat().st_size > 0.9 * big_mb * 2**20
    base = _peak_rss_mb(small, tmp_path / "out_small")
    peak = _peak_rss_mb(big, tmp_path / "out_big")
    return base, peak


def test_peak_memory_does_not_grow_with_input(tmp_path):
    """A .json list of 40 MB against one of 8 MB: peak RSS grows by less than 32 MB (fixed-size buffers fill up to
    about 20 MB; reading the whole file, as .json lists once were, adds at least twice the 32 MB difference)."""
    base, peak = _peak_growth(tmp_path, ".json", 8, 40)
    assert peak - base < 32, f"peak RSS {peak:.0f} MB on 40 MB vs {base:.0f} MB on 8 MB"


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_peak_memory_flat_from_24_to_200_mb(suffix, tmp_path):
    """Past the fixed buffers, an input 8x larger (200 MB, 200 times a 1 MB budget) adds under 16 MB of peak RSS."""
    base, peak = _peak_growth(tmp_path, suffix, 24, 200)
    assert peak - base < 16, f"peak RSS {peak:.0f} MB on 200 MB vs {base:.0f} MB on 24 MB"


def test_train_reads_record_folders(tmp_path):
    """`fastsft train --data FOLDER`: a folder of records (here a hub-style parquet folder) is prepared like files,
    giving the same shards as its records as .jsonl; a prepared directory is still used as it is."""
    from fastsft.data.tokenizer import load_tokenizer
    from fastsft.train.build import prepare_data
    from fastsft.train.config import load_config
    from fastsft.train.distributed import DistInfo

    records = conversation_records(random.Random(2), 30)
    write_parquet(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet", records)
    prepare(write_jsonl(tmp_path / "r.jsonl", records), tmp_path / "ref")
    cfg = load_config(overrides=[f"data.train_files=[{tmp_path / 'hub'}]", f"output_dir={tmp_path / 'run'}"])
    (train_dir, split), val = prepare_data(cfg, load_tokenizer("byte"), DistInfo(), lambda _: None)
    assert split == "train" and val is None and train_dir != tmp_path / "hub"
    assert shard_bytes(train_dir) == shard_bytes(tmp_path / "ref")
    cfg = load_config(overrides=[f"data.train_files=[{tmp_path / 'ref'}]", f"output_dir={tmp_path / 'run'}"])
    assert prepare_data(cfg, load_tokenizer("byte"), DistInfo(), lambda _: None)[0] == (tmp_path / "ref", "train")
