"""``hf:`` sources: Hugging Face ``datasets`` on this machine, read row by row (never downloaded).

``hf:WHERE[:SPLIT]`` where WHERE is

* a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (memory-mapped as it is);
* a folder of parquet files (the hub layout ``data/train-00000-of-00004.parquet``, or any ``*.parquet``): the
  ``datasets`` parquet loader converts it once into its cache (``HF_DATASETS_CACHE``), as ``load_dataset``
  always does, and later runs reuse that copy;
* a hub dataset id (``ILSVRC/imagenet-1k``, or ``hf://datasets/ILSVRC/imagenet-1k``) that is already on this
  machine: a snapshot in the hub cache (``huggingface-cli download --repo-type dataset ID``) or a dataset that
  ``load_dataset(ID)`` prepared earlier. Offline: a dataset that is not there is one clear error.

The image column is the one ``Image`` feature (or ``--image-column``), the label column the ``ClassLabel``
feature, else a column named ``label``/``labels`` (or ``--label-column``); class names come from the
``ClassLabel`` (integer labels without names get ``"0".."K-1"``, string labels their sorted values). Sample ids
are an ``__key__``/``id``/``image_id`` column when one holds unique values, else the image files' names kept
in the ``Image`` cells (when unique), else ``SPLIT/INDEX`` (the row index in the split: stable as long as the
dataset files are). Only the label and id columns are read up front; images
are fetched one row at a time from the memory-mapped arrow files, in the DataLoader workers.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

import numpy as np
from PIL import Image

from mimprobe.data.images import decode_bytes, load_image
from mimprobe.data.sources import ImageSource
from mimprobe.errors import UserError, first_line

log = logging.getLogger("mimprobe")

ID_COLUMNS = ("__key__", "id", "image_id")
LABEL_COLUMNS = ("label", "labels")


def _datasets():
    try:
        import datasets
    except ImportError:
        raise UserError("hf: sources need the datasets package: pip install 'mimprobe[hf]'") from None
    if not sys.stderr.isatty():
        datasets.disable_progress_bars()
    return datasets


def parse_spec(spec: str) -> tuple[str, str | None]:
    """``hf:WHERE[:SPLIT]`` → (WHERE, SPLIT or None). A trailing ``:NAME`` is a split unless WHERE:NAME exists."""
    body = spec[len("hf:"):]
    if body.startswith("//"):  # hf://datasets/ORG/NAME[:SPLIT]
        body = body[2:]
        if body.startswith("datasets/"):
            body = body[len("datasets/"):]
    if not body:
        raise UserError(f"{spec}: expected hf:FOLDER[:SPLIT] or hf:ORG/NAME[:SPLIT]")
    if ":" in body and not os.path.exists(body):
        where, split = body.rsplit(":", 1)
        if split and "/" not in split:
            return where, split
    return body, None


@dataclass
class HFSource(ImageSource):
    """Rows of one split of a ``datasets.Dataset``: ``load(i)`` reads row ``i`` of the image column only."""

    dataset: object = None  # datasets.Dataset with the image column only, undecoded
    image_column: str = "image"

    def load(self, i: int) -> Image.Image:
        value = self.dataset[int(i)][self.image_column]
        return decode_value(value, self.root)

    def locate(self, i: int) -> str:
        return f"{self.extra['hf_spec']} row {int(i)} (id {self.ids[i]})"


def decode_value(value, root: str) -> Image.Image:
    """An image cell (``{"bytes", "path"}`` struct, raw bytes, or a path) → RGB, fully decoded."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
    elif isinstance(value, (bytes, bytearray, memoryview)):
        data, path = value, None
    elif isinstance(value, str):
        data, path = None, value
    else:
        raise ValueError(f"empty or unsupported image cell ({type(value).__name__})")
    if data is not None:
        return decode_bytes(bytes(data))
    if path:
        return load_image(path if os.path.isabs(path) else os.path.join(root, path))
    raise ValueError("empty image cell (no bytes, no path)")


