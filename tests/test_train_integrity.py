"""`fastsft train` on corrupt or useless data (issue 14 item 3): exit code 1 and one line naming the file, before the
first step; the `data.verify` switch is the documented way to skip the full read."""

import numpy as np
from helpers import tiny_config, write_tiny_data

from fastsft.data.prepare import prepare_dataset
from fastsft.data.shards import HEADER_SIZE, ShardWriter, open_shards
from fastsft.train.run import train


def flip_token_low_byte(shard_path, token_index: int) -> None:
    shard = open_shards(shard_path)
    tokens_start = HEADER_SIZE + 8 * (len(shard) + 1)
    with open(shard_path, "r+b") as f:
        f.seek(tokens_start + 2 * token_index)
        byte = f.read(1)[0]
        f.seek(tokens_start + 2 * token_index)
        f.write(bytes([byte ^ 0x01]))  # a wrong but valid id: only the checksum can see it


def test_corrupt_shard_stops_train_before_the_first_step(tmp_path, capsys):
    data_dir = tmp_path / "data"
    train_file, _ = write_tiny_data(data_dir)
    prepared = tmp_path / "prepared"
    manifest = prepare_dataset([train_file], "byte", prepared, progress=False)
    shard = prepared / manifest["splits"]["train"]["files"][0]
    flip_token_low_byte(shard, 7)
    out = tmp_path / "run"
    cfg = tiny_config(out, data_dir, data__train_files=f'["{prepared}"]', data__val_files="[]")
    assert train(cfg) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(shard) in err[0] and "corrupt payload" in err[0] and "Traceback" not in err[0]
    assert not list(out.glob("checkpoint-*"))  # nothing trained

    cfg = tiny_config(tmp_path / "run2", data_dir, data__train_files=f'["{prepared}"]', data__val_files="[]",
                      data__verify="false")
    assert train(cfg) == 0  # the switch skips the full read (header checks only): this flip then goes unseen


def test_dataset_without_supervised_tokens_is_refused(tmp_path, capsys):
    shards = tmp_path / "shards"
    rng = np.random.default_rng()
    with ShardWriter(shards, 259) as writer:
        for _ in range(40):
            n = int(rng.integers(5, 30))
            writer.add(rng.integers(0, 259, n), np.zeros(n, bool))  # every loss mask zero
    cfg = tiny_config(tmp_path / "run", tmp_path, data__train_files=f'["{shards}"]', data__val_files="[]")
    assert train(cfg) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no supervised token" in err[0] and str(shards) in err[0]
