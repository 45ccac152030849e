"""``wds:`` sources: WebDataset tar shards, read by random access through an index of their members.

``wds:/data/in1k-train-{000000..001023}.tar`` (brace patterns and ``::``-joined lists, expanded as webdataset
does). A sample is the run of consecutive members sharing a ``__key__`` (webdataset's convention: the member
name up to the first dot of its base name); its image is the member with extension jpg, jpeg, png or webp (or
``--image-column EXT``), its label the ``cls`` member (or ``--label-column EXT``), its id the ``__key__``
(``SHARD/__key__`` when keys repeat across shards,
SHARD relative to the shards' common folder).

Why not webdataset's streaming pipeline: extraction reads rows in a seeded permutation of the whole dataset,
torchrun ranks own interleaved chunks and a resumed run computes only the chunks not done, each in the very
same batch as before (bitwise-equal stores). All of that needs sample ``i`` on demand. So each shard's tar
headers are scanned once (seeking over the data; only the small label members are read) into an index
key → (offset, size) of the image member, cached per shard (keyed by path, size and mtime) under
``$MIMPROBE_CACHE/wds-index`` (default ``~/.cache/mimprobe``); a worker then reads one image with one seek + read.
The webdataset package provides the conventions (URL expansion, key splitting), so shards that its pipelines
read are read the same way here. Shards must be local, uncompressed ``.tar`` files.

A shard cut short (a copy interrupted) is one clear error; a member that does not decode is an undecodable
image like any other (``--skip-bad`` records and skips it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image

from mimprobe.data.images import decode_bytes
from mimprobe.data.sources import ImageSource
from mimprobe.errors import UserError

log = logging.getLogger("mimprobe")

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
LABEL_KEY = "cls"
INDEX_VERSION = 1
MAX_LABEL_BYTES = 4096
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta: members such as __index__ are not samples


class ShardError(UserError):
    pass


def _webdataset():
    try:
        from webdataset.shardlists import expand_urls
        from webdataset.tariterators import base_plus_ext
    except ImportError:
        raise UserError("wds: sources need the webdataset package: pip install 'mimprobe[wds]'") from None
    return expand_urls, base_plus_ext


def cache_dir() -> str:
    root = os.environ.get("MIMPROBE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "mimprobe")
    return os.path.join(root, "wds-index")


@dataclass
class ShardIndex:
    """The samples of one shard: keys, image member (offset, size, extension or ''), raw label text or None."""

    keys: list[str]
    offsets: np.ndarray
    sizes: np.ndarray
    exts: list[str]
    labels: list[str | None]


def scan_shard(path: str, image_key: str | None, label_key: str, base_plus_ext) -> ShardIndex:
    """Read the tar headers of ``path`` (seeking over member data) into a :class:`ShardIndex`."""
    want_img = (image_key.lower(),) if image_key else IMAGE_KEYS
    keys, offsets, sizes, exts, labels = [], [], [], [], []
    size = os.path.getsize(path)
    cur = None  # the sample being assembled: [key, offset, size, ext, label]

    def close():
        if cur is not None:
            keys.append(cur[0])
            offsets.append(cur[1])
            sizes.append(cur[2])
            exts.append(cur[3])
            labels.append(cur[4])

    try:
        with open(path, "rb") as f:
            try:
                tf = tarfile.open(fileobj=f, mode="r:")
            except tarfile.ReadError as e:
                raise ShardError(f"{path}: not a readable tar shard ({e}): truncated, compressed or not a tar "
                                 "file (shards are read by offset, so they must be plain .tar files)") from None
            while True:
                m = tf.next()
                if m is None:
                    break
                if not m.isfile() or _META.search(m.name):
                    continue
                key, ext = base_plus_ext(m.name)
                if key is None:
                    continue
                ext = ext.lower()
                if m.offset_data + m.size > size:
                    raise ShardError(f"{path}: truncated shard (member {m.name} ends past the end of the file); "
                                     "copy the shard again, or leave it out of the pattern")
                if cur is None or cur[0] != key:
                    close()
                    cur = [key, -1, 0, "", None]
                if ext in want_img and (not cur[3] or want_img.index(ext) < want_img.index(cur[3])):
                    cur[1], cur[2], cur[3] = m.offset_data, m.size, ext
                elif ext == label_key and m.size <= MAX_LABEL_BYTES:
                    pos = f.tell()
                    f.seek(m.offset_data)
                    cur[4] = f.read(m.size).decode("utf-8", "replace").strip()
                    f.seek(pos)
            close()
            # tarfile stops quietly at a cut-off header; a complete archive ends with zero blocks
            f.seek(tf.offset)
            end = f.read(tarfile.BLOCKSIZE)
            if len(end) < tarfile.BLOCKSIZE or end.count(0) != tarfile.BLOCKSIZE:
                raise ShardError(f"{path}: truncated shard (no end-of-archive block after {len(keys)} samples); "
                                 "copy the shard again, or leave it out of the pattern")
    except tarfile.ReadError as e:
        raise ShardError(f"{path}: truncated or corrupt shard ({e}); copy the shard again, or leave it out of the "
                         "pattern") from None
    return ShardIndex(keys, np.asarray(offsets, np.int64), np.asarray(sizes, np.int64), exts, labels)


def _cache_file(path: str, image_key: str | None, label_key: str) -> str:
    st = os.stat(path)
    ident = json.dumps([INDEX_VERSION, os.path.abspath(path), st.st_size, st.st_mtime_ns, image_key, label_key])
    return os.path.join(cache_dir(), hashlib.sha256(ident.encode()).hexdigest()[:32] + ".npz")


def _blob(strings: list[str | None]) -> np.ndarray:
    return np.frombuffer(json.dumps(strings).encode(), np.uint8)


def _unblob(a: np.ndarray) -> list:
    return json.loads(a.tobytes().decode())


def shard_index(path: str, image_key: str | None, label_key: str, base_plus_ext) -> ShardIndex:
    """:func:`scan_shard`, cached per shard (path, size, mtime, keys)."""
    cf = _cache_file(path, image_key, label_key)
    if os.path.exists(cf):
        try:
            with np.load(cf, allow_pickle=False) as z:
                return ShardIndex(_unblob(z["keys"]), z["offsets"], z["sizes"], _unblob(z["exts"]),
                                  _unblob(z["labels"]))
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache entry: scan again
    idx = scan_shard(path, image_key, label_key, base_plus_ext)
    try:
        os.makedirs(os.path.dirname(cf), exist_ok=True)
        tmp = f"{cf}.{os.getpid()}.tmp.npz"
        np.savez(tmp, keys=_blob(idx.keys), offsets=idx.offsets, sizes=idx.sizes, exts=_blob(idx.exts),
                 labels=_blob(idx.labels))
        os.replace(tmp, cf)
    except OSError as e:  # a read-only home: the index is simply not kept
        log.debug("wds index cache not written (%s)", e)
    return idx


@dataclass
class WdsSource(ImageSource):
    """Samples of local tar shards; ``load(i)`` reads one image member by offset."""

    shards: list[str] = None
    shard_of: np.ndarray = None
    offsets: np.ndarray = None
    sizes: np.ndarray = None
    exts: list[str] = None
    keys: list[str] = None

    def load(self, i: int) -> Image.Image:
        i = int(i)
        if not self.exts[i]:
            raise ValueError(f"no image member (looked for .{', .'.join(self.extra['image_keys'])})")
        with open(self.shards[self.shard_of[i]], "rb") as f:
            f.seek(int(self.offsets[i]))
            data = f.read(int(self.sizes[i]))
        if len(data) != int(self.sizes[i]):
            raise OSError("shard shorter than its index says: was it modified? (delete the index cache)")
        return decode_bytes(data)

    def locate(self, i: int) -> str:
        i = int(i)
        ext = self.exts[i] or "?"
        return f"{self.shards[self.shard_of[i]]}: {self.keys[i]}.{ext}"


def _labels(raw: list[str | None], label_key: str, named: bool, first_shard: str, spec: str):
    have = [v for v in raw if v not in (None, "")]
    if not have:
        if named:
            raise UserError(f"{spec}: no sample has a .{label_key} member; fix --label-column (the label key)")
        log.info("%s: no .%s members: samples are unlabelled (name the label key with --label-column)",
                 spec, label_key)
        return np.full(len(raw), -1, np.int64), []
    if all(re.fullmatch(r"-?\d+", v) for v in have):
        labels = np.asarray([int(v) if v not in (None, "") else -1 for v in raw], np.int64)
        top = int(labels.max())
        names_file = os.path.join(os.path.dirname(first_shard), "classnames.txt")  # CLIP_benchmark's layout
        if os.path.isfile(names_file):
            with open(names_file, encoding="utf-8") as fh:
                names = [ln.strip() for ln in fh if ln.strip()]
            if len(names) > top:
                return labels, names
        return labels, [str(i) for i in range(top + 1)]
    names = sorted(set(have))
    index = {v: i for i, v in enumerate(names)}
    return np.asarray([index.get(v, -1) if v else -1 for v in raw], np.int64), names


def wds_source(spec: str, image_key: str | None = None, label_key: str | None = None) -> ImageSource:
    pattern = spec[len("wds:"):]
    if not pattern:
        raise UserError(f"{spec}: expected wds:SHARDS, e.g. wds:/data/train-{{000000..000099}}.tar")
    expand_urls, base_plus_ext = _webdataset()
    image_key = image_key.lstrip(".") if image_key else None
    named_label = label_key is not None
    label_key = (label_key or LABEL_KEY).lstrip(".").lower()
    try:
        urls = expand_urls(pattern)
    except Exception as e:  # noqa: BLE001 - a malformed pattern
        raise UserError(f"{spec}: cannot expand the shard pattern ({e})") from None
    shards = []
    for u in urls:
        if u.startswith("file://"):
            u = u[len("file://"):]
        elif "://" in u or u.startswith(("pipe:", "-")):
            raise UserError(f"{spec}: {u}: only local tar shards are read (by offset); copy them to a local disk "
                            "or a mounted file system first")
        shards.append(os.path.abspath(u))
    missing = [s for s in shards if not os.path.isfile(s)]
    if missing:
        raise UserError(f"{spec}: {len(missing)} of {len(shards)} shard(s) not found, e.g. {missing[0]}")

    workers = min(8, len(shards))
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            parts = list(pool.map(lambda s: shard_index(s, image_key, label_key, base_plus_ext), shards))
    else:
        parts = [shard_index(s, image_key, label_key, base_plus_ext) for s in shards]

    shard_of = np.concatenate([np.full(len(p.keys), k, np.int32) for k, p in enumerate(parts)])
    keys = [k for p in parts for k in p.keys]
    exts = [e for p in parts for e in p.exts]
    if not keys:
        raise UserError(f"{spec}: the shards hold no samples")
    if not any(exts):
        looked = image_key or ", ".join(IMAGE_KEYS)
        raise UserError(f"{spec}: no sample has an image member (looked for .{looked}); name the image key with "
                        "--image-column")
    labels, class_names = _labels([v for p in parts for v in p.labels], label_key, named_label, shards[0], spec)
    if len(set(keys)) == len(keys):
        ids = list(keys)
    else:
        top = os.path.commonpath([os.path.dirname(s) for s in shards])
        names = [os.path.relpath(s, top) for s in shards]
        ids = [f"{names[s]}/{k}" for s, k in zip(shard_of, keys)]
        if len(set(ids)) != len(ids):
            raise UserError(f"{spec}: the same __key__ appears twice inside one shard; samples must have unique keys")
    return WdsSource(
        "wds", os.path.dirname(shards[0]), ids, labels, class_names, split=None,
        extra={"wds_pattern": pattern, "num_shards": len(shards), "image_keys": [image_key] if image_key else
               list(IMAGE_KEYS), "label_key": label_key},
        shards=shards, shard_of=shard_of, offsets=np.concatenate([p.offsets for p in parts]),
        sizes=np.concatenate([p.sizes for p in parts]), exts=exts, keys=keys,
    )
