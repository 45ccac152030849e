"""The torch Dataset the extraction loop reads: row → preprocessed views of that row's sample.

Decoding happens here, in DataLoader workers. A sample that cannot be decoded is returned as zeros with
``ok=False`` and the reason, so the main process decides (stop with a clear error, or ``--skip-bad``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from mimprobe.data.sources import ImageSource
from mimprobe.data.transforms import eval_transform, seeded, view_seed, view_transform


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
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'}"
            return {"x": torch.zeros(self.shape), "ok": False, "reason": reason, "row": row}


def chunk_batches(chunks: list[tuple[int, int, int]], batch_size: int) -> list[list[int]]:
    """Batches of rows that never straddle a chunk: ``chunks`` is a list of (chunk, start, stop).

    Keeping batches inside chunks makes every chunk's computation identical whichever chunks were already
    done, which is what makes a resumed store bitwise equal to an uninterrupted one.
    """
    out = []
    for _c, a, b in chunks:
        for s in range(a, b, batch_size):
            out.append(list(range(s, min(s + batch_size, b))))
    return out
