"""kNN engine: predictions against scikit-learn and DINO's formula, blocked == unblocked, ties, sweep."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mimprobe.errors import UserError
from mimprobe.probe.knn import block_sizes, knn_sweep, predict, sweep, topk_neighbours
from mimprobe.probe.knn_bank import FeatureBank

pytestmark = pytest.mark.numerics  # rerun by .ci/run on the default CPU path


def clustered(n, nq, f, c, seed, spread=1.5):
    """A bank of n rows and nq queries around c random class means (neighbours mostly share a class, not always)."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((c, f))
    y = rng.integers(0, c, n + nq)
    y[:c] = np.arange(c)  # every class in the bank (sklearn's classes_ are then 0..c-1)
    x = (means[y] + spread * rng.standard_normal((n + nq, f))).astype(np.float32)
    return x[:n], y[:n], x[n:], y[n:]


def unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def search(q, bank_x, bank_y, k, **kw):
    bank = FeatureBank(bank_x, bank_y)
    sims, idx = topk_neighbours(q, bank, k, device="cpu", progress=False, **kw)
    return sims, idx, bank.labels[idx]


@pytest.mark.parametrize("classes,ks", [(2, [1, 2, 4, 7, 10]), (5, [1, 3, 6, 15])])
def test_majority_vote_equals_sklearn(classes, ks):
    from sklearn.neighbors import KNeighborsClassifier

    x, y, q, _ = clustered(400, 150, 16, classes, seed=classes)
    sims, idx, lab = search(q, x, y, max(ks))
    tied = 0
    for k in ks:
        ours = predict(sims, lab, classes, k=k, vote="majority")[0][:, 0].numpy()
        ref = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute").fit(x, y).predict(q)
        np.testing.assert_array_equal(ours, ref, err_msg=f"k={k}")
        counts = np.stack([(lab[:, :k].numpy() == c).sum(1) for c in range(classes)], 1)
        tied += int(((counts == counts.max(1, keepdims=True)).sum(1) > 1).sum())
    assert tied > 10, "the data must exercise the tie rule (equal votes -> smaller class)"


@pytest.mark.parametrize("temperature", [0.02, 0.07, 1.0])
def test_weighted_vote_equals_dino_formula(temperature):
    c, k = 6, 20
    x, y, q, _ = clustered(500, 120, 12, c, seed=1)
    sims, idx, lab = search(q, x, y, k)
    # the formula, written out: cosine similarities, top-k rows, class score = sum over them of exp(s / T)
    s = unit(q) @ unit(x).T
    nn = np.argsort(-s, axis=1, kind="stable")[:, :k]
    w = np.exp(np.take_along_axis(s, nn, 1) / temperature)
    scores = np.zeros((len(q), c))
    for j in range(k):
        np.add.at(scores, (np.arange(len(q)), y[nn[:, j]]), w[:, j])
    ref_top = np.argsort(-scores, axis=1, kind="stable")[:, :5]  # equal scores -> smaller class first
    np.testing.assert_array_equal(idx.numpy(), nn)
    cls, sc = predict(sims, lab, c, k=k, vote="weighted", temperature=temperature)
    np.testing.assert_array_equal(cls.numpy(), ref_top)
    assert np.array_equal(cls[:, 0].numpy(), scores.argmax(1))
    # the scores are the formula's up to the per-query factor exp(-max s / T)
    factor = np.exp(s.max(1, keepdims=True) / temperature)
    np.testing.assert_allclose(sc.numpy() * factor, np.take_along_axis(scores, ref_top, 1), rtol=1e-4)


@pytest.fixture(scope="module")
def bank_data():
    return clustered(1000, 97, 24, 7, seed=3)


