"""mimprobe from Python: the functions and objects ``import mimprobe`` offers (docs/api.md).

* :func:`open_store` — a store, read-only: its size, attributes, labels, sample ids, class names, tokens decoded to
  float32 whatever the stored dtype, and :meth:`Store.to_xarray`;
* :func:`extract` and :func:`probe` — the ``extract`` and ``probe`` commands, with the options of
  :class:`~mimprobe.extract.options.ExtractOptions` and :class:`~mimprobe.probe.options.ProbeOptions` as keyword
  arguments (same names, same defaults); :func:`probe` returns :class:`Results`;
* :func:`load_results` — the records of ``probe --out`` files, as ``mimprobe report`` reads them;
* :func:`token_loader` — the probe's own chunk-shuffled reader as batches of float32 tokens for your own loop.

Nothing here re-implements the command line's work: each function validates its arguments (one
:class:`~mimprobe.errors.UserError` line naming what to change) and calls the code the commands call.
"""

from __future__ import annotations

import os
from typing import Iterable, Iterator, NamedTuple, Sequence

import numpy as np
import torch

from mimprobe.cache_store.store import TokenStore
from mimprobe.errors import UserError
from mimprobe.options import from_kwargs


# --- stores ------------------------------------------------------------------------------------------------------
class Store:
    """A token store opened read-only (:func:`open_store`). ``N``, ``T``, ``D``: samples, tokens per sample (prefix +
    patch), channels. Tokens come back as float32 whatever the stored dtype (float16, bfloat16, int8 + scales)."""

    def __init__(self, store: TokenStore):
        self._store = store

    @property
    def token_store(self) -> TokenStore:
        """The underlying :class:`~mimprobe.cache_store.store.TokenStore`."""
        return self._store

    @property
    def path(self) -> str:
        return self._store.path

    @property
    def N(self) -> int:  # noqa: N802 (the shape's names)
        return self._store.num_samples

    @property
    def T(self) -> int:  # noqa: N802
        return self._store.num_tokens

    @property
    def D(self) -> int:  # noqa: N802
        return self._store.dim

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.N, self.T, self.D

    @property
    def num_prefix_tokens(self) -> int:
        return self._store.num_prefix_tokens

    @property
    def attrs(self) -> dict:
        """The store's attributes: model, preprocessing, dataset, dtype, ... (a copy)."""
        return dict(self._store.attrs)

    @property
    def dtype(self) -> str:
        return self._store.codec.dtype

    @property
    def labels(self) -> np.ndarray:
        """int64 (N,), -1 where unknown."""
        return self._store.labels

    @property
    def sample_ids(self) -> list[str]:
        return self._store.sample_ids

    @property
    def class_names(self) -> list[str]:
        return self._store.class_names

    @property
    def layers(self) -> list[int]:
        """The blocks stored (absolute indices; the last block is ``tokens``)."""
        return self._store.layers

    @property
    def complete(self) -> bool:
        return self._store.complete

    def valid_rows(self, labelled: bool = False) -> np.ndarray:
        """Rows that hold a sample (done chunks, not skipped); with ``labelled``, only those with a label."""
        from mimprobe.probe.subsets import usable_rows

        return usable_rows(self._store, allow_incomplete=True, labelled=labelled)

    def read(self, rows=None, *, block: int | None = None, numpy: bool = False):
        """Tokens of ``rows`` as float32 (n, T, D): ``None`` (every row), a slice, an int, or a sequence of rows (in
        that order). ``block``: another stored block (absolute, or negative from the end; default the last)."""
        name = "tokens" if block is None else self._store.block_array(block)
        n = self.N
        if rows is None:
            rows = slice(0, n)
        one = isinstance(rows, (int, np.integer))
        if one:
            rows = [int(rows)]
        if isinstance(rows, slice):
            start, stop, step = rows.indices(n)
            if step == 1:
                out = self._store.read_tokens(start, max(start, stop), name)
                return out.numpy() if numpy else out
            rows = range(start, stop, step)
        idx = np.asarray(rows, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < -n or idx.max() >= n):
            raise UserError(f"{self.path}: rows out of range (the store has {n} rows)")
        idx = idx % n if len(idx) else idx
        out = self._read_rows(idx, name)
        out = out[0] if one else out
        return out.numpy() if numpy else out

    def attention(self, rows=None) -> np.ndarray:
        """The stored last-block [cls]→patch attention (n, heads, patches) float32 of ``rows`` (a sequence, or
        ``None`` for every row) of a store extracted with ``--store-attention``; one error line otherwise."""
        idx = np.arange(self.N) if rows is None else np.asarray(rows, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= self.N):
            raise UserError(f"{self.path}: rows out of range (the store has {self.N} rows)")
        return self._store.read_attention(idx)

    def _read_rows(self, idx: np.ndarray, name: str) -> torch.Tensor:
        from mimprobe.cache_store.reader import read_rows

        if not len(idx):
            return torch.empty(0, self.T, self.D)
        uniq, inverse = np.unique(idx, return_inverse=True)
        batch = read_rows(self._store, uniq, [name])
        return batch.decode(self._store.codec)[:, 0][torch.from_numpy(inverse)]

    def to_xarray(self):
        """The store as an ``xarray.Dataset`` (zarr stores; needs xarray): tokens as stored (named dimensions
        sample × token × channel), ``sample_ids`` and ``labels`` as coordinates; lazy, chunked along samples."""
        try:
            import xarray as xr
        except ImportError:
            raise UserError("to_xarray() needs xarray: pip install xarray") from None
        if self._store.format != "zarr":
            raise UserError(f"{self.path}: to_xarray() opens zarr stores; this one is {self._store.format} (read it "
                            "with Store.read, or h5py)")
        return xr.open_zarr(self.path, consolidated=False)

    def close(self) -> None:
        self._store.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return self.N

    def __repr__(self) -> str:
        m = self._store.attrs.get("model", {})
        return (f"Store({self.path!r}, N={self.N}, T={self.T}, D={self.D}, dtype={self.dtype}, "
                f"model={m.get('name')!r}, weights={m.get('weights')!r})")


