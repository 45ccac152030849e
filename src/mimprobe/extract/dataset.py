"""The torch Dataset the extraction loop reads: row → preprocessed views of that row's sample.

Decoding happens here, in DataLoader workers. A sample that cannot be decoded is returned as zeros with
``ok=False`` and the reason, so the main process decides (stop with a clear error, or ``--skip-bad``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from mimprobe.data.sources import ImageSource
from mimprobe.data.transforms import eval_transform, seeded, view_seed, view_transform
from mimprobe.errors import reason


class ExtractDataset(Dataset):
    def __init__(self, source: ImageSource, row_to_sample: np.ndarray, data_config: dict, views: int = 0,
                 seed: int = 0):
        self.source = source
        self.row_to_sample = np.asarray(row_to_sample)
        self.transform = eval_transform(data_config)
        self.view_tf = view_transform(data_config) if views else None
        self.views = views
        self.seed = seed
        self.shape = (1 + views, *data_config["input_size"])

    def __len__(self) -> int:
        return len(self.row_to_sample)

    def __getitem__(self, row: int) -> dict:
        i = int(self.row_to_sample[row])
        try:
            img = self.source.load(i)
            x = [self.transform(img)]
            for v in range(self.views):
                x.append(seeded(self.view_tf, img, view_seed(self.seed, i, v)))
            return {"x": torch.stack(x), "ok": True, "reason": "", "row": row}
        except Exception as e:  # any decode failure: PIL raises OSError, ValueError, SyntaxError, ...
            return {"x": torch.zeros(self.shape), "ok": False, "reason": reason(e), "row": row}


@dataclass
class ChunkPlan:
    """What one process computes: ``batches`` of rows, and which chunks of them it writes."""

    batches: list[list[int]]
    write: set[int]
    chunk_rows: int

    @property
    def num_rows(self) -> int:
        return sum(len(b) for b in self.batches)


def plan_chunks(done: np.ndarray, chunk_rows: int, num_samples: int, batch_size: int, rank: int = 0,
                world: int = 1) -> ChunkPlan:
    """Batches over the chunks this rank owns and that are not done yet.

    Chunks form fixed groups of ``max(1, batch_size // chunk_rows)`` consecutive chunks; a batch never straddles
    a group, and a group with any chunk left is computed whole (its done chunks are not rewritten). So every
    chunk is always computed in the same batch whichever chunks were already done, whatever the number of
    processes: a resumed store is bitwise equal to an uninterrupted one. Rank r owns groups r, r+W, ...
    """
    n_chunks = len(done)
    g = max(1, batch_size // chunk_rows)
    groups = [range(j, min(j + g, n_chunks)) for j in range(0, n_chunks, g)][rank::world]
    batches, write = [], set()
    for grp in groups:
        left = [c for c in grp if not done[c]]
        if not left:
            continue
        write.update(left)
        a, b = grp[0] * chunk_rows, min((grp[-1] + 1) * chunk_rows, num_samples)
        batches += [list(range(s, min(s + batch_size, b))) for s in range(a, b, batch_size)]
    return ChunkPlan(batches, write, chunk_rows)