def _banks(x, y, tmp_path):
    path = tmp_path / "bank.npy"
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=x.dtype, shape=x.shape)
    mm[:] = x
    mm.flush()
    del mm
    on_disk = np.load(path, mmap_mode="r")
    yield "tensor", FeatureBank(torch.from_numpy(x), torch.from_numpy(y))
    yield "numpy", FeatureBank(x, y)
    yield "memmap", FeatureBank(on_disk, y)
    yield "npy path", FeatureBank(str(path), y)
    yield "memmap view", FeatureBank(on_disk[:], y)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_blocked_equals_unblocked(bank_data, tmp_path, dtype):
    x, y, q, _ = bank_data
    x = x.astype(dtype)
    k = 20
    ref_s, ref_i = topk_neighbours(q, FeatureBank(x), k, device="cpu", query_block=len(q), bank_block=len(x),
                                   progress=False)
    order = np.argsort(-(unit(q.astype(np.float32)) @ unit(x.astype(np.float32)).T), axis=1, kind="stable")[:, :k]
    assert (ref_i.numpy() == order).mean() > 0.999  # float32 vs float64 may swap a near-tie, nothing more
    blocks = [dict(query_block=10, bank_block=100),  # divide Q? no; N: yes
              dict(query_block=7, bank_block=333),  # divide neither
              dict(query_block=97, bank_block=k),  # bank blocks of exactly k rows
              dict(query_block=5, bank_block=13),  # bank blocks smaller than k
              dict(memory_bytes=30_000, queries=20),  # budget-made blocks: 1 query x ~120 bank rows
              dict(memory_bytes=300_000), dict(memory_bytes=2 << 20)]
    for name, bank in _banks(x, y, tmp_path):
        for kw in blocks:
            nq = kw.get("queries", len(q))
            s, i = topk_neighbours(q[:nq], bank, k, device="cpu", progress=False,
                                   **{a: v for a, v in kw.items() if a != "queries"})
            np.testing.assert_array_equal(i.numpy(), ref_i[:nq].numpy(), err_msg=f"{name} {kw}")
            np.testing.assert_allclose(s.numpy(), ref_s[:nq].numpy(), rtol=0, atol=2e-6, err_msg=f"{name} {kw}")
            assert s.dtype == torch.float32 and i.dtype == torch.int64
            assert torch.all(s[:, 1:] <= s[:, :-1])


def test_memory_budget_sets_block_sizes():
    for q, n, f, k, mem in [(97, 1000, 24, 20, 300_000), (50_000, 1_281_167, 1024, 200, 4 << 30),
                            (2000, 400_000, 384, 20, 64 << 20), (3, 10, 8, 2, 1 << 30),
                            (97, 1000, 24, 20, 30_000)]:
        qb, nb = block_sizes(q, n, k, mem, query_row_bytes=4 * f, bank_row_bytes=4 * f)
        assert 1 <= qb <= q and 1 <= nb <= n
        assert qb * (4 * f + 96 * k) + nb * 4 * f + qb * nb * 6 <= mem
    qb, nb = block_sizes(97, 1000, 20, 300_000, query_row_bytes=96, bank_row_bytes=96)
    assert qb < 97 and nb == 1000  # the bank fits one block, the queries do not
    qb, nb = block_sizes(97, 1000, 20, 30_000, query_row_bytes=96, bank_row_bytes=96)
    assert qb < 97 and nb < 1000  # both blocked
    assert block_sizes(3, 10, 2, 1 << 30, query_row_bytes=32, bank_row_bytes=32) == (3, 10)  # all in one block
    with pytest.raises(UserError, match="too small"):
        block_sizes(10, 1_000_000, 20, 10_000, query_row_bytes=4096, bank_row_bytes=4096)


def test_rows_subset_of_memmap(bank_data, tmp_path):
    x, y, q, _ = bank_data
    path = tmp_path / "b.npy"
    np.save(path, x)
    rows = np.sort(np.random.default_rng(0).choice(len(x), 300, replace=False))
    rows[10:40] = np.arange(rows[9] + 1, rows[9] + 31)  # a run of consecutive rows (one read)
    rows = np.unique(rows)
    sub = FeatureBank(np.load(path, mmap_mode="r"), y, rows=rows)
    s, i = topk_neighbours(q, sub, 15, device="cpu", bank_block=64, progress=False)
    s2, i2 = topk_neighbours(q, FeatureBank(x[rows], y[rows]), 15, device="cpu", progress=False)
    np.testing.assert_array_equal(i.numpy(), i2.numpy())
    np.testing.assert_array_equal(sub.labels.numpy(), y[rows])


def test_equal_similarities_keep_smaller_bank_index():
    # bank rows are positive multiples of 4 basis vectors: their similarities to a query are exactly equal
    n, f = 30, 4
    x = np.zeros((n, f), np.float32)
    x[np.arange(n), np.arange(n) % f] = np.arange(1, n + 1)
    q = np.array([[0.9, 0.5, 0.7, 0.1], [0.2, 0.2, 0.2, 0.2], [-1, 0.3, 0.3, 0.0]], np.float32)
    s_exact = unit(q) @ np.eye(f)[np.arange(n) % f].T
    want = np.argsort(-s_exact, axis=1, kind="stable")  # similarity desc, then index asc
    for k in (3, 7, 8, 13, 29):
        for qb, nb in [(3, 30), (1, 4), (2, 7), (3, 11)]:
            _, i = topk_neighbours(q, FeatureBank(x), k, device="cpu", query_block=qb, bank_block=nb, progress=False)
            np.testing.assert_array_equal(i.numpy(), want[:, :k], err_msg=f"k={k} blocks {qb}x{nb}")


