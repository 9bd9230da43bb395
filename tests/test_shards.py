"""Shard format: round trip (uint16 and uint32 token ids), and every kind of broken file gives a ShardError that names
the file (empty, truncated, wrong magic, wrong version, corrupt header, corrupt payload, corrupt offsets)."""

import json
import struct
import zlib

import numpy as np
import pytest

from fastsft.data.shards import (
    FORMAT_VERSION,
    HEADER_CRC_SPAN,
    HEADER_FORMAT,
    HEADER_SIZE,
    ShardError,
    ShardWriter,
    open_shards,
)


def random_documents(rng, n_docs, vocab_size, max_len=40):
    docs = []
    for _ in range(n_docs):
        n = int(rng.integers(1, max_len + 1))
        docs.append((rng.integers(0, vocab_size, n), rng.random(n) < 0.5))
    return docs


def write_documents(out_dir, docs, vocab_size, **kw):
    with ShardWriter(out_dir, vocab_size, **kw) as writer:
        for tokens, mask in docs:
            writer.add(tokens, mask)
    return writer.close()


@pytest.mark.parametrize("vocab_size, dtype", [(1000, np.uint16), (65536, np.uint16), (200_000, np.uint32)])
def test_round_trip(tmp_path, vocab_size, dtype):
    rng = np.random.default_rng(vocab_size)
    docs = random_documents(rng, 57, vocab_size)
    docs[3] = (np.array([vocab_size - 1]), np.array([True]))  # the largest id must survive the narrow dtype
    summary = write_documents(tmp_path, docs, vocab_size, max_tokens_per_shard=300)
    assert len(summary["files"]) > 1  # the token cap split the stream into several shards
    assert summary["documents"] == len(docs)
    assert summary["tokens"] == sum(t.size for t, _ in docs)
    assert summary["loss_tokens"] == sum(int(m.sum()) for _, m in docs)
    assert summary["max_token_id"] == max(int(t.max()) for t, _ in docs)

    ds = open_shards(tmp_path, verify=True, vocab_size=vocab_size)
    assert len(ds) == len(docs)
    assert ds.num_tokens == summary["tokens"] and ds.num_loss_tokens == summary["loss_tokens"]
    assert ds.max_token_id == summary["max_token_id"]
    np.testing.assert_array_equal(ds.lengths, [t.size for t, _ in docs])
    for i, (tokens, mask) in enumerate(docs):
        got_tokens, got_mask = ds[i]
        assert got_tokens.dtype == dtype and got_mask.dtype == np.bool_
        np.testing.assert_array_equal(got_tokens, tokens)
        np.testing.assert_array_equal(got_mask, mask)
    np.testing.assert_array_equal(ds[-1][0], docs[-1][0])
    with pytest.raises(IndexError):
        ds[len(docs)]


def test_open_forms_single_file_and_manifest(tmp_path):
    rng = np.random.default_rng(1)
    train = write_documents(tmp_path, random_documents(rng, 10, 500), 500, prefix="train")
    val = write_documents(tmp_path, random_documents(rng, 4, 500), 500, prefix="val")
    manifest = {"format_version": 1, "splits": {"train": {"files": train["files"]}, "val": {"files": val["files"]}}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert len(open_shards(tmp_path)) == 10
    assert len(open_shards(tmp_path, split="val")) == 4
    assert len(open_shards(tmp_path / val["files"][0])) == 4
    with pytest.raises(ShardError, match="no split 'test'"):
        open_shards(tmp_path, split="test")


def test_no_temporary_files_left(tmp_path):
    write_documents(tmp_path, random_documents(np.random.default_rng(2), 30, 100), 100, max_tokens_per_shard=50)
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".shard"] * len(list(tmp_path.iterdir()))


