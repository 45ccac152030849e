"""hf: and wds: sources, built here from the images of an ImageFolder: the same tokens sample by sample, the
right labels, class names and ids, and every kind of bad input as one clear line."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from conftest import TINY, one_line_error, write_image_folder
from mimprobe.cache_store import TokenStore
from mimprobe.data import open_source
from mimprobe.errors import UserError
from mimprobe.extract.options import ExtractOptions
from mimprobe.extract.runner import extract

datasets = pytest.importorskip("datasets")
wds = pytest.importorskip("webdataset")

HUB_SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def _caches(tmp_path_factory, monkeypatch):
    """Every cache these sources write goes under the test's tmp folder, never into the home directory."""
    root = tmp_path_factory.getbasetemp() / "caches"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(root / "hf_datasets"))
    monkeypatch.setenv("HF_HUB_CACHE", str(root / "hf_hub"))
    monkeypatch.setenv("MIMPROBE_CACHE", str(root / "mimprobe"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("imgs"), per_class=4)


def hf_rows(folder: str) -> tuple[dict, "datasets.Features"]:
    """The folder's images as an Image column (the files' own bytes) + a ClassLabel column, in folder order."""
    src = open_source(folder)
    rows = {"image": [{"bytes": open(os.path.join(folder, i), "rb").read(), "path": os.path.basename(i)}
                      for i in src.ids],
            "label": src.labels.tolist(), "id": list(src.ids)}
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=src.class_names),
                               "id": datasets.Value("string")})
    return rows, feats


