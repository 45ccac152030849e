"""Image sources: ImageFolder order, CSV lists, torchvision datasets, unlabelled folders, the demo set."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from mimprobe.data import open_source
from mimprobe.errors import UserError


def test_image_folder_is_sorted_and_deterministic(image_folder):
    s = open_source(image_folder)
    assert s.class_names == ["a", "b", "c"]
    assert s.ids == sorted(s.ids) and len(s) == 24
    assert s.labels.tolist() == [0] * 8 + [1] * 8 + [2] * 8
    assert open_source(image_folder).content_hash() == s.content_hash()
    assert s.load(0).mode == "RGB"


def test_csv_with_string_labels_and_relative_paths(tmp_path, image_folder):
    (tmp_path / "lists").mkdir()
    rel = os.path.relpath(os.path.join(image_folder, "b", "img001.png"), tmp_path / "lists")
    rows = ["path,label", f"{rel},zebra", f"{os.path.join(image_folder, 'a', 'img000.jpg')},ant", f"{rel},"]
    (tmp_path / "lists" / "set.csv").write_text("\n".join(rows) + "\n")
    s = open_source(str(tmp_path / "lists" / "set.csv"))
    assert s.class_names == ["ant", "zebra"] and s.labels.tolist() == [1, 0, -1]
    assert s.load(0).size == s.load(2).size
    ints = tmp_path / "lists" / "ints.csv"
    ints.write_text(f"path,label\n{rel},3\n{rel},0\n")
    s = open_source(str(ints))
    assert s.labels.tolist() == [3, 0] and s.class_names == ["0", "1", "2", "3"]
    bad = tmp_path / "lists" / "bad.csv"
    bad.write_text("file,cls\nx.jpg,1\n")
    with pytest.raises(UserError, match="'path' column"):
        open_source(str(bad))


def test_torchvision_dataset_from_local_root(image_folder, tmp_path):
    s = open_source(f"torchvision:ImageFolder:{image_folder}")
    assert len(s) == 24 and s.class_names == ["a", "b", "c"] and s.labels.tolist()[:9] == [0] * 8 + [1]
    assert s.load(3).mode == "RGB" and s.ids[3] == "3"
    with pytest.raises(UserError, match="no dataset named"):
        open_source(f"torchvision:NoSuchSet:{tmp_path}")
    with pytest.raises(UserError, match="never downloads"):
        open_source(f"torchvision:MNIST:{tmp_path}:train")


def test_unlabelled_flat_folder(tmp_path):
    for i in range(3):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / f"{i}.png")
    s = open_source(str(tmp_path))
    assert len(s) == 3 and s.labels.tolist() == [-1, -1, -1] and s.class_names == []


def test_demo_source_is_deterministic():
    a, b = open_source("demo:eval:20:3"), open_source("demo:eval:20:3")
    assert np.array_equal(np.asarray(a.load(5)), np.asarray(b.load(5)))
    assert not np.array_equal(np.asarray(a.load(5)), np.asarray(open_source("demo:train:20:3").load(5)))
    assert a.labels.tolist()[:9] == [0, 1, 2, 3, 4, 5, 6, 7, 0] and len(a.class_names) == 8
    with pytest.raises(UserError):
        open_source("demo:train:many")