def test_exception_in_with_block_leaves_no_partial_shard(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path, 100) as writer:
            writer.add(np.arange(5), np.ones(5, bool))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_writer_rejects_bad_documents(tmp_path):
    writer = ShardWriter(tmp_path, 100)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        writer.add(np.array([1, 100]), np.array([1, 1]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        writer.add(np.array([-1, 3]), np.array([1, 1]))
    with pytest.raises(ValueError, match="3 entries but loss_mask has 2"):
        writer.add(np.array([1, 2, 3]), np.array([1, 1]))
    with pytest.raises(ValueError, match="empty document"):
        writer.add(np.array([], np.int64), np.array([], bool))
    with pytest.raises(ValueError, match="loss_mask must be bool"):
        writer.add(np.array([1, 2]), np.array([0, 2]))
    writer.abort()


# ------------------------------------------------------------------------------------------------ broken files


@pytest.fixture
def one_shard(tmp_path):
    rng = np.random.default_rng(3)
    summary = write_documents(tmp_path, random_documents(rng, 20, 300), 300)
    return tmp_path / summary["files"][0]


def rewrite_header(path, **changes):
    """Rewrite header fields (by name) and recompute the header crc, so only the changed field is wrong."""
    names = ["magic", "version", "itemsize", "docs", "tokens", "loss_tokens", "max_id", "file_size", "crc", "hcrc"]
    raw = bytearray(path.read_bytes())
    fields = dict(zip(names, struct.unpack(HEADER_FORMAT, bytes(raw[:HEADER_SIZE])), strict=True))
    fields.update(changes)
    head = struct.pack(HEADER_FORMAT, *fields.values())
    head = head[:HEADER_CRC_SPAN] + struct.pack("<I", zlib.crc32(head[:HEADER_CRC_SPAN]))
    raw[:HEADER_SIZE] = head
    path.write_bytes(bytes(raw))


def expect_error(path, match, **kw):
    with pytest.raises(ShardError, match=match) as info:
        open_shards(path, **kw)
    assert str(path) in str(info.value)


def test_empty_file(tmp_path):
    path = tmp_path / "x.shard"
    path.write_bytes(b"")
    expect_error(path, "empty file")


def test_truncated_header_and_payload(one_shard):
    data = one_shard.read_bytes()
    one_shard.write_bytes(data[:-7])
    expect_error(one_shard, "truncated")
    one_shard.write_bytes(data[:30])
    expect_error(one_shard, "truncated")


def test_wrong_magic(one_shard):
    data = bytearray(one_shard.read_bytes())
    data[:8] = b"GGUF\0\0\0\0"
    one_shard.write_bytes(bytes(data))
    expect_error(one_shard, "not a fastsft shard")


def test_wrong_version(one_shard):
    rewrite_header(one_shard, version=FORMAT_VERSION + 1)
    expect_error(one_shard, "version")


def test_corrupt_header_byte(one_shard):
    data = bytearray(one_shard.read_bytes())
    data[20] ^= 0x40  # inside the document count
    one_shard.write_bytes(bytes(data))
    expect_error(one_shard, "header checksum")


def test_header_counts_disagree_with_size(one_shard):
    rewrite_header(one_shard, tokens=10**6)
    expect_error(one_shard, "header says|counts imply")


def test_corrupt_offsets_index_caught_without_verify(one_shard):
    data = bytearray(one_shard.read_bytes())
    struct.pack_into("<q", data, HEADER_SIZE + 8 * 3, 10**9)  # offset of document 3 points far past the tokens
    one_shard.write_bytes(bytes(data))
    expect_error(one_shard, "offsets index")


def test_flipped_payload_byte_caught_by_default(one_shard):
    data = bytearray(one_shard.read_bytes())
    data[len(data) - 5] ^= 0x01  # a loss-mask byte: structurally fine, only the checksum can see it
    one_shard.write_bytes(bytes(data))
    open_shards(one_shard, verify=False)  # the header-only open accepts it...
    expect_error(one_shard, "corrupt payload")  # ...the default open verifies the payload


@pytest.mark.parametrize("where", ["token_high_byte", "token_low_byte", "mask", "offset_low_byte"])
def test_every_single_byte_flip_is_caught_by_default(tmp_path, where):
    """The fault campaign's cases (issue 14 item 3): a flipped token byte (high: an id past the vocabulary; low: a
    wrong but valid id), a flipped mask byte, a flipped offset byte, header untouched. All trained before."""
    rng = np.random.default_rng()
    docs = random_documents(rng, 20, 1000)
    path = tmp_path / write_documents(tmp_path, docs, 1000)["files"][0]
    num_docs, num_tokens = len(docs), sum(t.size for t, _ in docs)
    tokens_start = HEADER_SIZE + 8 * (num_docs + 1)
    k = int(rng.integers(0, num_tokens))
    at = {
        "token_high_byte": (tokens_start + 2 * k + 1, 0x80),
        "token_low_byte": (tokens_start + 2 * k, 0x01),
        "mask": (path.stat().st_size - num_tokens + k, 0x01),
        "offset_low_byte": (HEADER_SIZE + 8 * int(rng.integers(1, num_docs)), 0x01),
    }[where]
    data = bytearray(path.read_bytes())
    data[at[0]] ^= at[1]
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="corrupt") as info:
        open_shards(path, vocab_size=1000)
    assert str(path) in str(info.value)


def test_payload_disagreeing_with_a_matching_crc_header(tmp_path):
    """A writer bug (crc computed over the wrong bytes) is still caught: the header's counts are re-derived."""
    summary = write_documents(tmp_path, [(np.array([5, 7, 9]), np.array([0, 1, 1]))], 1000)
    path = tmp_path / summary["files"][0]
    data = bytearray(path.read_bytes())
    fields = list(struct.unpack(HEADER_FORMAT, bytes(data[:HEADER_SIZE])))
    data[HEADER_SIZE + 16 + 2 * 2] = 200  # token 9 -> 200 (low byte), then make the crc match the new payload
    fields[8] = zlib.crc32(bytes(data[HEADER_SIZE:]))
    head = struct.pack(HEADER_FORMAT, *fields)
    data[:HEADER_SIZE] = head[:HEADER_CRC_SPAN] + struct.pack("<I", zlib.crc32(head[:HEADER_CRC_SPAN]))
    path.write_bytes(bytes(data))
    expect_error(path, r"payload disagrees with its header \(largest token id 200 vs 9")


def test_out_of_vocab_ids(tmp_path):
    summary = write_documents(tmp_path, [(np.array([5, 999]), np.array([0, 1]))], 1000)
    path = tmp_path / summary["files"][0]
    open_shards(path, vocab_size=1000)
    expect_error(path, "token id 999 is outside", vocab_size=999)


def test_empty_dataset_and_missing_paths(tmp_path):
    with pytest.raises(ShardError, match="no manifest.json and no"):
        open_shards(tmp_path)
    with pytest.raises(ShardError, match="no such shard"):
        open_shards(tmp_path / "nope")
    (tmp_path / "manifest.json").write_text(json.dumps({"splits": {"train": {"files": []}}}))
    with pytest.raises(ShardError, match="no documents"):
        open_shards(tmp_path)