def _load(where: str, split: str | None, spec: str):
    """(datasets.Dataset of the split, split name, resolved location)."""
    ds_mod = _datasets()
    cache_dir = os.environ.get("HF_DATASETS_CACHE") or None
    if os.path.isdir(where):
        root = os.path.abspath(where)
        saved = any(os.path.exists(os.path.join(root, f)) for f in ("dataset_dict.json", "state.json"))
        try:
            if saved:
                obj = ds_mod.load_from_disk(root)
            else:
                obj = ds_mod.load_dataset(root, cache_dir=cache_dir)
        except (FileNotFoundError, ValueError) as e:
            raise UserError(f"{spec}: cannot read a dataset from {root} ({first_line(e)}); expected a "
                            "save_to_disk folder or a folder of parquet files") from None
        return (*_pick_split(obj, split, spec), root)
    if os.path.exists(where):
        raise UserError(f"{spec}: {where} is a file; hf: takes a save_to_disk folder, a folder of parquet files "
                        "or a hub dataset id")
    if where.count("/") != 1 or where.startswith((".", "/")):
        raise UserError(f"{spec}: no such folder, and {where!r} is not a hub dataset id (ORG/NAME)")
    return (*_from_hub_cache(ds_mod, where, split, spec, cache_dir), where)


def _pick_split(obj, split: str | None, spec: str):
    if not hasattr(obj, "keys"):  # a Dataset saved alone: one split
        name = obj.split and str(obj.split)
        if split is not None and name and split != name:
            raise UserError(f"{spec}: this dataset is the single split {name!r}, not {split!r}")
        return obj, split or name or "train"
    splits = list(obj.keys())
    if split is None:
        if len(splits) == 1:
            split = splits[0]
        elif "train" in splits:
            split = "train"
        else:
            raise UserError(f"{spec}: several splits ({', '.join(splits)}); name one, e.g. {spec}:{splits[0]}")
    if split not in splits:
        raise UserError(f"{spec}: no split {split!r} (splits: {', '.join(splits)})")
    return obj[split], split


def _from_hub_cache(ds_mod, repo_id: str, split: str | None, spec: str, cache_dir: str | None):
    """A hub dataset that is on this machine already: prepared by ``load_dataset`` (datasets cache) or
    downloaded (hub cache snapshot). Never goes to the network."""
    from datasets import config as ds_config

    offline = ds_config.HF_HUB_OFFLINE
    ds_config.HF_HUB_OFFLINE = True  # datasets then only looks in its cache
    try:
        obj = ds_mod.load_dataset(repo_id, cache_dir=cache_dir)
        return _pick_split(obj, split, spec)
    except UserError:
        raise
    except Exception:  # noqa: BLE001 - not prepared in the datasets cache: try the hub cache below
        pass
    finally:
        ds_config.HF_HUB_OFFLINE = offline
    try:
        from huggingface_hub import snapshot_download

        snap = snapshot_download(repo_id, repo_type="dataset", local_files_only=True,
                                 cache_dir=os.environ.get("HF_HUB_CACHE") or None)
    except Exception:  # noqa: BLE001 - LocalEntryNotFoundError and friends: not downloaded
        snap = None
    if snap is None or not os.path.isdir(snap):
        raise UserError(f"{spec}: the dataset {repo_id!r} is not in the local Hugging Face cache and mimprobe never "
                        f"downloads; fetch it first (huggingface-cli download --repo-type dataset {repo_id}) or "
                        "give its folder")
    try:
        obj = ds_mod.load_dataset(snap, cache_dir=cache_dir)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"{spec}: cannot read the cached snapshot {snap} ({first_line(e)})") from None
    return _pick_split(obj, split, spec)


def _column_kind(feature) -> str:
    """'image', 'classlabel', 'int', 'str', 'bytes', or the feature's type name."""
    from datasets import ClassLabel, Image as ImageFeature, Value

    if isinstance(feature, ImageFeature):
        return "image"
    if isinstance(feature, ClassLabel):
        return "classlabel"
    if isinstance(feature, Value):
        d = feature.dtype
        if d.startswith(("int", "uint")):
            return "int"
        if d in ("string", "large_string"):
            return "str"
        if d in ("binary", "large_binary"):
            return "bytes"
        return d
    if isinstance(feature, dict) and {"bytes", "path"} <= set(feature):
        return "image"
    return type(feature).__name__


