"""The torch Dataset the extraction loop reads: row → preprocessed views of that row's sample.

Decoding happens here, in DataLoader workers. A sample that cannot be decoded is returned as zeros with
``ok=False`` and the reason, so the main process decides (stop with a clear error, or ``--skip-bad``).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from mimprobe.data.images import decode_bytes, drafting
from mimprobe.data.sources import ImageSource
from mimprobe.data.transforms import (DECODE_MODES, TensorEvalTransform, eval_transform, resize_target, seeded,
                                      view_seed, view_transform)
from mimprobe.errors import UserError, reason


JPEG = b"\xff\xd8"
# what an inexact decoding does to the tokens, as measured (benchmarks/decode.py); kept in the store's attrs
DECODE_NOTES = {
    "draft": "JPEGs at least twice the resize target decoded at 1/2-1/8 size in the DCT (PIL draft), then timm's "
             "transform: not timm's pixels. Measured (benchmarks/decode.py, 2 vCPU): 2.4x faster per core on "
             "1600x1200 JPEGs, last-block tokens off by 4.5e-2 relative mean abs (fp16 rounding: 4.9e-4); probe "
             "top-1 28.8 vs 28.8 (random-init vit_tiny, CIFAR-10 enlarged to 800x600, 1000/250 images); images "
             "under twice the target (most of ImageNet at 224 px) are decoded exactly",
    "gpu": "torchvision.io.decode_jpeg on the extraction device + torchvision's antialiased tensor resize: close "
           "to timm's PIL preprocessing, not equal. Measured on the CPU path (benchmarks/decode.py): tokens off "
           "by 5-7e-3 relative mean abs (fp16 rounding: 4.9e-4)",
}


def preprocessing_attrs(data_config: dict, decode: str = "pil") -> dict:
    """The store's ``preprocessing`` attrs: timm's data config, plus the decoding when it is not timm's own (so
    stores decoded differently are never probed together or resumed into one another)."""
    if decode == "pil":
        return data_config
    return dict(data_config, decode=decode, decode_note=DECODE_NOTES[decode])


class ExtractDataset(Dataset):
    """``decode`` (see :mod:`mimprobe.data.transforms`): ``"pil"`` (timm's own preprocessing, exact),
    ``"draft"`` (reduced-size DCT decoding of large JPEGs), or ``"gpu"``: items then carry the encoded JPEG
    bytes (or, for other formats and sources that only hand out decoded images, the RGB pixels as a uint8
    tensor), batches are lists (:meth:`collate`), and :meth:`to_device` decodes and preprocesses them on the
    extraction device."""

    def __init__(self, source: ImageSource, row_to_sample: np.ndarray, data_config: dict, views: int = 0,
                 seed: int = 0, decode: str = "pil"):
        if decode not in DECODE_MODES:
            raise UserError(f"--decode {decode}: choose one of {', '.join(DECODE_MODES)}")
        if decode == "gpu" and views:
            raise UserError("--decode gpu does not make --views (training views are drawn on the CPU); use "
                            "--decode pil with --views")
        self.source = source
        self.row_to_sample = np.asarray(row_to_sample)
        self.transform = eval_transform(data_config)
        self.view_tf = view_transform(data_config) if views else None
        self.views = views
        self.seed = seed
        self.decode = decode
        self.draft = resize_target(data_config) if decode == "draft" else None
        self.data_config = data_config
        self.shape = (1 + views, *data_config["input_size"])
        self._tensor_tf = None
        if decode == "gpu":
            self.collate = _collate_encoded

    def __len__(self) -> int:
        return len(self.row_to_sample)

    def __getitem__(self, row: int) -> dict:
        i = int(self.row_to_sample[row])
        try:
            if self.decode == "gpu":
                return self._encoded(i, row)
            if self.draft is not None:
                with drafting(self.draft):
                    img = self.source.load(i)
            else:
                img = self.source.load(i)
            x = [self.transform(img)]
            for v in range(self.views):
                x.append(seeded(self.view_tf, img, view_seed(self.seed, i, v)))
            return {"x": torch.stack(x), "ok": True, "reason": "", "row": row}
        except Exception as e:  # any decode failure: PIL raises OSError, ValueError, SyntaxError, ...
            if self.decode == "gpu":
                return {"data": torch.zeros(0, dtype=torch.uint8), "jpeg": False, "ok": False,
                        "reason": reason(e), "row": row}
            return {"x": torch.zeros(self.shape), "ok": False, "reason": reason(e), "row": row}

    # --- --decode gpu ---------------------------------------------------------------------------------------
    def _encoded(self, i: int, row: int) -> dict:
        """A worker's share of GPU decoding: read the file; check a JPEG's header (PIL parses it without
        decoding) and its end marker (a truncated file has none), so a broken file is caught here, as
        ``pil`` would catch it; anything that is not a baseline/progressive 3- or 1-channel JPEG is decoded here
        instead and travels as pixels."""
        data = self.source.read_bytes(i)
        if data is not None and data[:2] == JPEG:
            with Image.open(io.BytesIO(data)) as img:
                mode = img.mode
            if not data.rstrip(b"\0").endswith(b"\xff\xd9"):
                raise OSError("image file is truncated (no JPEG end marker)")
            if mode in ("RGB", "L"):
                return {"data": torch.frombuffer(bytearray(data), dtype=torch.uint8), "jpeg": True, "ok": True,
                        "reason": "", "row": row}
        img = self.source.load(i) if data is None else decode_bytes(data)
        pixels = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
        return {"data": pixels, "jpeg": False, "ok": True, "reason": "", "row": row}

    def to_device(self, batch: dict, device: torch.device) -> torch.Tensor:
        """The batch's model inputs (B, 1 + views, 3, H, W) on ``device``. For ``gpu``: decodes the JPEGs of the
        batch in one ``decode_jpeg`` call on ``device``, then resizes, crops and normalizes each image there;
        an image the device cannot decode is decoded on the CPU (PIL), one it cannot decode either is marked
        in ``batch["ok"]`` / ``batch["reason"]`` and given zeros."""
        if self.decode != "gpu":
            return batch["x"].to(device, non_blocking=True)
        import warnings

        with warnings.catch_warnings():  # torchvision 0.29 deprecates its image I/O in favour of TorchCodec
            warnings.simplefilter("ignore", DeprecationWarning)
            from torchvision.io import ImageReadMode, decode_jpeg as _decode

        def decode_jpeg(*a, **k):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                return _decode(*a, **k)

        if self._tensor_tf is None:
            self._tensor_tf = TensorEvalTransform(self.data_config)
        data, jpeg, ok = batch["data"], batch["jpeg"], batch["ok"]
        imgs: list[torch.Tensor | None] = [None] * len(data)
        enc = [k for k in range(len(data)) if ok[k] and jpeg[k]]
        if enc:
            try:
                out = decode_jpeg([data[k] for k in enc], mode=ImageReadMode.RGB, device=device)
            except RuntimeError:  # one bad image fails the whole batch: decode one by one
                out = []
                for k in enc:
                    try:
                        out.append(decode_jpeg(data[k], mode=ImageReadMode.RGB, device=device))
                    except RuntimeError:
                        out.append(None)
            for k, img in zip(enc, out):
                if img is None:
                    try:
                        pil = decode_bytes(data[k].numpy().tobytes())
                        img = torch.from_numpy(np.asarray(pil, dtype=np.uint8).copy()).permute(2, 0, 1)
                    except Exception as e:
                        ok[k], batch["reason"][k] = False, reason(e)
                        continue
                imgs[k] = img
        for k in range(len(data)):
            if ok[k] and not jpeg[k]:
                imgs[k] = data[k]
        shape = self.shape[1:]
        x = torch.stack([self._tensor_tf(img.to(device, non_blocking=True)) if img is not None
                         else torch.zeros(shape, device=device) for img in imgs])
        return x.unsqueeze(1)


def _collate_encoded(items: list[dict]) -> dict:
    """A batch of ``--decode gpu`` items: encoded files of different lengths stay a list."""
    return {"data": [it["data"] for it in items], "jpeg": [it["jpeg"] for it in items],
            "ok": torch.tensor([it["ok"] for it in items]), "reason": [it["reason"] for it in items],
            "row": torch.tensor([it["row"] for it in items])}


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
