"""Corrupt or changing data never trains silently (issue 14 items 3, 6, 12): a shard truncated in place while the
loader reads it is a ShardError naming the file (never SIGBUS), a token id flipped past the vocabulary after the
shards were opened is caught per document before it reaches the model, a dataset with no supervised position is
refused, `load_state_dict` checks every field, and two iterators over one loader cannot hand out the same rows."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from fastsft.data.loader import PackedLoader
from fastsft.data.shards import HEADER_SIZE, ShardError, ShardWriter, open_shards

BACKENDS = ["cpp", "numpy"]


def write_shards(out_dir, n_docs=300, vocab_size=1000, mask=None, seed=None):
    rng = np.random.default_rng(seed)
    with ShardWriter(out_dir, vocab_size) as writer:
        for _ in range(n_docs):
            n = int(rng.integers(2, 40))
            writer.add(rng.integers(0, vocab_size, n), rng.random(n) < 0.5 if mask is None else mask(n))
    return out_dir / writer.close()["files"][0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("prefetch", [0, 2])
def test_truncated_in_place_is_an_error_not_sigbus(tmp_path, backend, prefetch):
    """The former memory-mapped reader died with SIGBUS (rc -7 / 135) here; run in a subprocess so a crash fails the
    test instead of killing pytest."""
    path = write_shards(tmp_path)
    script = textwrap.dedent(f"""
        import os, sys
        from fastsft.data.loader import PackedLoader
        from fastsft.data.shards import ShardError
        loader = PackedLoader({str(tmp_path)!r}, seq_len=64, max_docs=8, backend={backend!r}, prefetch={prefetch})
        batches = iter(loader)
        next(batches)
        os.truncate({str(path)!r}, {HEADER_SIZE} + 100)  # in place: same inode, the data is gone
        try:
            for _ in batches:
                pass
        except ShardError as e:
            print("caught:", e)
            sys.exit(0)
        print("no error")
        sys.exit(3)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr[-2000:])
    assert f"caught: {path}: read " in result.stdout and "truncated or replaced in place" in result.stdout


_MAPPED_TRUNCATION = """
    import os, sys
    import numpy as np
    from fastsft import _C
    from fastsft.data import packing_ref
    from fastsft.data.shards import open_shards
    dataset = open_shards({tmp!r})
    corpus = _C.Corpus(list(dataset.shards))  # mmap=True: the loader's reader
    assert corpus.mmap
    eff_len = np.asarray(dataset.lengths, np.int64)
    out = packing_ref.allocate_batch_buffers(1, 64, 8, 64)
    args = [out[k] for k in ("input_ids", "position_ids", "labels", "cu_seqlens", "loss_positions", "counts")]
    def assemble(doc):
        _C.assemble_rows(corpus, np.array([0, 1], np.int64), np.array([doc], np.int64), eff_len,
                         np.zeros(1, np.int64), *args)
    assemble(len(dataset) - 1)  # installs the guard; the file is whole
    os.truncate({path!r}, {keep})
    try:
        assemble({doc})
    except _C.ShardReadError as e:
        print("caught:", e)
    {after}
"""


@pytest.mark.parametrize("where", ["fault", "last_page"])
def test_mapped_read_of_truncated_shard_is_an_error(tmp_path, where):
    """The C++ loader reads a memory map under a SIGBUS guard (csrc/assembly.cpp). A document past the truncated
    file's last page faults: the guard turns the fault into a ShardReadError naming the file. A document in the last,
    partly kept page reads zeros without a fault: the fstat after the copy reports it. Python's faulthandler is on
    (as under pytest), so the guard runs in front of another SIGBUS handler."""
    path = write_shards(tmp_path, n_docs=3000)  # ~60k tokens: tokens and mask span many pages
    dataset = open_shards(tmp_path)
    if where == "fault":  # keep one page; the last document lies many pages further
        keep, how = 4096, "a fault in its memory map"
    else:  # cut the last byte (the last document's last mask byte): a mapped page, bytes past the end read as 0
        keep, how = path.stat().st_size - 1, "file size checked after the copy"
        assert keep % 4096 != 0
    doc = len(dataset) - 1
    script = textwrap.dedent(_MAPPED_TRUNCATION).format(tmp=str(tmp_path), path=str(path), keep=keep, doc=doc,
                                                          after="print('alive')")
    result = subprocess.run([sys.executable, "-X", "faulthandler", "-c", script], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr[-2000:])
    assert f"caught: {path}: read {keep} of " in result.stdout and how in result.stdout, result.stdout
    assert "truncated or replaced in place" in result.stdout and "alive" in result.stdout
    assert "Fatal Python error" not in result.stderr  # the guard handled it; faulthandler never saw it


@pytest.mark.parametrize("faulthandler", [False, True])
def test_sigbus_outside_the_guard_still_kills(tmp_path, faulthandler):
    """The guard claims only faults inside a shard map while this thread assembles: any other SIGBUS (here a Python
    mmap of the truncated file) reaches the handler installed before it (faulthandler) or the default action."""
    path = write_shards(tmp_path, n_docs=3000)
    other = tmp_path / "other.bin"
    other.write_bytes(bytes(3 * 4096))
    after = ("import mmap; m = mmap.mmap(os.open({p!r}, os.O_RDONLY), 0, prot=mmap.PROT_READ); "
             "os.truncate({p!r}, 10); print(m[9000]); print('survived')").format(p=str(other))
    script = textwrap.dedent(_MAPPED_TRUNCATION).format(tmp=str(tmp_path), path=str(path), keep=4096,
                                                          doc=len(open_shards(tmp_path)) - 1, after=after)
    flags = ["-X", "faulthandler"] if faulthandler else []
    result = subprocess.run([sys.executable, *flags, "-c", script], capture_output=True, text=True, timeout=120)
    assert "caught:" in result.stdout  # the guarded fault was an error first
    assert result.returncode == -7 and "survived" not in result.stdout, (result.returncode, result.stdout)
    assert ("Fatal Python error: Bus error" in result.stderr) == faulthandler, result.stderr[-2000:]