def open_store(path: str) -> Store:
    """Open a token store (a ``.zarr`` directory, an ``.h5`` file, or a zarr URL) read-only."""
    return Store(TokenStore.open(str(path), "r"))


# --- extract, probe, results -------------------------------------------------------------------------------------
def extract(model: str, data: str, store: str, **options):
    """``mimprobe extract MODEL DATA STORE``: ``options`` are :class:`~mimprobe.extract.options.ExtractOptions`'
    fields (``pretrained=False``, ``img_size=64``, ``dtype="int8"``, ...). Returns the
    :class:`~mimprobe.extract.options.ExtractResult`."""
    from mimprobe.extract.options import ExtractOptions
    from mimprobe.extract.runner import extract as run_extract

    return run_extract(model, str(data), str(store), from_kwargs(ExtractOptions, options, "mimprobe.extract()"))


class Results(list):
    """Probe result records (one dict per head and seed, as ``probe --out`` writes them), with
    :meth:`to_pandas`."""

    def to_pandas(self):
        """One row per record, nested fields flattened with dots (``metrics.eval_top1``, ``chosen.lr``, ...);
        needs pandas."""
        try:
            import pandas as pd
        except ImportError:
            raise UserError("to_pandas() needs pandas: pip install pandas (or pip install 'mimprobe[pandas]')") \
                from None
        df = pd.json_normalize(list(self), sep=".")
        first = [c for c in ("head", "seed", "metrics.eval_top1", "metrics.eval_top5", "metrics.val_top1", "params")
                 if c in df.columns]
        return df[first + [c for c in df.columns if c not in first]]

    def table(self) -> str:
        """The table ``mimprobe probe`` prints."""
        from mimprobe.probe.results import format_table

        return format_table(list(self))


def _head_specs(heads) -> list[str]:
    """Head specs from strings (``"abmilp"``, ``"pkg.mod:Class:k=v"``, comma lists as ``--head`` takes them) and
    GridHead subclasses (named ``module:QualName``)."""
    from mimprobe.probe.heads.base import as_head, split_specs

    if heads is None:
        return []
    if isinstance(heads, (str, type)):
        heads = [heads]
    out = []
    for h in heads:
        if isinstance(h, type):
            name = f"{h.__module__}:{h.__qualname__}"
            as_head(h, name)
            out.append(name)
        elif isinstance(h, str):
            out += split_specs([h])
        else:
            raise UserError(f"mimprobe.probe(): heads: {h!r} is neither a head spec nor a GridHead subclass")
    return out


def probe(train: str, eval: str, heads: Sequence | str | type | None = None, **options) -> Results:  # noqa: A002
    """``mimprobe probe TRAIN EVAL``: train every head's grid, choose on train, report on eval. ``heads``: specs
    as ``--head`` takes them, or GridHead subclasses; ``options`` are
    :class:`~mimprobe.probe.options.ProbeOptions`' fields (``lrs=[1e-3]``, ``epochs=5``, ``seeds=[0, 1]``,
    ``shots=10``, ``out="results.jsonl"``, ``save_heads="heads/"``, ...), with the command's defaults."""
    from mimprobe.probe.options import ProbeOptions
    from mimprobe.probe.run import run_probe

    opts = from_kwargs(ProbeOptions, {"heads": _head_specs(heads), **options}, "mimprobe.probe()")
    return Results(run_probe(str(train), str(eval), opts))


