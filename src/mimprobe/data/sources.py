"""Image sources: where the samples, their labels and their ids come from.

A DATA argument is one of

* a directory: ImageFolder layout (one subfolder per class, sorted names = label order); a folder of images
  with no class subfolders is read as unlabelled (label -1);
* a ``.csv`` file with a ``path,label`` header; paths relative to the CSV's folder, labels strings or integers
  (empty = unknown);
* ``torchvision:NAME:ROOT[:SPLIT]``: a torchvision dataset already present under ROOT (never downloaded);
* ``demo[:SPLIT[:N[:SEED]]]``: the built-in procedural dataset (:mod:`mimprobe.data.demo`);
* ``hf:FOLDER[:SPLIT]`` or ``hf:ORG/NAME[:SPLIT]``: a Hugging Face dataset on this machine (``save_to_disk``
  folder, parquet folder, or hub cache; never downloaded) (:mod:`mimprobe.data.hf`, extra ``mimprobe[hf]``);
* ``wds:SHARDS``: WebDataset tar shards, brace patterns allowed, e.g. ``wds:/data/in1k-{000000..001023}.tar``
  (:mod:`mimprobe.data.wds`, extra ``mimprobe[wds]``).

``image_column`` / ``label_column`` name the image and label columns of an ``hf:`` dataset, or the image and
label keys (extensions) of a ``wds:`` sample (default: detected; ``cls`` for WebDataset labels).
"""

from __future__ import annotations

import csv
import hashlib
import inspect
import os
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from mimprobe.data.images import load_image, to_rgb
from mimprobe.errors import UserError, first_line

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


@dataclass
class ImageSource:
    """A list of samples: ``ids[i]`` (stable string id), ``labels[i]`` (int, -1 = unknown), ``load(i)`` (RGB)."""

    kind: str
    root: str
    ids: list[str]
    labels: np.ndarray
    class_names: list[str]
    split: str | None = None
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, i: int) -> Image.Image:
        return load_image(os.path.join(self.root, self.ids[i]))

    def read_bytes(self, i: int) -> bytes | None:
        """The encoded file of sample ``i`` (for decoding elsewhere, e.g. on the GPU), or None where this
        source only hands out decoded images (then :meth:`load` it)."""
        if type(self).load is not ImageSource.load:  # a subclass that loads its own way
            return None
        with open(os.path.join(self.root, self.ids[i]), "rb") as f:
            return f.read()

    def locate(self, i: int) -> str:
        """Where sample ``i`` comes from, for error messages."""
        return os.path.join(self.root, self.ids[i])

    def content_hash(self, rows: np.ndarray | None = None) -> str:
        h = hashlib.sha256()
        h.update("\x1f".join(self.class_names).encode())
        idx = range(len(self)) if rows is None else rows
        for i in idx:
            h.update(f"\n{self.ids[i]}\t{int(self.labels[i])}".encode())
        return h.hexdigest()

    def describe(self) -> dict:
        return {
            "source": self.kind,
            "root": self.root,
            "split": self.split,
            "class_names": list(self.class_names),
            "num_classes": len(self.class_names),
            "num_available": len(self),
            **self.extra,
        }


@dataclass
class _TorchvisionSource(ImageSource):
    dataset: object = None

    def load(self, i):
        img = self.dataset[i][0]
        if not isinstance(img, Image.Image):
            img = Image.fromarray(np.asarray(img))
        return to_rgb(img)

    def locate(self, i):
        return f"{self.root} (torchvision {self.extra['torchvision_name']} index {i})"


def seeded_rows(n_available: int, seed: int, limit: int | None = None) -> np.ndarray:
    """Dataset indices in a seeded random permutation (its first ``limit``): row r of a store holds sample
    ``rows[r]``, and analyses with the same ``--limit`` / ``--seed`` read the same images."""
    if limit is not None and limit <= 0:
        raise UserError(f"--limit {limit}: must be positive")
    perm = np.random.default_rng(seed).permutation(n_available)
    return perm[:limit] if limit is not None else perm


def open_source(spec: str, image_column: str | None = None, label_column: str | None = None) -> ImageSource:
    """Parse a DATA argument (see the module doc) into an :class:`ImageSource` with at least one sample."""
    source = _open(str(spec), image_column, label_column)
    if len(source) == 0:
        raise UserError(f"{spec}: the dataset is empty")
    return source


