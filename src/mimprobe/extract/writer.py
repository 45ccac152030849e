"""A background thread that writes finished chunks, so the forward pass never waits on the disk."""

from __future__ import annotations

import queue
import threading

import numpy as np
import torch

from mimprobe.cache_store.store import TokenStore


class ChunkWriter:
    """Bounded queue of finished chunks → ``store.write_chunk`` then ``store.mark_done`` (in that order)."""

    def __init__(self, store: TokenStore, max_pending: int = 2):
        self.store = store
        self.q: queue.Queue = queue.Queue(maxsize=max_pending)
        self.error: BaseException | None = None
        self.closed = False
        self.thread = threading.Thread(target=self._run, name="mimprobe-writer", daemon=True)
        self.thread.start()

    def _run(self):
        while True:
            item = self.q.get()
            if item is None:
                return
            if self.error is not None:
                continue  # drain without writing after a failure
            c, arrays, valid = item
            try:
                arrays = {k: torch.cat(v) if isinstance(v, list) else v for k, v in arrays.items()}
                self.store.write_chunk(c, arrays, valid)
                self.store.mark_done(c)
            except BaseException as e:  # re-raised in the main thread
                self.error = e

    def put(self, c: int, arrays: dict[str, torch.Tensor | list[torch.Tensor]], valid: np.ndarray) -> None:
        """Queue chunk ``c`` (per array: a tensor, or the list of its batches in order); blocks when full."""
        self._check()
        self.q.put((c, arrays, valid))

    def close(self) -> None:
        """Wait until every queued chunk is written; raise the writer's error if it had one."""
        self.stop()
        self._check()

    def stop(self) -> None:
        """Let the thread finish the chunks already queued (each flagged done only after its data), then end it.
        Safe to call more than once; the caller closes the store after this, never before."""
        if not self.closed:
            self.closed = True
            self.q.put(None)
            self.thread.join()

    def _check(self):
        if self.error is not None:
            from mimprobe.cache_store.zarr_remote import storage_error

            err = storage_error(self.store.path, self.error, writing=True)
            if err is not None:  # an object store that went away: one line, the finished chunks stay
                raise err from None
            raise self.error