def load_results(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> Results:
    """The records of ``probe --out`` files (one path or several), as ``mimprobe report`` reads them."""
    from mimprobe.report import load_results as load

    one = isinstance(paths, (str, os.PathLike))
    return Results(load([os.fspath(paths)] if one else [os.fspath(p) for p in paths]))


# --- your own training loop --------------------------------------------------------------------------------------
class Batch(NamedTuple):
    tokens: torch.Tensor  # float32 (B, T, D)
    labels: torch.Tensor  # int64 (B,), -1 where unknown
    rows: torch.Tensor  # int64 (B,): the store rows


class TokenLoader:
    """Batches of float32 tokens from a store, read the way ``mimprobe probe`` reads them (see
    :func:`token_loader`). Each ``for`` loop over it is one epoch; epochs advance by themselves (or set one with
    :meth:`set_epoch`), and each epoch has its own order, seeded by (seed, epoch)."""

    def __init__(self, store: TokenStore, rows: np.ndarray, batch_size: int, *, shuffle: bool, seed: int,
                 block: int | None, in_memory: bool | None, workers: int, device: str, rank: int, world: int,
                 owns: bool):
        from mimprobe.distributed import DistContext, resolve_device
        from mimprobe.probe.feed import Feeder

        self._store, self._owns = store, owns
        self.device = resolve_device(device)
        arrays = ["tokens" if block is None else store.block_array(block)]
        self.feeder = Feeder(store, rows, batch_size, device=self.device, arrays=arrays, shuffle=shuffle, seed=seed,
                             in_memory=in_memory, workers=workers, ctx=DistContext(rank, world))
        self.rows, self.batch_size = self.feeder.rows, batch_size
        self._next_epoch = 0

    @property
    def in_memory(self) -> bool:
        return self.feeder.in_memory

    @property
    def epoch(self) -> int:
        """The epoch the next ``for`` loop reads."""
        return self._next_epoch

    def set_epoch(self, epoch: int) -> None:
        self._next_epoch = int(epoch)

    def __len__(self) -> int:
        return self.feeder.num_batches()

    def __iter__(self) -> Iterator[Batch]:
        self.feeder.set_epoch(self._next_epoch)
        self._next_epoch += 1
        codec = self._store.codec
        for b in self.feeder:
            # a yielded batch is the caller's: decoding copies the tokens out of the reader's reused buffers,
            # except from a float32 store, whose tokens are copied here
            x = b.decode(codec)[:, 0]
            if x.untyped_storage().data_ptr() == b.x.untyped_storage().data_ptr():
                x = x.clone()
            yield Batch(x, b.y, b.rows)

    def close(self) -> None:
        if self._owns:
            self._store.close()

    def __enter__(self) -> "TokenLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def token_loader(store: str | Store, rows=None, *, batch_size: int = 256, shuffle: bool = True, seed: int = 0,
                 block: int | None = None, in_memory: bool | None = False, workers: int = 0,
                 device: str = "cpu", rank: int = 0, world: int = 1) -> TokenLoader:
    """The probe's reader (:class:`~mimprobe.probe.feed.Feeder`) as an iterable of :class:`Batch` es (float32
    tokens (B, T, D), labels, rows) for your own training loop.

    ``rows``: the store rows to read (default: every valid row); each epoch yields each of them exactly once.
    Streaming (``in_memory=False``, the default) reads whole chunks in a shuffled order and shuffles rows within a
    buffer of chunks, with a reader thread ahead of your loop, or ``workers`` DataLoader worker processes (each
    reads its own chunks; they persist across epochs); ``in_memory=True`` loads the rows once (``None``: when they
    fit, as the probe decides). ``block``: another stored block than the last. ``device``: where batches land
    ("cpu", "cuda", "auto"). ``rank`` / ``world``: this process's share under DistributedDataParallel (streaming:
    every ``world``-th chunk of the epoch's order, so ranks may get a batch more or less than each other; in
    memory: every ``world``-th row); the ranks together read every row once per epoch."""
    if batch_size <= 0:
        raise UserError(f"token_loader: batch_size {batch_size}: must be positive")
    if workers < 0:
        raise UserError(f"token_loader: workers {workers}: must be >= 0")
    if not 0 <= rank < world:
        raise UserError(f"token_loader: rank {rank} of world {world}: need 0 <= rank < world")
    owns = not isinstance(store, Store)
    ts = TokenStore.open(str(store), "r") if owns else store.token_store
    try:
        if rows is None:
            from mimprobe.probe.subsets import usable_rows

            rows = usable_rows(ts, allow_incomplete=True, labelled=False)
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if len(rows) == 0:
            raise UserError(f"token_loader: {ts.path}: no rows to read")
        if rows.min() < 0 or rows.max() >= ts.num_samples:
            raise UserError(f"token_loader: rows out of range ({ts.path} has {ts.num_samples} rows)")
        if len(np.unique(rows)) != len(rows):
            raise UserError("token_loader: rows holds a row more than once; each epoch reads each row once")
        return TokenLoader(ts, rows, batch_size, shuffle=shuffle, seed=seed, block=block, in_memory=in_memory,
                           workers=workers, device=device, rank=rank, world=world, owns=owns)
    except BaseException:
        if owns:
            ts.close()
        raise