def test_truncated_before_planning_is_an_error(tmp_path):
    """The length scan (loss positions per document) reads the masks too: same clear error."""
    path = write_shards(tmp_path)
    dataset = open_shards(tmp_path)
    with open(path, "r+b") as f:
        f.truncate(HEADER_SIZE + 100)
    for backend in BACKENDS:
        with pytest.raises(ShardError, match="truncated or replaced in place"):
            PackedLoader(dataset, seq_len=64, max_docs=8, backend=backend, prefetch=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_flipped_after_open_is_caught_per_document(tmp_path, backend):
    """Verification at open saw a clean file; a byte flipped afterwards (a bad disk, another process) must not send
    an id past the embedding table to the model: each document is checked as it is assembled."""
    path = write_shards(tmp_path, vocab_size=1000)
    dataset = open_shards(tmp_path, vocab_size=1000)
    loader = PackedLoader(dataset, seq_len=64, max_docs=8, backend=backend, prefetch=0)
    num_docs = len(dataset)
    tokens_start = HEADER_SIZE + 8 * (num_docs + 1)
    with open(path, "r+b") as f:  # the high byte of token 5: id += 0x8000, far outside a vocabulary of 1000
        f.seek(tokens_start + 2 * 5 + 1)
        byte = f.read(1)[0]
        f.seek(tokens_start + 2 * 5 + 1)
        f.write(bytes([byte | 0x80]))
    doc = int(np.searchsorted(dataset.shards[0].offsets, 5, side="right")) - 1  # the document holding token 5
    with pytest.raises(ShardError, match=rf"document {doc} holds token id \d+, outside the vocabulary of 1000") as info:
        for _ in loader:
            pass
    assert str(path) in str(info.value)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["all_zero", "first_token_only"])
def test_no_supervised_token_is_refused(tmp_path, backend, kind):
    """All-zero masks trained 40 steps at loss 0.0 and exited 0. A mask set only on each document's first token has
    loss tokens in the header but no supervised position (nothing predicts the first token): refused as well."""
    mask = {"all_zero": lambda n: np.zeros(n, bool), "first_token_only": lambda n: np.arange(n) == 0}[kind]
    write_shards(tmp_path, n_docs=50, mask=mask)
    with pytest.raises(ValueError, match="no supervised token"):
        PackedLoader(tmp_path, seq_len=64, max_docs=8, backend=backend, prefetch=0)


def test_one_supervised_token_is_enough(tmp_path):
    write_shards(tmp_path, n_docs=50, mask=lambda n: np.arange(n) == n - 1)
    loader = PackedLoader(tmp_path, seq_len=64, max_docs=8, prefetch=0)
    assert sum(b.num_loss_tokens for b in loader) == 50


@pytest.fixture
def loader(tmp_path):
    write_shards(tmp_path, seed=0)
    return PackedLoader(tmp_path, seq_len=64, max_docs=8, prefetch=0)


@pytest.mark.parametrize("field, value", [
    ("epoch", -3), ("epoch", 2**70), ("epoch", "3"), ("epoch", 1.0), ("epoch", True), ("epoch", None),
    ("index", -1), ("index", 2**70), ("index", "0"), ("index", 2.5), ("version", 7), ("fingerprint", 12345),
])
def test_load_state_dict_checks_types_and_ranges(loader, field, value):
    good = loader.state_dict()
    bad = dict(good, **{field: value})
    with pytest.raises(ValueError, match=field if field != "version" else "state version"):
        loader.load_state_dict(bad)
    assert (loader.epoch, loader.state_dict()["index"]) == (good["epoch"], good["index"])  # nothing changed
    assert next(iter(loader)).input_ids.shape == (64,)


def test_load_state_dict_round_trip_still_works(loader):
    it = iter(loader)
    next(it), next(it)
    state = loader.state_dict()
    expected = next(it).input_ids.clone()
    it.close()
    loader.load_state_dict(state)
    assert (next(iter(loader)).input_ids == expected).all()


def test_two_iterators_cannot_hand_out_the_same_row(loader):
    first, second = iter(loader), iter(loader)
    row0 = next(first).input_ids.clone()
    with pytest.raises(RuntimeError, match="another iteration over this loader is in progress"):
        next(second)
    with pytest.raises(RuntimeError, match="another iteration"):
        iter(loader)
    with pytest.raises(RuntimeError, match="another iteration"):
        loader.load_state_dict(loader.state_dict())
    row1 = next(first).input_ids.clone()
    assert not (row0 == row1).all()
    first.close()  # closing the first iterator frees the loader: the next one continues after row1
    rest = [b.input_ids.clone() for b in loader]
    assert len(rest) == len(loader) - 2
    assert not any((r == row0).all() or (r == row1).all() for r in rest)
