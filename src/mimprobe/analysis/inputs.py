"""Which images an analysis reads, and their preprocessed batches."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

from mimprobe.data.sources import ImageSource
from mimprobe.errors import UserError
from mimprobe.extract.dataset import ExtractDataset


def image_batches(source: ImageSource, rows: np.ndarray, data_config: dict, batch_size: int,
                  workers: int = 0) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """(dataset indices, eval-transformed images (B, 3, H, W)) in the order of ``rows``; an image that cannot be
    decoded is a :class:`UserError` naming it."""
    if batch_size <= 0:
        raise UserError(f"--batch-size {batch_size}: must be positive")
    rows = np.asarray(rows)
    loader = DataLoader(ExtractDataset(source, rows, data_config), batch_size=batch_size, shuffle=False,
                        num_workers=workers)
    for batch in loader:
        r = batch["row"].numpy()
        for j, good in enumerate(batch["ok"].tolist()):
            if not good:
                raise UserError(f"{source.locate(int(rows[r[j]]))}: cannot decode image ({batch['reason'][j]}); "
                                "fix or remove it")
        yield rows[r], batch["x"][:, 0]