def _pick_image_column(features, named: str | None, spec: str) -> str:
    cols = list(features)
    if named is not None:
        if named not in features:
            raise UserError(f"{spec}: no column {named!r} (columns: {', '.join(cols)}); fix --image-column")
        kind = _column_kind(features[named])
        if kind not in ("image", "bytes", "str"):
            raise UserError(f"{spec}: column {named!r} holds {kind} values, not images; fix --image-column")
        return named
    images = [c for c in cols if _column_kind(features[c]) == "image"]
    if len(images) == 1:
        return images[0]
    if not images:
        raise UserError(f"{spec}: no Image column (columns: {', '.join(cols)}); name it with --image-column")
    raise UserError(f"{spec}: several Image columns ({', '.join(images)}); choose one with --image-column")


def _labels(ds, features, named: str | None, spec: str):
    """(label column or None, labels int64, class names)."""
    n = len(ds)
    if named is not None:
        if named not in features:
            raise UserError(f"{spec}: no column {named!r} (columns: {', '.join(features)}); fix --label-column")
        col = named
    else:
        cls = [c for c in features if _column_kind(features[c]) == "classlabel"]
        if len(cls) > 1:
            raise UserError(f"{spec}: several ClassLabel columns ({', '.join(cls)}); choose one with --label-column")
        col = cls[0] if cls else next((c for c in LABEL_COLUMNS if c in features), None)
        if col is None:
            log.info("%s: no ClassLabel or label column: samples are unlabelled (name one with --label-column)", spec)
            return None, np.full(n, -1, np.int64), []
    kind = _column_kind(features[col])
    values = ds.data.column(col)
    if kind == "classlabel":
        labels = np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.int64)
        return col, labels, list(features[col].names)
    if kind == "int":
        arr = values.to_numpy(zero_copy_only=False)
        labels = np.where(np.isnan(arr.astype(np.float64)), -1, arr).astype(np.int64) if arr.dtype.kind == "f" \
            else np.asarray(arr, dtype=np.int64)
        top = int(labels.max()) if n else -1
        return col, labels, [str(i) for i in range(top + 1)]
    if kind == "str":
        raw = values.to_pylist()
        names = sorted({v for v in raw if v not in (None, "")})
        index = {v: i for i, v in enumerate(names)}
        return col, np.asarray([index.get(v, -1) for v in raw], np.int64), names
    raise UserError(f"{spec}: label column {col!r} holds {kind} values; labels must be ClassLabel, integers or "
                    "strings (fix --label-column)")


def _ids(ds, features, split: str, img_col: str) -> tuple[str | None, list[str]]:
    """(where the ids come from, ids): an id column, else the image files' own names when the dataset kept
    them (the ``path`` of an ``Image`` cell: e.g. ImageNet file names, which subset lists use), else SPLIT/INDEX.
    Only unique, non-empty values qualify."""
    n = len(ds)
    for col in ID_COLUMNS:
        if col in features and _column_kind(features[col]) in ("str", "int"):
            raw = ds.data.column(col).to_pylist()
            ids = [str(v) for v in raw]
            if None not in raw and len(set(ids)) == n:
                return col, ids
            log.info("%s column %r is not a unique id: using %s/INDEX ids", split, col, split)
    if _column_kind(features[img_col]) == "image":
        import pyarrow as pa

        col = ds.data.column(img_col)  # only the path child is touched, not the image bytes
        if pa.types.is_struct(col.type) and col.type.get_field_index("path") >= 0:
            paths = [p for chunk in col.chunks for p in chunk.field("path").to_pylist()]
            if all(paths) and len(set(paths)) == n:
                return f"{img_col}.path", paths
    return None, [f"{split}/{i}" for i in range(n)]


def hf_source(spec: str, image_column: str | None = None, label_column: str | None = None) -> ImageSource:
    where, split = parse_spec(spec)
    ds, split, root = _load(where, split, spec)
    features = ds.features
    img_col = _pick_image_column(features, image_column, spec)
    lab_col, labels, class_names = _labels(ds, features, label_column, spec)
    id_col, ids = _ids(ds, features, split, img_col)
    view = ds.select_columns([img_col])
    if _column_kind(features[img_col]) == "image":
        from datasets import Image as ImageFeature

        view = view.cast_column(img_col, ImageFeature(decode=False))  # bytes + path; we decode (and catch) it
    view = view.with_format(None)
    extra = {"hf_spec": spec, "image_column": img_col, "label_column": lab_col, "id_column": id_col}
    return HFSource("hf", root, ids, labels, class_names, split=split, extra=extra, dataset=view,
                    image_column=img_col)
