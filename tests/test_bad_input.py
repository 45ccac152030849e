"""Bad input: one clear line, non-zero exit, no traceback, nothing already written lost; odd images work."""

from __future__ import annotations

import os

import numpy as np
import pytest
import zarr
from PIL import Image

from conftest import TINY, save_checkpoint, make_model, write_image_folder
from mimprobe.cache_store import TokenStore
from mimprobe.data.images import load_image

BASE = ["--no-pretrained", "--img-size", "32", "--workers", "0", "--quiet"]


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _bad_folder(tmp_path, kind):
    root = write_image_folder(tmp_path / "imgs", per_class=6)
    bad = os.path.join(root, "b", f"zz_bad_{kind}.jpg")
    good = open(os.path.join(root, "b", "img000.jpg"), "rb").read()
    if kind == "truncated":
        open(bad, "wb").write(good[: len(good) // 2])
    elif kind == "empty":
        open(bad, "wb").close()
    else:
        open(bad, "w").write("this is not an image\n")
    return root, bad


@pytest.mark.parametrize("kind", ["truncated", "empty", "notimage"])
def test_bad_image_stops_with_clear_error_then_skip_bad(tmp_path, cli, kind):
    root, bad = _bad_folder(tmp_path, kind)
    store = str(tmp_path / "s.zarr")
    code, out, err = cli("extract", TINY, root, store, *BASE, "--chunk-rows", "2", "--batch-size", "2")
    line = _one_error_line(err)
    assert code == 2 and bad in line and "--skip-bad" in line
    s = TokenStore.open(store)
    n_done = int(s.done().sum())
    assert not s.complete and f"{n_done} finished chunks are kept" in line
    done_before = s.done()
    tokens_before = zarr.open_group(store)["tokens"][:]
    # --skip-bad resumes: earlier chunks are kept untouched, the bad sample is recorded
    code, out, err = cli("extract", TINY, root, store, *BASE, "--chunk-rows", "2", "--batch-size", "2", "--skip-bad")
    assert code == 0, err
    s = TokenStore.open(store)
    assert s.complete and "1 skipped" in out
    rows_kept = np.repeat(done_before, 2)[: s.num_samples]
    assert np.array_equal(zarr.open_group(store)["tokens"][:][rows_kept], tokens_before[rows_kept])
    valid = s.valid()
    bad_id = os.path.relpath(bad, root)
    row = s.sample_ids.index(bad_id)
    assert not valid[row] and valid.sum() == s.num_samples - 1
    (entry,) = s.attrs["skipped"]
    assert entry["id"] == bad_id and entry["row"] == row and entry["reason"]
    assert np.all(zarr.open_group(store)["tokens"][row] == 0)


def test_odd_but_valid_images(tmp_path, cli):
    root = tmp_path / "odd" / "c"
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("CMYK").save(root / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 65535, (20, 30), dtype=np.uint16)).save(root / "sixteen.png")
    pal = Image.fromarray(rgb).convert("P")
    pal.info["transparency"] = 0
    pal.save(root / "palette_alpha.png", transparency=0)
    Image.fromarray(rgb).convert("L").save(root / "gray.png")
    Image.fromarray(rgb).convert("LA").save(root / "gray_alpha.png")
    Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(root / "rgba.png")
    Image.fromarray(rgb[:1, :1]).save(root / "one_by_one.png")
    Image.fromarray(rng.integers(0, 256, (3000, 5000, 3), dtype=np.uint8)).save(root / "large.jpg", quality=50)
    assert Image.open(root / "sixteen.png").mode.startswith("I")
    assert Image.open(root / "palette_alpha.png").mode == "P"
    for f in os.listdir(root):
        img = load_image(str(root / f))
        assert img.mode == "RGB"
    sixteen = np.asarray(load_image(str(root / "sixteen.png")))
    assert 40 < sixteen.mean() < 215  # scaled to 8 bits, not clipped to white
    store = str(tmp_path / "odd.h5")
    code, out, err = cli("extract", TINY, str(tmp_path / "odd"), store, *BASE)
    assert code == 0, err
    s = TokenStore.open(store)
    assert s.complete and s.valid().all() and s.num_samples == 8
    assert np.isfinite(s.read_tokens(0, 8).numpy()).all()


def test_user_errors_are_one_line(tmp_path, cli, image_folder):
    out_store = str(tmp_path / "s.zarr")
    (tmp_path / "empty").mkdir()
    (tmp_path / "emptycls" / "a").mkdir(parents=True)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00garbage" * 10)
    small = save_checkpoint(make_model("vit_small_patch16_224"), tmp_path / "small.safetensors")
    ro = tmp_path / "readonly"
    ro.mkdir()
    os.chmod(ro, 0o500)
    cases = [
        (["extract", TINY, str(tmp_path / "nope"), out_store, *BASE], "no such file or directory"),
        (["extract", TINY, str(tmp_path / "empty"), out_store, *BASE], "no images found"),
        (["extract", TINY, str(tmp_path / "emptycls"), out_store, *BASE], "no images found"),
        (["extract", "vit_nonexistent_patch99", image_folder, out_store, *BASE], "not a timm model name"),
        (["extract", TINY, image_folder, out_store, *BASE, "--checkpoint", str(tmp_path / "missing.pth")],
         "no such file"),
        (["extract", TINY, image_folder, out_store, *BASE, "--checkpoint", str(junk)], "cannot be loaded"),
        (["extract", TINY, image_folder, out_store, *BASE, "--checkpoint", small], "does not fit"),
        (["extract", TINY, image_folder, str(ro / "sub" / "s.zarr"), *BASE], "cannot create the store"),
        (["extract", TINY, image_folder, str(junk / "s.zarr"), *BASE], "cannot create the store"),
        (["extract", TINY, image_folder, str(junk / "s.h5"), *BASE], "cannot create the store"),
        (["extract", TINY, image_folder, out_store, *BASE, "--dtype", "float8"], "--codec: 'float8'"),
        (["extract", TINY, image_folder, out_store, *BASE, "--layers", "-40"], "--layers -40"),
        (["extract", TINY, "torchvision:CIFAR10:" + str(tmp_path), out_store, *BASE], "never downloads"),
        (["extract", TINY, image_folder, out_store, "--img-size", "32", "--quiet"], "pretrained weights"),
        (["info", str(tmp_path / "nothing.zarr")], "no such store"),
    ]
    if os.geteuid() == 0:  # root ignores directory permissions (the paths under a file still fail)
        cases = [c for c in cases if not any(str(ro) in a for a in c[0])]
    for args, expect in cases:
        code, out, err = cli(*args)
        line = _one_error_line(err)
        assert code == 2 and expect in line, (args, err)
    assert not os.path.exists(out_store) or not TokenStore.open(out_store).complete


def test_unreachable_hub_fails_fast_with_one_line(tmp_path, cli, image_folder, monkeypatch):
    """No network: instead of a minute of download retries, the hub switches to cache-only mode and a model
    whose weights are not cached stops at once with the --checkpoint / --no-pretrained advice."""
    import socket
    import time

    from huggingface_hub import constants

    from mimprobe.extract import backbone

    for v in backbone.PROXY_VARS:
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))

    def no_dns(*a, **k):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(backbone.socket, "getaddrinfo", no_dns)
    t0 = time.monotonic()
    code, out, err = cli("extract", TINY, image_folder, str(tmp_path / "s.zarr"), "--img-size", "32", "--quiet")
    line = _one_error_line(err)
    assert code == 2 and "--checkpoint" in line and "--no-pretrained" in line
    assert "does not resolve" in err and constants.HF_HUB_OFFLINE is True
    assert time.monotonic() - t0 < 30
    assert not os.path.exists(tmp_path / "s.zarr" / "tokens")  # nothing created before the model loads
    # with a resolving host (or a proxy) nothing is switched
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(backbone.socket, "getaddrinfo", lambda *a, **k: [])
    assert backbone.use_cache_only_when_hub_unreachable() is False and constants.HF_HUB_OFFLINE is False
    monkeypatch.setattr(backbone.socket, "getaddrinfo", no_dns)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    assert backbone.use_cache_only_when_hub_unreachable() is False
