"""PackedLoader(virtual_tokens=n): room for prompt-tuning slots in front of every document (fastsft/data/
virtual_tokens.py), against the batch contract plus the slot rule written out token by token here."""

import numpy as np
import pytest
import torch

from fastsft.data.batch import IGNORE_INDEX, LOSS_POSITION_FILL, PAD_ID
from fastsft.data.loader import PackedLoader
from fastsft.data.shards import ShardWriter, open_shards

SEQ_LEN = 64


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    rng = np.random.default_rng(3)
    out = tmp_path_factory.mktemp("shards")
    with ShardWriter(out, 500, max_tokens_per_shard=2000) as writer:
        for n in np.clip(rng.lognormal(np.log(14), 0.9, 150).astype(int), 1, 90):  # a few longer than a row
            writer.add(rng.integers(0, 500, n), rng.random(n) < 0.6)
    return open_shards(out)


def expected_row(dataset, docs, seq_len, max_docs, n, bucket):
    ids, positions, labels, cu, loss_pos = [], [], [], [0], []
    for doc in docs:
        tokens, mask = dataset[doc]
        length = min(len(tokens), seq_len - n)
        ids += [PAD_ID] * n
        positions += list(range(n))
        labels += [IGNORE_INDEX] * n
        for t in range(length):
            if t + 1 < length and mask[t + 1]:
                loss_pos.append(len(ids))
                labels.append(int(tokens[t + 1]))
            else:
                labels.append(IGNORE_INDEX)
            ids.append(int(tokens[t]))
            positions.append(n + t)
        cu.append(len(ids))
    pad = seq_len - len(ids)
    return dict(input_ids=ids + [PAD_ID] * pad, position_ids=positions + list(range(pad)),
                labels=labels + [IGNORE_INDEX] * pad, cu_seqlens=cu + [seq_len] * (max_docs + 2 - len(cu)),
                loss_positions=loss_pos + [LOSS_POSITION_FILL] * (bucket - len(loss_pos)))


@pytest.mark.parametrize("backend", ["cpp", "numpy"])
@pytest.mark.parametrize("n", [1, 5])
def test_rows_reserve_slots_before_every_document(dataset, backend, n):
    loader = PackedLoader(dataset, seq_len=SEQ_LEN, max_docs=6, seed=1, prefetch=0, backend=backend,
                          virtual_tokens=n, bound_attention=False)  # compared with the full-length cu_seqlens
    row_ptr, row_docs = loader.plan(0)
    seen = []
    for r, batch in enumerate(loader):
        docs = row_docs[row_ptr[r]:row_ptr[r + 1]].tolist()
        seen += docs
        want = expected_row(dataset, docs, SEQ_LEN, 6, n, SEQ_LEN)
        for name, value in want.items():
            assert getattr(batch, name).tolist() == value, (r, name)
        assert batch.virtual_tokens == n and batch.num_docs == len(docs)
        assert batch.num_loss_tokens == int((batch.labels != IGNORE_INDEX).sum())
    assert sorted(seen) == list(range(len(dataset)))  # every document once, none dropped
    assert loader.stats["packing_efficiency"] > 0.8


def test_resume_refuses_another_slot_count(dataset):
    state = PackedLoader(dataset, seq_len=SEQ_LEN, max_docs=6, prefetch=0, virtual_tokens=4).state_dict()
    with pytest.raises(ValueError, match="virtual_tokens"):
        PackedLoader(dataset, seq_len=SEQ_LEN, max_docs=6, prefetch=0, virtual_tokens=3).load_state_dict(state)
    with pytest.raises(ValueError, match="virtual_tokens must be an int"):
        PackedLoader(dataset, seq_len=SEQ_LEN, max_docs=6, prefetch=0, virtual_tokens=SEQ_LEN)


def test_model_refuses_rows_without_the_adapters_slots(tmp_path):
    from fastsft.adapters.prompt import PromptConfig, apply_prompt_adapter
    from fastsft.model import ModelConfig, Transformer

    config = ModelConfig(vocab_size=500, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=2)
    model = Transformer.from_config(config, seed=0)
    apply_prompt_adapter(model, PromptConfig(method="prompt_tuning", num_virtual_tokens=4))
    batch = next(iter(PackedLoader(tmp_path_dataset(tmp_path), seq_len=SEQ_LEN, max_docs=4, prefetch=0)))
    with pytest.raises(ValueError, match=r"virtual_tokens=4"):
        model.loss(batch)
    torch.testing.assert_close(model.prompt_adapter.embedding.weight.std(), torch.tensor(1.0), atol=0.3, rtol=0)


def tmp_path_dataset(path):
    with ShardWriter(path / "d", 500) as writer:
        writer.add(np.arange(1, 30), np.ones(29, bool))
    return open_shards(path / "d")