def test_sweep_equals_each_pair_separately(bank_data):
    x, y, q, yq = bank_data
    ks, temps = [20, 1, 5, 10], [0.05, 0.3]
    sims, idx, lab = search(q, x, y, max(ks))
    # a small memory budget forces several query blocks
    recs = sweep(sims, lab, yq, ks, temps, 7, votes=("weighted", "majority"), memory_bytes=20_000)
    assert [(r["vote"], r["temperature"], r["k"]) for r in recs] == \
        [("weighted", t, k) for t in temps for k in ks] + [("majority", None, k) for k in ks]
    for r in recs:
        s_k, i_k, lab_k = search(q, x, y, r["k"])  # its own search, k neighbours only
        np.testing.assert_array_equal(i_k.numpy(), idx[:, :r["k"]].numpy())
        cls, sc = predict(s_k, lab_k, 7, k=r["k"], vote=r["vote"], temperature=r["temperature"] or 1.0)
        hit = (cls == torch.from_numpy(yq)[:, None]) & (sc > 0)
        assert r["correct1"] == int(hit[:, 0].sum()), r
        assert r["correct5"] == int(hit.any(1).sum()), r
        assert r["n"] == len(q) and r["top1"] == r["correct1"] / len(q)
    assert recs[1]["correct5"] == recs[1]["correct1"]  # k=1: one voted class, top-5 = top-1
    assert len({r["correct1"] for r in recs}) > 3  # the pairs differ


def test_knn_sweep_end_to_end_is_better_than_chance(bank_data):
    x, y, q, yq = bank_data
    recs = knn_sweep(q, yq, FeatureBank(x, y), ks=(10, 20), device="cpu", progress=False)
    assert [(r["vote"], r["k"]) for r in recs] == [("weighted", 10), ("weighted", 20)]  # DINO's vote by default
    assert all(r["top1"] > 0.5 for r in recs)  # 7 classes: chance is 0.14


def test_exclude_self_matches(bank_data):
    x, y, _, _ = bank_data
    sub = x[:200]
    s, i = topk_neighbours(sub, FeatureBank(sub), 5, device="cpu", exclude=np.arange(200), bank_block=64,
                           progress=False)
    assert not (i.numpy() == np.arange(200)[:, None]).any()
    sim = unit(sub) @ unit(sub).T
    np.fill_diagonal(sim, -np.inf)
    np.testing.assert_array_equal(i.numpy(), np.argsort(-sim, axis=1, kind="stable")[:, :5])


def test_user_errors(bank_data):
    x, y, q, yq = bank_data
    bank = FeatureBank(x[:30], y[:30])
    with pytest.raises(UserError, match="k=31"):
        topk_neighbours(q, bank, 31, device="cpu", progress=False)
    with pytest.raises(UserError, match="empty"):
        topk_neighbours(q, FeatureBank(x[:0], y[:0]), 1, device="cpu", progress=False)
    with pytest.raises(UserError, match="features per row"):
        topk_neighbours(q[:, :10], bank, 5, device="cpu", progress=False)
    with pytest.raises(UserError, match="labels"):
        FeatureBank(x, y[:10])
    with pytest.raises(UserError, match="≥ 0"):
        FeatureBank(x[:3], np.array([0, -1, 2]))
    sims, idx = topk_neighbours(q, bank, 10, device="cpu", progress=False)
    with pytest.raises(UserError, match="k=20"):
        sweep(sims, bank.labels[idx], yq, [10, 20], [0.07], 7)
    with pytest.raises(UserError, match="temperature"):
        sweep(sims, bank.labels[idx], yq, [10], [0.0], 7)
    with pytest.raises(UserError, match="true labels"):
        sweep(sims, bank.labels[idx], np.full(len(q), -1), [10], [0.07], 7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_equals_cpu(bank_data):
    x, y, q, _ = bank_data
    s, i = topk_neighbours(q, FeatureBank(x), 20, device="cpu", progress=False)
    s2, i2 = topk_neighbours(q, FeatureBank(x), 20, device="cuda", bank_block=333, query_block=50, progress=False)
    assert (i2.numpy() == i.numpy()).mean() > 0.999
    np.testing.assert_allclose(s2.numpy(), s.numpy(), atol=1e-5)
