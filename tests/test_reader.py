"""Readers: whole-chunk streaming with seeded shuffling, random access, in-memory loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from conftest import synthetic_store
from mimprobe.cache_store import TokenStore
from mimprobe.cache_store.reader import InMemoryReader, load_rows, read_rows
from mimprobe.cache_store.stream import ChunkShuffleReader


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


# --- the streaming Feeder: ring buffers, reader thread, persistent workers (issue 21) -----------------------
def _feeder(store, **kw):
    from mimprobe.probe.feed import Feeder

    s = TokenStore.open(store)
    opts = dict(device=torch.device("cpu"), arrays=["tokens"], shuffle=True, seed=5, in_memory=False,
                buffer_chunks=4)
    opts.update(kw)
    return Feeder(s, np.arange(s.num_samples), opts.pop("batch_size", 12), **opts)


def _snapshot(feed, epoch=0):
    feed.set_epoch(epoch)
    return [(b.rows.clone(), b.x.clone(), b.y.clone()) for b in feed]


@pytest.mark.parametrize("settings", [dict(prefetch=0), dict(io="pread"), dict(ring=False),
                                      dict(readahead=0, prefetch=3), dict(workers=2)])
def test_streaming_mechanisms_give_the_same_batches(store, settings):
    """Ring buffers, the reader thread, pread vs mmap, read-ahead and workers change how bytes move, never which
    rows a batch holds nor their values: the same seed gives the same batches as the plain reader."""
    plain = ChunkShuffleReader(store, np.arange(203), 12, seed=5, buffer_chunks=4, epoch=1)
    workers = settings.get("workers", 0)
    want = [(b.rows, b.x, b.y) for b in DataLoader(plain, batch_size=None, num_workers=workers)]
    got = _snapshot(_feeder(store, **settings), epoch=1)
    assert len(got) == len(want)
    for (r1, x1, y1), (r2, x2, y2) in zip(want, got):
        assert torch.equal(r1, r2) and torch.equal(x1, x2) and torch.equal(y1, y2)
    for rows, x, _ in got:
        assert torch.equal(x[:, 0, 0, 0].long(), rows)


def test_ring_never_overwrites_the_batch_the_consumer_holds(store):
    """The reader thread runs ahead into the ring while the consumer holds a batch: the held batch keeps its
    values until the next one is asked for. The buffers really are reused (so the rule is what protects it)."""
    import time

    feed = _feeder(store, prefetch=2, batch_size=8)
    feed.set_epoch(0)
    held, ptrs = [], set()
    for b in feed:
        time.sleep(0.005)  # give the reader thread time to fill every free slot
        assert torch.equal(b.x[:, 0, 0, 0].long(), b.rows), "a held batch was overwritten"
        ptrs.add(b.x.data_ptr())
        held.append((b, b.rows.clone()))
    assert len(ptrs) == 3  # prefetch + 1 slots, reused for all 26 batches
    stale = sum(not torch.equal(b.x[:, 0, 0, 0].long(), rows) for b, rows in held)
    assert stale > 0  # batches kept past the rule do change: consumers must copy what they keep


def test_early_stop_and_errors_in_the_reader_thread(store, monkeypatch):
    feed = _feeder(store, prefetch=2)
    for epoch in range(2):  # breaking out mid-epoch stops the thread; the next epoch starts cleanly
        feed.set_epoch(epoch)
        for i, _ in enumerate(feed):
            if i == 2:
                break
    assert len(_snapshot(feed, 1)) == feed.num_batches()

    def broken(*a, **k):
        raise OSError("disk on fire")
        yield  # pragma: no cover

    monkeypatch.setattr(feed.reader, "batches", broken)
    with pytest.raises(OSError, match="disk on fire"):
        list(feed)


def test_persistent_workers_shuffle_each_epoch_anew(store):
    """Workers persist across epochs (one DataLoader), yet each epoch gets its own seeded shuffle — the same
    one a fresh Feeder gives for that epoch."""
    feed = _feeder(store, workers=2)
    order = [torch.cat([r for r, _, _ in _snapshot(feed, e)]).tolist() for e in range(3)]
    loader = feed._loader
    assert loader is not None and loader.persistent_workers
    assert order[0] != order[1] != order[2] and sorted(order[0]) == sorted(order[1]) == list(range(203))
    assert feed._loader is loader  # not rebuilt
    fresh = torch.cat([r for r, _, _ in _snapshot(_feeder(store, workers=2), 1)]).tolist()
    assert fresh == order[1]


def test_int8_and_partial_chunks_through_the_ring(tmp_path):
    n, t, d = 70, 3, 64
    tok = torch.randn(n, t, d)
    path = synthetic_store(tmp_path / "q.zarr", tok, np.arange(n) % 3, chunk_rows=16, dtype="int8")
    s = TokenStore.open(path)
    want = load_rows(s, np.arange(n))
    for settings in (dict(prefetch=2), dict(io="pread", prefetch=0)):
        feed = _feeder(path, batch_size=9, **settings)
        got = [(b.rows.clone(), b.x.clone(), b.scales.clone()) for b in feed]
        rows = torch.cat([g[0] for g in got])
        assert sorted(rows.tolist()) == list(range(n))
        assert torch.equal(torch.cat([g[1] for g in got]), want.x[rows])
        assert torch.equal(torch.cat([g[2] for g in got]), want.scales[rows])


def test_willneed_announces_plain_chunks(store):
    from mimprobe.cache_store.batches import willneed

    s = TokenStore.open(store)
    willneed(s, range(s.num_chunks), ["tokens"])  # no error on either backend, partial last chunk included
    loc = s.backend.raw_chunk_file("tokens", s.num_chunks - 1)
    assert loc is not None and loc[3][0] == 16
    s.close()


def test_two_passes_at_once_do_not_share_the_ring(store):
    feed = _feeder(store, prefetch=1, batch_size=8)
    outer = iter(feed)
    first = next(outer)
    rows = first.rows.clone()
    inner = [b.rows.clone() for b in feed]  # a whole second pass while the first holds a batch
    assert torch.equal(first.x[:, 0, 0, 0].long(), rows) and len(inner) == feed.num_batches()
    rest = [b for b in outer]
    assert len(rest) == feed.num_batches() - 1


def test_kept_maps_give_the_same_epochs(store):
    """Chunk maps kept across epochs (the default for a store this small) read the same bytes as maps made
    afresh; each epoch still shuffles anew."""
    epochs = {}
    for keep in (True, False):
        r = ChunkShuffleReader(store, np.arange(203), 10, seed=2, keep_maps=keep)
        got = []
        for e in range(2):
            r.set_epoch(e)
            got.append([(b.rows.clone(), b.x.clone()) for b in r.batches()])
        assert bool(r._state[4]) == keep  # the maps really were kept (or not)
        epochs[keep] = got
    for a, b in zip(epochs[True], epochs[False]):
        assert all(torch.equal(x1, x2) and torch.equal(r1, r2) for (r1, x1), (r2, x2) in zip(a, b))
    assert not torch.equal(epochs[True][0][0][0], epochs[True][1][0][0])
    assert ChunkShuffleReader(store, np.arange(203), 10)._keep_maps(TokenStore.open(store), 13)