def _open(spec: str, image_column: str | None, label_column: str | None) -> ImageSource:
    if spec.startswith("hf:"):
        from mimprobe.data.hf import hf_source

        return hf_source(spec, image_column=image_column, label_column=label_column)
    if spec.startswith("wds:"):
        from mimprobe.data.wds import wds_source

        return wds_source(spec, image_key=image_column, label_key=label_column)
    if image_column is not None or label_column is not None:
        raise UserError(f"{spec}: --image-column / --label-column apply to hf: and wds: sources only")
    if spec.startswith("torchvision:"):
        return _torchvision(spec)
    if spec == "demo" or spec.startswith("demo:"):
        from mimprobe.data.demo import demo_source

        return demo_source(spec)
    if not os.path.exists(spec):
        raise UserError(f"{spec}: no such file or directory (DATA is an image folder, a .csv, "
                        "torchvision:NAME:ROOT[:SPLIT], hf:DATASET[:SPLIT], wds:SHARDS or demo)")
    if os.path.isdir(spec):
        return _image_folder(spec)
    if spec.lower().endswith(".csv"):
        return _csv(spec)
    raise UserError(f"{spec}: not a folder or a .csv file")


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS) and not name.startswith(".")


def _image_folder(root: str) -> ImageSource:
    root = os.path.abspath(root)
    entries = sorted(os.scandir(root), key=lambda e: e.name)
    classes = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
    ids, labels = [], []
    for ci, cname in enumerate(classes):
        for dirpath, dirnames, files in os.walk(os.path.join(root, cname), followlinks=True):
            dirnames.sort()
            for f in sorted(files):
                if _is_image(f):
                    ids.append(os.path.relpath(os.path.join(dirpath, f), root))
                    labels.append(ci)
    if not ids:
        flat = [e.name for e in entries if e.is_file() and _is_image(e.name)]
        if not flat:
            raise UserError(f"{root}: no images found (expected class subfolders of {', '.join(IMG_EXTENSIONS[:4])}... files)")
        return ImageSource("folder", root, flat, np.full(len(flat), -1, np.int64), [])
    empty = [c for ci, c in enumerate(classes) if ci not in set(labels)]
    if empty:
        raise UserError(f"{root}: class folder(s) with no images: {', '.join(empty[:5])}; remove them or add images")
    return ImageSource("imagefolder", root, ids, np.asarray(labels, np.int64), classes)


def _csv(path: str) -> ImageSource:
    root = os.path.dirname(os.path.abspath(path))
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "path" not in reader.fieldnames:
            raise UserError(f"{path}: needs a header with a 'path' column (and optionally 'label')")
        rows = [(r["path"], (r.get("label") or "").strip()) for r in reader]
    if not rows:
        raise UserError(f"{path}: no rows")
    raw = [lab for _, lab in rows]
    known = sorted({lab for lab in raw if lab != ""})
    if known and all(lab.lstrip("-").isdigit() for lab in known):
        labels = [int(lab) if lab != "" else -1 for lab in raw]
        class_names = [str(i) for i in range(max(labels) + 1)] if max(labels) >= 0 else []
    else:
        index = {name: i for i, name in enumerate(known)}
        labels = [index[lab] if lab != "" else -1 for lab in raw]
        class_names = known
    ids = [p for p, _ in rows]
    return ImageSource("csv", root, ids, np.asarray(labels, np.int64), class_names, extra={"csv": os.path.abspath(path)})


def _torchvision(spec: str) -> ImageSource:
    parts = spec.split(":")
    if len(parts) not in (3, 4) or not parts[1] or not parts[2]:
        raise UserError(f"{spec}: expected torchvision:NAME:ROOT[:SPLIT], e.g. torchvision:CIFAR10:/data/cifar:test")
    _, name, root = parts[:3]
    split = parts[3] if len(parts) == 4 else "train"
    import torchvision.datasets as tvd

    cls = getattr(tvd, name, None)
    if not inspect.isclass(cls):
        raise UserError(f"{spec}: torchvision has no dataset named {name!r}")
    params = inspect.signature(cls.__init__).parameters
    kwargs = {}
    if "split" in params:
        kwargs["split"] = split
    elif "train" in params:
        if split not in ("train", "test", "val"):
            raise UserError(f"{spec}: {name} has only train/test splits")
        kwargs["train"] = split == "train"
    if "download" in params:
        kwargs["download"] = False
    try:
        ds = cls(root, **kwargs)
    except (RuntimeError, FileNotFoundError, ValueError, OSError) as e:
        raise UserError(f"{spec}: cannot read {name} from {root} ({first_line(e)}); "
                        "mimprobe never downloads: put the dataset there first") from None
    labels = None
    for attr in ("targets", "labels", "_labels", "y", "_targets"):
        v = getattr(ds, attr, None)
        if v is not None and len(v) == len(ds):
            labels = np.asarray(v, dtype=np.int64).reshape(-1)
            break
    if labels is None:
        labels = np.asarray([int(ds[i][1]) for i in range(len(ds))], dtype=np.int64)
    classes = [str(c) for c in getattr(ds, "classes", [])] or [str(i) for i in range(int(labels.max()) + 1)]
    return _TorchvisionSource("torchvision", os.path.abspath(root), [str(i) for i in range(len(ds))], labels,
                              classes, split=split, extra={"torchvision_name": name}, dataset=ds)
