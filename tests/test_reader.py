"""Readers: whole-chunk streaming with seeded shuffling, random access, in-memory loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from conftest import synthetic_store
from mimprobe.cache_store import TokenStore
from mimprobe.cache_store.reader import ChunkShuffleReader, InMemoryReader, load_rows, read_rows


@pytest.fixture(params=[".zarr", ".h5"])
def store(tmp_path, request):
    n, t, d = 203, 5, 8
    tok = torch.arange(n).float().view(n, 1, 1).expand(n, t, d).clone()  # token value = row number
    labels = np.arange(n) % 7  # class-sorted is avoided by construction: labels cycle
    return synthetic_store(tmp_path / f"s{request.param}", tok, labels, chunk_rows=16, dtype="float32")


def _epoch(reader, workers=0):
    batches = list(DataLoader(reader, batch_size=None, num_workers=workers))
    rows = torch.cat([b.rows for b in batches]).numpy()
    return batches, rows


@pytest.mark.parametrize("workers", [0, 2])
def test_every_selected_row_exactly_once(store, workers):
    sel = np.setdiff1d(np.arange(203), np.arange(0, 203, 5))  # a subset spanning every chunk
    r = ChunkShuffleReader(store, sel, batch_size=10, seed=3, buffer_chunks=4)
    batches, rows = _epoch(r, workers)
    assert sorted(rows.tolist()) == sel.tolist()
    assert all(len(b) == 10 for b in batches[:-workers or None][:-1])
    for b in batches:  # tokens belong to their rows, labels too
        assert torch.equal(b.x[:, 0, 0, 0].long(), b.rows)
        assert torch.equal(b.y, b.rows % 7)


def test_shuffle_is_seeded_and_changes_per_epoch(store):
    sel = np.arange(203)
    a = _epoch(ChunkShuffleReader(store, sel, 32, seed=1))[1]
    b = _epoch(ChunkShuffleReader(store, sel, 32, seed=1))[1]
    c = _epoch(ChunkShuffleReader(store, sel, 32, seed=1, epoch=1))[1]
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert not np.array_equal(a, np.sort(a))
    # a batch mixes rows from several chunks (shuffled inside the buffer)
    first = ChunkShuffleReader(store, sel, 32, seed=1, buffer_chunks=8)
    batch = next(iter(first))
    assert len(np.unique(batch.rows.numpy() // 16)) >= 4


def test_ranks_read_disjoint_chunks(store):
    sel = np.arange(203)
    parts = [_epoch(ChunkShuffleReader(store, sel, 16, seed=0, rank=r, world=3))[1] for r in range(3)]
    allrows = np.concatenate(parts)
    assert sorted(allrows.tolist()) == list(range(203))
    chunk_sets = [set((p // 16).tolist()) for p in parts]
    assert not (chunk_sets[0] & chunk_sets[1]) and not (chunk_sets[1] & chunk_sets[2])


def test_unshuffled_is_store_order(store):
    rows = _epoch(ChunkShuffleReader(store, np.arange(0, 203, 2), 7, shuffle=False))[1]
    assert rows.tolist() == list(range(0, 203, 2))


def test_random_access_and_in_memory(store):
    s = TokenStore.open(store)
    want = np.array([150, 3, 77, 3, 200])
    got = read_rows(s, want)
    assert got.rows.tolist() == want.tolist() and got.x[:, 0, 0, 0].tolist() == want.tolist()
    data = load_rows(s, np.arange(203))
    assert data.x.shape == (203, 1, 5, 8) and data.x.dtype == torch.float32
    r = InMemoryReader(data, 50, seed=0)
    rows = torch.cat([b.rows for b in r]).numpy()
    assert sorted(rows.tolist()) == list(range(203)) and not np.array_equal(rows, np.arange(203))


def test_chunks_are_mapped_from_the_file_not_read_through_the_library(store):
    """Both backends hand the reader each chunk straight from the file (one copy into the batch): the mapped
    chunk holds exactly that chunk's rows, and the partial last chunk's rows too."""
    s = TokenStore.open(store)
    for c in (0, 3, s.num_chunks - 1):
        raw = s.backend.raw_chunk("tokens", c)
        a, b = s.chunk_bounds(c)
        assert raw is not None and raw.shape[0] == 16
        assert np.array_equal(raw[: b - a, 0, 0], np.arange(a, b, dtype=np.float32))
    s.close()
