"""Weighted k-nearest-neighbour classification (DINO's kNN protocol) over banks of any size, in bounded memory.

The protocol (facebookresearch/dino ``eval_knn.py``, dinov2 ``dinov2/eval/knn.py``): features are
L2-normalised, a query's similarity to a bank row is their cosine (the dot product of the normalised rows), the
k most similar bank rows vote for their class with weight exp(s/T) (the *weighted* vote; DINO: T = 0.07,
k ∈ {10, 20, 100, 200}) or 1 (the *majority* vote), and classes rank by their summed votes.

- :class:`FeatureBank` (``knn_bank.py``) reads features block by block and L2-normalises them in float32:
  callers pass raw features (tensor, array, ``np.memmap`` or ``.npy`` path), never normalised copies.
- :func:`topk_neighbours`: the k most similar bank rows of each query by a blocked running top-k, float32 math,
  on CPU or CUDA, block sizes from a memory budget (:func:`block_sizes`).
- :func:`sweep` scores every (vote, T, k) from one top-max(k) search; :func:`predict` ranks classes for one.

Ties are broken deterministically, whatever the block sizes or device:
- equal similarities: the smaller bank index ranks first, so of several rows tied at the k-th place the
  smaller indices are kept;
- equal vote scores: the smaller class index ranks first (scikit-learn's ``KNeighborsClassifier`` does the
  same for uniform weights: ``argmax``/``mode`` return the first class);
- a class that got no vote never counts as a top-5 hit (with k < 5 only the ≤ k voted classes can hit, which is
  DINO's ``min(5, k)``).
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from mimprobe.errors import UserError
from mimprobe.probe.knn_bank import FeatureBank, as_bank, resolve_device
from mimprobe.probe.options import DEFAULT_MEMORY, DEFAULT_VOTES, DINO_KS, DINO_T, VOTES

__all__ = ["VOTES", "best", "block_sizes", "knn_sweep", "predict", "sweep", "topk_neighbours"]

SIM_BYTES = 6  # per similarity-block element: the float32 similarity + the tie fall-back's sort (≤ 2 B/element)
TOPK_BYTES = 96  # per query row and neighbour: the running top-k (12 B) and the merge's temporaries
MIN_BANK_BLOCK = 2048  # bank rows per block below which the query block shrinks instead
RESERVE = 8 << 20  # fixed overheads outside the blocks (allocator, BLAS and thread-pool state: ~5 MB measured)


def block_sizes(num_queries: int, bank_rows: int, k: int, memory_bytes: int, *, query_row_bytes: int,
                bank_row_bytes: int) -> tuple[int, int]:
    """(query rows, bank rows) per block so that what :func:`topk_neighbours` allocates fits ``memory_bytes``::

        qb · (query_row_bytes + 96·k)   query block (float32 on the device + staging), running top-k, merge
      + nb · bank_row_bytes             bank block (read buffer, float32 copy, device or BLAS-packed copy)
      + qb · nb · 6                     float32 similarity block + the tie fall-back's sort
      ≤ memory_bytes − min(8 MiB, memory_bytes / 8)   (fixed overheads: allocator, BLAS, thread pools)

    The query block takes what a quarter of the budget holds (all queries when they fit), the bank block the
    rest, but at least min(N, 2048) rows when one query row leaves room for that (then the query block
    shrinks); the query block then grows into what is left (e.g. when the whole bank fits in one block).
    Not in the budget: the result (Q·k·12 bytes, on the host) and the bank's labels (N·8 bytes). A budget
    too small for one query row → UserError."""
    budget, memory_bytes = memory_bytes, memory_bytes - min(RESERVE, memory_bytes // 8)
    qrow = query_row_bytes + TOPK_BYTES * k
    qb = max(1, min(num_queries, memory_bytes // 4 // qrow))
    nb = (memory_bytes - qb * qrow) // (qb * SIM_BYTES + bank_row_bytes)
    if nb < min(bank_rows, MIN_BANK_BLOCK):  # as wide as one query row allows, up to the floor
        nb = min(MIN_BANK_BLOCK, max(1, (memory_bytes - qrow) // (SIM_BYTES + bank_row_bytes)))
    nb = min(nb, bank_rows)
    qb = min(num_queries, (memory_bytes - nb * bank_row_bytes) // (nb * SIM_BYTES + qrow))
    if qb < 1:
        need = (nb * bank_row_bytes + nb * SIM_BYTES + qrow) * 8 // 7 + 1
        raise UserError(f"kNN memory budget of {budget} bytes is too small for this bank ({bank_rows} rows): "
                        f"give at least {need} bytes (--memory)")
    return int(qb), int(nb)


def topk_neighbours(queries, bank, k: int, *, device=None, memory_bytes: int = DEFAULT_MEMORY,
                    query_block: int | None = None, bank_block: int | None = None, exclude=None,
                    progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` bank rows most cosine-similar to each query.

    ``queries`` (Q, F) and ``bank`` (N, F): anything :class:`FeatureBank` accepts (or one); both are normalised
    here. Returns (similarities (Q, k) float32, bank positions (Q, k) int64), on the CPU, each row sorted by
    similarity descending then bank position ascending. The bank is streamed in blocks of ``bank_block`` rows
    and the queries in blocks of ``query_block`` (default: :func:`block_sizes` from ``memory_bytes``); each
    bank block's top-k is merged into a running top-k, so results do not depend on the block sizes.
    ``device``: where the math runs (default CUDA when available); bank blocks move there one at a time.
    ``exclude`` (Q,) int: a bank position each query must not return (its own row when the queries are bank
    rows; −1 for none), then k ≤ N − 1."""
    bank, qs = as_bank(bank), as_bank(queries)
    if bank.size == 0:
        raise UserError("the kNN bank is empty: there are no training rows to search")
    if qs.dim != bank.dim:
        raise UserError(f"kNN queries have {qs.dim} features per row but the bank has {bank.dim}")
    ex = None if exclude is None else torch.as_tensor(exclude, dtype=torch.int64).reshape(-1)
    if ex is not None and len(ex) != qs.size:
        raise UserError(f"exclude has {len(ex)} entries for {qs.size} queries")
    most = bank.size - (ex is not None)
    if not 1 <= k <= most:
        raise UserError(f"k={k} neighbours asked of a kNN bank of {bank.size} rows"
                        f"{' (less each query itself)' if ex is not None else ''}: k must be 1..{most}")
    dev = resolve_device(device)
    nq, n = qs.size, bank.size
    qb, nb = block_sizes(max(nq, 1), n, k, memory_bytes, query_row_bytes=qs.row_bytes(dev),
                         bank_row_bytes=bank.row_bytes(dev))
    qb, nb = min(query_block or qb, max(nq, 1)), min(bank_block or nb, n)
    sims, idx = torch.empty((nq, k), dtype=torch.float32), torch.empty((nq, k), dtype=torch.int64)
    ex = None if ex is None else ex.to(dev)
    block = torch.empty(qb * nb, dtype=torch.float32, device=dev)  # the similarity block, reused
    bar = tqdm(total=-(-nq // qb) * n, desc="knn", unit="row", unit_scale=True, dynamic_ncols=True,
               disable=None if progress else True)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # true float32 (no TF32) on CUDA
    try:
        for q0 in range(0, nq, qb):
            q1 = min(nq, q0 + qb)
            q = qs.read(q0, q1, dev)
            run_v = torch.empty((q1 - q0, 0), dtype=torch.float32, device=dev)
            run_i = torch.empty((q1 - q0, 0), dtype=torch.int64, device=dev)
            for b0 in range(0, n, nb):
                b1 = min(n, b0 + nb)
                s = block[: (q1 - q0) * (b1 - b0)].view(q1 - q0, b1 - b0)
                torch.mm(q, bank.read(b0, b1, dev).T, out=s)
                if ex is not None:
                    _mask(s, ex[q0:q1], b0, b1)
                v, i = _block_topk(s, k)
                run_v, run_i = _merge(run_v, run_i, v, i + b0, k)
                bar.update(b1 - b0)
            sims[q0:q1], idx[q0:q1] = run_v.cpu(), run_i.cpu()
    finally:
        torch.set_float32_matmul_precision(precision)
        bar.close()
        bank.release()
        qs.release()
    return sims, idx


def _mask(s: torch.Tensor, ex: torch.Tensor, b0: int, b1: int) -> None:
    rows = ((ex >= b0) & (ex < b1)).nonzero().squeeze(1)
    if rows.numel():
        s[rows, ex[rows] - b0] = float("-inf")


def _block_topk(s: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each row of ``s`` ordered by (value descending, column ascending), ties at the k-th place
    resolved to the smaller columns. torch.topk picks arbitrarily among equal values, so it is asked for k+1:
    where the (k+1)-th equals the k-th, that row is stable-sorted instead (rare: duplicate rows)."""
    if s.shape[1] <= k:
        return s.sort(dim=1, descending=True, stable=True)
    v, i = s.topk(k + 1, dim=1)
    tied = (v[:, k] == v[:, k - 1]).nonzero().squeeze(1)
    v, i = v[:, :k], i[:, :k]
    step = max(1, s.shape[0] // 8)  # bounds the fall-back sort to 2 B per similarity element
    for c in range(0, tied.numel(), step):
        r = tied[c:c + step]
        sv, si = s[r].sort(dim=1, descending=True, stable=True)
        v[r], i[r] = sv[:, :k], si[:, :k]
    i, order = i.sort(dim=1)
    v, order = v.gather(1, order).sort(dim=1, descending=True, stable=True)
    return v, i.gather(1, order)


def _merge(run_v, run_i, v, i, k):
    """Running top-k ∪ a later block's top-k. Both are ordered (value desc, index asc) and every running index
    is smaller than every block index, so a stable sort of the concatenation keeps that order."""
    cv, order = torch.cat([run_v, v], 1).sort(dim=1, descending=True, stable=True)
    return cv[:, :k].contiguous(), torch.cat([run_i, i], 1).gather(1, order[:, :k])


# --- votes ----------------------------------------------------------------------------------------------------
def _weights(s: torch.Tensor, vote: str, temperature) -> torch.Tensor:
    """exp(s/T) up to a per-query factor (exp(-max s/T), so T = 0.01 cannot overflow), float64; 1 for majority."""
    if vote == "majority":
        return torch.ones(s.shape, dtype=torch.float64, device=s.device)
    s = s.double()
    return torch.exp((s - s.amax(1, keepdim=True)) / temperature)


def _check(sims, labels, ks, temperatures, votes, num_classes):
    sims, labels = torch.as_tensor(sims), torch.as_tensor(labels, dtype=torch.int64)
    if sims.shape != labels.shape or sims.ndim != 2:
        raise UserError(f"similarities {tuple(sims.shape)} and neighbour labels {tuple(labels.shape)} must both be (Q, k)")
    for k in ks:
        if not 1 <= k <= sims.shape[1]:
            raise UserError(f"k={k} needs the top-{k} neighbours; {sims.shape[1]} were searched")
    for t in temperatures:
        if not t > 0:
            raise UserError(f"kNN temperature must be > 0, got {t}")
    for v in votes:
        if v not in VOTES:
            raise UserError(f"unknown kNN vote {v!r}: choose from {', '.join(VOTES)}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise UserError(f"neighbour labels must be class indices 0..{num_classes - 1}")
    return sims, labels


def _rows_per_block(num_classes: int, k: int, memory_bytes: int) -> int:
    return max(1, memory_bytes // (16 * num_classes + 40 * k))  # float64 scores + comparisons, per query


def sweep(sims, neighbour_labels, y_true, ks=DINO_KS, temperatures=(DINO_T,), num_classes: int | None = None, *,
          votes=DEFAULT_VOTES, memory_bytes: int = DEFAULT_MEMORY, device="cpu") -> list[dict]:
    """Top-1 and top-5 for every (vote, T, k), all from one top-max(k) search.

    ``sims`` (Q, K) sorted descending and ``neighbour_labels`` (Q, K) as from :func:`topk_neighbours` (labels =
    ``bank.labels[indices]``), ``y_true`` (Q,) class indices, every k ≤ K. The weighted vote is scored for each
    T, the majority vote once (``temperature`` None). Returns one dict per pair, in the order votes × T × ks:
    ``vote, k, temperature, top1, top5`` (fractions), ``correct1, correct5, n``. Ties: see the module doc.
    Queries go in blocks so the (block, C) float64 vote matrix fits ``memory_bytes``."""
    ks, temperatures = [int(k) for k in ks], [float(t) for t in temperatures]
    y = torch.as_tensor(y_true, dtype=torch.int64).reshape(-1)
    if len(y) == 0 or len(y) != len(sims):
        raise UserError(f"kNN needs queries, each with a true label: {len(y)} labels for {len(sims)} queries")
    if num_classes is None:
        num_classes = max(int(torch.as_tensor(neighbour_labels).max()), int(y.max())) + 1
    sims, labels = _check(sims, neighbour_labels, ks, temperatures, votes, num_classes)
    if y.min() < 0 or y.max() >= num_classes:
        raise UserError(f"true labels must be class indices 0..{num_classes - 1} (leave unlabelled queries out)")
    kmax, order = max(ks), sorted(set(ks))
    pairs = [(v, t) for v in votes for t in (temperatures if v == "weighted" else [None])]
    hits = {(v, t, k): [0, 0] for v, t in pairs for k in order}
    step = _rows_per_block(num_classes, kmax, memory_bytes)
    classes = torch.arange(num_classes, device=device)
    for a in range(0, len(y), step):
        s, lab, yb = (x[a:a + step].to(device) for x in (sims[:, :kmax], labels[:, :kmax], y))
        for v, t in pairs:
            w, scores, done = _weights(s, v, t), torch.zeros((len(yb), num_classes), dtype=torch.float64, device=device), 0
            for k in order:  # votes of the first k neighbours = those of the previous k + the next ones
                scores.scatter_add_(1, lab[:, done:k], w[:, done:k])
                done = k
                own = scores.gather(1, yb[:, None])
                rank = ((scores > own) | ((scores == own) & (classes < yb[:, None]))).sum(1)
                voted = own.squeeze(1) > 0
                hits[v, t, k][0] += int(((rank == 0) & voted).sum())
                hits[v, t, k][1] += int(((rank < 5) & voted).sum())
    n = len(y)
    return [{"vote": v, "k": k, "temperature": t, "top1": hits[v, t, k][0] / n, "top5": hits[v, t, k][1] / n,
             "correct1": hits[v, t, k][0], "correct5": hits[v, t, k][1], "n": n} for v, t in pairs for k in ks]


def predict(sims, neighbour_labels, num_classes: int, *, k: int, vote: str = "weighted", temperature: float = DINO_T,
            top: int = 5, memory_bytes: int = DEFAULT_MEMORY) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``top`` best classes of each query and their vote scores, best first ((Q, top) int64, (Q, top)
    float64); column 0 is the prediction. Equal scores → smaller class index first; classes without a vote
    (score 0) fill the ranking in index order. ``temperature`` is ignored for the majority vote; weighted
    scores are exp(s/T) sums up to a per-query factor (the ranking is DINO's)."""
    sims, labels = _check(sims, neighbour_labels, [k], [temperature], [vote], num_classes)
    top = min(top, num_classes)
    out_c, out_s = torch.empty((len(sims), top), dtype=torch.int64), torch.empty((len(sims), top), dtype=torch.float64)
    step = _rows_per_block(num_classes, k, memory_bytes)
    for a in range(0, len(sims), step):
        s, lab = sims[a:a + step, :k], labels[a:a + step, :k]
        scores = torch.zeros((len(s), num_classes), dtype=torch.float64).scatter_add_(1, lab, _weights(s, vote, temperature))
        sv, si = scores.sort(dim=1, descending=True, stable=True)
        out_c[a:a + step], out_s[a:a + step] = si[:, :top], sv[:, :top]
    return out_c, out_s


def best(records: list[dict], metric: str = "top1") -> dict:
    """The record with the highest ``metric``; ties → the first in list order (for :func:`sweep`'s order:
    weighted before majority, then the earlier T, then the earlier k)."""
    return max(records, key=lambda r: r[metric])  # max keeps the first of equal keys


def knn_sweep(queries, y_true, bank: FeatureBank, ks=DINO_KS, temperatures=(DINO_T,), *, votes=DEFAULT_VOTES,
              num_classes: int | None = None, device=None, memory_bytes: int = DEFAULT_MEMORY,
              progress: bool = True) -> list[dict]:
    """:func:`topk_neighbours` for max(ks), then :func:`sweep`: one search, every (vote, T, k) scored."""
    if bank.labels is None:
        raise UserError("the kNN bank has no labels")
    sims, idx = topk_neighbours(queries, bank, max(ks), device=device, memory_bytes=memory_bytes, progress=progress)
    return sweep(sims, bank.labels[idx], y_true, ks, temperatures, num_classes, votes=votes,
                 memory_bytes=memory_bytes)