def write_shards(folder: str, out: str, per_shard: int = 5, classnames: bool = True) -> str:
    """The folder's images as WebDataset shards (webdataset's TarWriter): __key__ = path without extension,
    image under its own extension, label in .cls; returns the brace pattern."""
    src = open_source(folder)
    os.makedirs(out, exist_ok=True)
    n_shards = -(-len(src) // per_shard)
    for k in range(n_shards):
        with wds.TarWriter(os.path.join(out, f"train-{k:04d}.tar")) as w:
            for i in range(k * per_shard, min(len(src), (k + 1) * per_shard)):
                stem, ext = os.path.splitext(src.ids[i])
                w.write({"__key__": stem, ext[1:]: open(os.path.join(folder, src.ids[i]), "rb").read(),
                         "cls": int(src.labels[i])})
    if classnames:
        with open(os.path.join(out, "classnames.txt"), "w") as f:
            f.write("\n".join(src.class_names) + "\n")
    return os.path.join(out, f"train-{{0000..{n_shards - 1:04d}}}.tar")


def _opts(ckpt, **kw):
    base = dict(checkpoint=ckpt, img_size=32, workers=0, quiet=True, chunk_rows=5, batch_size=5)
    base.update(kw)
    return ExtractOptions(**base)


def _by_id(path: str) -> tuple[dict, TokenStore]:
    s = TokenStore.open(path)
    toks = np.asarray(s.backend.array("tokens")[:])
    return {sid: toks[r] for r, sid in enumerate(s.sample_ids)}, s


@pytest.fixture(scope="module")
def reference(folder, tiny_ckpt, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ref") / "folder.zarr")
    extract(TINY, folder, path, _opts(tiny_ckpt))
    toks, s = _by_id(path)
    return {"tokens": toks, "labels": dict(zip(s.sample_ids, s.labels.tolist())), "ids": open_source(folder).ids}


def _assert_same(reference, store: str, to_folder_id):
    """Every sample of ``store`` has the tokens and label of the same image in the ImageFolder extraction."""
    toks, s = _by_id(store)
    assert s.complete and len(toks) == len(reference["tokens"])
    for r, sid in enumerate(s.sample_ids):
        fid = to_folder_id(sid)
        assert toks[sid].tobytes() == reference["tokens"][fid].tobytes(), sid
        assert int(s.labels[r]) == reference["labels"][fid], sid
    assert s.class_names == ["a", "b", "c"]
    return s


def test_hf_save_to_disk(folder, reference, tiny_ckpt, tmp_path):
    rows, feats = hf_rows(folder)
    rows.pop("id")
    del feats["id"]
    ds = datasets.Dataset.from_dict(rows, features=feats)
    datasets.DatasetDict({"train": ds, "validation": ds.select(range(4))}).save_to_disk(str(tmp_path / "disk"))

    src = open_source(f"hf:{tmp_path / 'disk'}:train")
    assert src.ids[:2] == ["train/0", "train/1"] and src.class_names == ["a", "b", "c"]
    assert src.describe()["image_column"] == "image" and src.describe()["label_column"] == "label"
    store = str(tmp_path / "hf.zarr")
    extract(TINY, f"hf:{tmp_path / 'disk'}:train", store, _opts(tiny_ckpt, workers=1))  # decoded in a worker
    s = _assert_same(reference, store, lambda sid: reference["ids"][int(sid.split("/")[1])])
    assert s.attrs["dataset"]["split"] == "train" and s.attrs["dataset"]["source"] == "hf"
    assert len(open_source(f"hf:{tmp_path / 'disk'}:validation")) == 4


def test_hf_parquet_folder_with_id_column(folder, reference, tiny_ckpt, tmp_path):
    rows, feats = hf_rows(folder)
    ds = datasets.Dataset.from_dict(rows, features=feats)
    data = tmp_path / "pq" / "data"
    data.mkdir(parents=True)
    ds.select(range(6)).to_parquet(str(data / "train-00000-of-00002.parquet"))
    ds.select(range(6, 12)).to_parquet(str(data / "train-00001-of-00002.parquet"))
    ds.select(range(3)).to_parquet(str(data / "validation-00000-of-00001.parquet"))
    spec = f"hf:{tmp_path / 'pq'}:train"
    src = open_source(spec)
    assert src.ids == reference["ids"] and src.describe()["id_column"] == "id"
    store = str(tmp_path / "pq.zarr")
    extract(TINY, spec, store, _opts(tiny_ckpt))
    _assert_same(reference, store, lambda sid: sid)
    assert open_source(f"hf:{tmp_path / 'pq'}:validation").ids == reference["ids"][:3]


def test_hf_hub_id_from_local_cache_only(folder, tmp_path, monkeypatch):
    rows, feats = hf_rows(folder)
    hub = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    repo = hub / "datasets--someorg--pets"
    (repo / "snapshots" / HUB_SHA / "data").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(HUB_SHA)
    datasets.Dataset.from_dict(rows, features=feats).to_parquet(
        str(repo / "snapshots" / HUB_SHA / "data" / "test-00000-of-00001.parquet"))
    src = open_source("hf:someorg/pets:test")
    assert len(src) == 12 and src.class_names == ["a", "b", "c"] and src.root == "someorg/pets"
    assert np.array_equal(np.asarray(src.load(5)), np.asarray(open_source(folder).load(5)))
    assert len(open_source("hf://datasets/someorg/pets")) == 12  # the only split
    with pytest.raises(UserError, match="not in the local Hugging Face cache.*never downloads"):
        open_source("hf:someorg/absent:train")


def test_hf_ids_from_image_file_names(folder, tmp_path):
    rows, feats = hf_rows(folder)
    for cell, sid in zip(rows["image"], rows.pop("id")):
        cell["path"] = sid.replace("/", "_")  # unique file names, as ImageNet's are
    del feats["id"]
    datasets.Dataset.from_dict(rows, features=feats).save_to_disk(str(tmp_path / "named"))
    src = open_source(f"hf:{tmp_path / 'named'}")
    assert src.ids[:2] == ["a_img000.jpg", "a_img001.png"] and src.describe()["id_column"] == "image.path"


def test_wds_shards(folder, reference, tiny_ckpt, tmp_path):
    pattern = write_shards(folder, str(tmp_path / "shards"), per_shard=5)
    src = open_source(f"wds:{pattern}")
    assert len(src) == 12 and src.ids[0] == "a/img000" and src.class_names == ["a", "b", "c"]
    assert src.extra["num_shards"] == 3 and os.listdir(os.environ["MIMPROBE_CACHE"] + "/wds-index")
    store = str(tmp_path / "wds.zarr")
    extract(TINY, f"wds:{pattern}", store, _opts(tiny_ckpt, workers=1))
    by_stem = {os.path.splitext(i)[0]: i for i in reference["ids"]}
    s = _assert_same(reference, store, lambda sid: by_stem[sid])
    assert s.attrs["dataset"]["source"] == "wds"
    # a named image key, and the index cache answering a second open
    png = open_source(f"wds:{pattern}", image_column="png")
    assert len(png) == 12 and sum(bool(e) for e in png.exts) == 6


def test_wds_labels_without_classnames_and_duplicate_keys(folder, tmp_path):
    a = write_shards(folder, str(tmp_path / "a"), per_shard=12, classnames=False)
    b = write_shards(folder, str(tmp_path / "b"), per_shard=12, classnames=False)
    src = open_source(f"wds:{a}::{b}")  # webdataset's '::' list: the same keys twice
    assert src.class_names == ["0", "1", "2"] and len(src) == 24
    assert src.ids[0] == "a/train-0000.tar/a/img000" and len(set(src.ids)) == 24


# --- bad input: one clear line each, nothing lost ------------------------------------------------------------

@pytest.fixture(scope="module")
def bad_parquet(folder, tmp_path_factory):
    rows, feats = hf_rows(folder)
    rows["image"][3] = {"bytes": b"this is not an image", "path": "broken.jpg"}
    root = tmp_path_factory.mktemp("badpq")
    datasets.Dataset.from_dict(rows, features=feats).to_parquet(str(root / "train.parquet"))
    return str(root)


def test_hf_bad_columns_and_hub_id(cli, bad_parquet, tmp_path, tiny_ckpt):
    base = ["extract", TINY, f"hf:{bad_parquet}", str(tmp_path / "x.zarr"), "--checkpoint", tiny_ckpt,
            "--img-size", "32", "--workers", "0", "--quiet"]
    one_line_error(*cli(*base, "--image-column", "picture")[::2], "no column 'picture'", "--image-column")
    one_line_error(*cli(*base, "--label-column", "image")[::2], "label column 'image' holds image", "--label-column")
    one_line_error(*cli(*base, "--image-column", "label")[::2], "not images")
    one_line_error(*cli("extract", TINY, "hf:nobody/nothing:train", str(tmp_path / "y.zarr"))[::2],
              "not in the local Hugging Face cache", "never downloads")
    one_line_error(*cli("extract", TINY, f"hf:{bad_parquet}:test", str(tmp_path / "y.zarr"))[::2], "no split 'test'")
    assert not os.path.exists(tmp_path / "x.zarr") and not os.path.exists(tmp_path / "y.zarr")


def test_undecodable_image_in_parquet(cli, bad_parquet, tmp_path, tiny_ckpt):
    store = str(tmp_path / "bad.zarr")
    base = ["extract", TINY, f"hf:{bad_parquet}", store, "--checkpoint", tiny_ckpt, "--img-size", "32",
            "--workers", "0", "--quiet", "--chunk-rows", "4", "--batch-size", "4"]
    line = one_line_error(*cli(*base)[::2], "cannot decode image", "--skip-bad", "a/img003.png")
    assert "finished chunks are kept" in line
    code, out, err = cli(*base, "--skip-bad")
    assert code == 0, err
    s = TokenStore.open(store)
    assert s.complete and s.attrs["num_skipped"] == 1
    bad = s.attrs["skipped"][0]
    assert bad["id"] == "a/img003.png" and "not a recognised image format (20 bytes)" in bad["reason"]
    assert s.valid().sum() == 11 and not s.valid()[bad["row"]]


def test_wds_truncated_shard_and_undecodable_member(cli, folder, tmp_path, tiny_ckpt):
    pattern = write_shards(folder, str(tmp_path / "shards"), per_shard=6)
    last = os.path.join(tmp_path / "shards", "train-0001.tar")
    data = open(last, "rb").read()
    open(last, "wb").write(data[: len(data) // 2])  # a copy interrupted half way
    base = ["extract", TINY, f"wds:{pattern}", str(tmp_path / "t.zarr"), "--checkpoint", tiny_ckpt,
            "--img-size", "32", "--workers", "0", "--quiet"]
    one_line_error(*cli(*base)[::2], "train-0001.tar", "truncated")
    assert not os.path.exists(tmp_path / "t.zarr")

    # an undecodable member: recorded and skipped with --skip-bad
    out = str(tmp_path / "bad")
    os.makedirs(out)
    src = open_source(folder)
    with wds.TarWriter(os.path.join(out, "s-0.tar")) as w:
        for i in range(4):
            stem, ext = os.path.splitext(src.ids[i])
            payload = b"\xff\xd8\xff garbage" if i == 2 else open(os.path.join(folder, src.ids[i]), "rb").read()
            w.write({"__key__": stem, ext[1:]: payload, "cls": int(src.labels[i])})
        w.write({"__key__": "a/nothing", "txt": "a sample without an image"})
    store = str(tmp_path / "b.zarr")
    base = ["extract", TINY, f"wds:{out}/s-0.tar", store, "--checkpoint", tiny_ckpt, "--img-size", "32",
            "--workers", "0", "--quiet", "--chunk-rows", "5"]
    one_line_error(*cli(*base)[::2], "s-0.tar: a/", "cannot decode image", "--skip-bad")
    code, _, err = cli(*base, "--skip-bad")
    assert code == 0, err
    s = TokenStore.open(store)
    assert s.complete and {e["id"] for e in s.attrs["skipped"]} == {"a/img002", "a/nothing"}
    assert "no image member" in {e["id"]: e["reason"] for e in s.attrs["skipped"]}["a/nothing"]
    one_line_error(*cli(*base, "--image-column", "webp")[::2], "no sample has an image member", "--image-column")
    one_line_error(*cli(*base, "--label-column", "label")[::2], "no sample has a .label member")


def test_missing_extras_say_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(UserError, match=r"pip install 'mimprobe\[hf\]'"):
        open_source(f"hf:{tmp_path}")
    monkeypatch.setitem(sys.modules, "webdataset.shardlists", None)
    with pytest.raises(UserError, match=r"pip install 'mimprobe\[wds\]'"):
        open_source(f"wds:{tmp_path}/x.tar")
    with pytest.raises(UserError, match="apply to hf: and wds: sources only"):
        open_source(str(tmp_path), image_column="img")
    import importlib

    monkeypatch.setitem(sys.modules, "s3fs", None)
    registry = importlib.import_module("fsspec.registry")  # forget an s3fs loaded by an earlier test
    monkeypatch.delitem(registry._registry, "s3", raising=False)
    with pytest.raises(UserError, match=r"s3:// stores need s3fs: pip install 'mimprobe\[s3\]'"):
        TokenStore.open("s3://bucket/store.zarr")
