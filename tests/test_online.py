"""probe --online: the papers' protocol (backbone in the loop, fresh crops every epoch) as a reference for the cache.

A tiny ViT at 32 px and a few dozen images. With augmentation off, an online run must equal a probe of a float32
center-crop cache (same batches, same tokens up to float rounding): same chosen members, same metrics."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

from conftest import TINY, write_image_folder
from mimprobe.cache_store import TokenStore
from mimprobe.errors import UserError
from mimprobe.extract.options import ExtractOptions
from mimprobe.extract.runner import extract
from mimprobe.probe.heads import HEADS as REGISTERED
from mimprobe.probe.options import ProbeOptions
from mimprobe.probe.run import run_probe
from mimprobe.probe.plan import make_plan
from mimprobe.probe.online import OnlineFeeder
from mimprobe.report import build_table

pytestmark = pytest.mark.numerics  # rerun by .ci/run on the default CPU path

HEADS = ["linear-cls", "linear-mean", "abmilp", "attentive"]


def _extract(ckpt, folder, path, **kw):
    extract(TINY, folder, path, ExtractOptions(checkpoint=ckpt, img_size=32, crop_pct=1.0, workers=0, quiet=True,
                                               batch_size=16, **kw))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_ckpt):
    """(train folder, train store float32, eval store float32), 3 classes x 12 train images, 3 x 4 eval."""
    root = tmp_path_factory.mktemp("online")
    train = write_image_folder(root / "train", per_class=12, seed=3)
    test = write_image_folder(root / "test", per_class=4, seed=4)
    return (train, _extract(tiny_ckpt, train, str(root / "train.zarr"), dtype="float32"),
            _extract(tiny_ckpt, test, str(root / "test.zarr"), dtype="float32"))


def _opts(**kw):
    base = dict(heads=HEADS, lrs=[1e-3, 1e-2], wds=[5e-4], epochs=3, min_steps=0, batch_size=8, optimizer="adamw",
                val_fraction=0.25, seeds=[0], quiet=True, device="cpu", in_memory=True)
    base.update(kw)
    return ProbeOptions(**base)


def _by_head(records):
    return {r["head"]: r for r in records}


# label-free heads are refused with --online (their pooler is fitted on the cached train store first)
@pytest.mark.parametrize("heads", [[k for k, h in REGISTERED.items() if not (h.label_free or h.knn)], ["linear-cls", "linear-mean"]],
                         ids=["every-head", "pooled-once"])
def test_no_augment_equals_the_center_crop_cache(data, heads):
    """Every registered head, and linear heads alone (the cached run then trains on features pooled once)."""
    folder, train, test = data
    cached = _by_head(run_probe(train, test, _opts(heads=heads)))
    online = _by_head(run_probe(train, test, _opts(heads=heads, online=folder, online_augment=False)))
    assert list(cached) == list(online) == heads
    assert all(r["timings"]["pooled_once"] for r in cached.values()) == (len(heads) == 2)
    for h in heads:
        c, o = cached[h], online[h]
        # the same record, field for field, apart from what says how the training input was made
        assert set(c) == set(o)
        assert set(o["protocol"]) == set(c["protocol"]) | {"online"}
        for k in ("head", "seed", "num_train", "num_val", "num_eval", "chosen", "subset", "validation", "training",
                  "params"):
            assert c[k] == o[k], (h, k)
        assert o["protocol"]["selection"] == c["protocol"]["selection"]
        assert o["protocol"]["views"] == 0
        assert o["protocol"]["train_input"].startswith("online: backbone in the loop, center crop")
        assert o["protocol"]["online"]["augment"] is False
        assert o["protocol"]["online"]["token_check"]["max_rel_l2_error"] < 1e-5
        np.testing.assert_allclose([g["val_top1"] for g in o["grid"]], [g["val_top1"] for g in c["grid"]], atol=1e-9)
        assert set(o["metrics"]) == set(c["metrics"])
        for k, v in c["metrics"].items():  # top-1s, top-5 and the top-1's bootstrap interval
            assert o["metrics"][k] == (v if v is None else pytest.approx(v, abs=1e-9)), (h, k)
        assert o["timings"]["online_images"] == o["num_train"] * 3  # every training image, every epoch
        assert o["timings"]["pooled_once"] is False


def test_feeder_applies_seeded_augmentation(data):
    folder, train, test = data
    plan = make_plan(train, test, _opts(online=folder))
    try:
        split = plan.splits[0]
        store = plan.train

        def epoch_tokens(augment, epoch, seed=0):
            plan.online.augment = augment
            f = OnlineFeeder(plan.online, store, split.train_rows, 8, seed=seed)
            f.set_epoch(epoch)
            bs = list(f)
            order = torch.cat([b.rows for b in bs]).argsort()
            return torch.cat([b.x for b in bs])[order], torch.cat([b.rows for b in bs])[order]

        x0, rows = epoch_tokens(True, 0)
        stored = torch.from_numpy(np.stack([store.read_tokens(int(r), int(r) + 1)[0].numpy() for r in rows]))[:, None]
        assert torch.equal(x0, epoch_tokens(True, 0)[0])  # reproducible: seeded by (seed, epoch, sample)
        assert not torch.allclose(x0, epoch_tokens(True, 1)[0])  # a fresh crop every epoch
        assert not torch.allclose(x0, epoch_tokens(True, 0, seed=1)[0])
        assert (x0 - stored).abs().amax() > 0.1  # the augmentation is really applied
        center, _ = epoch_tokens(False, 0)
        assert (center - stored).abs().amax() < 1e-4  # without it: the cached center-crop tokens
        # the batches are the in-memory cached reader's, in the same order
        f = OnlineFeeder(plan.online, store, split.train_rows, 8, seed=0)
        assert f.num_batches() == len(f.batches()) == -(-len(split.train_rows) // 8)
    finally:
        plan.close()


def test_augmented_run_differs_from_cache_and_is_reproducible(data):
    folder, train, test = data
    opts = dict(heads=["linear-mean", "abmilp"], epochs=2)
    cached = run_probe(train, test, _opts(**opts))
    a = run_probe(train, test, _opts(online=folder, **opts))
    b = run_probe(train, test, _opts(online=folder, **opts))
    for ra, rb in zip(a, b):
        assert ra["grid"] == rb["grid"] and ra["metrics"] == rb["metrics"] and ra["chosen"] == rb["chosen"]
        assert ra["protocol"]["train_input"] == "online: backbone in the loop, fresh RandomResizedCrop+flip every epoch"
        assert ra["protocol"]["online"]["augment"] is True
    val = lambda rs: [g["val_top1"] for r in rs for g in r["grid"]]  # noqa: E731
    assert val(a) != val(cached)
    # report keeps online and cached rows apart
    t = build_table(cached + a)
    assert len(t.rows) == 2 and {k[5] for k in t.rows} == {"0", "online"}


def test_other_data_is_refused_in_one_line(data, tmp_path, cli):
    folder, train, test = data
    other = write_image_folder(tmp_path / "other", classes=("a", "b"), per_class=12, seed=3)
    code, out, err = cli("probe", train, test, "--online", other, "--optimizer", "adamw", "--quiet")
    assert code != 0 and "not the dataset" in err and "missing" in err
    assert len([ln for ln in err.strip().splitlines() if ln.strip()]) == 1, err
    # the same file names and labels with other pixels: caught by the token check
    same_names = write_image_folder(tmp_path / "pixels", per_class=12, seed=99)
    code, out, err = cli("probe", train, test, "--online", same_names, "--optimizer", "adamw", "--quiet")
    assert code != 0 and "does not reproduce" in err
    assert len([ln for ln in err.strip().splitlines() if ln.strip()]) == 1, err


@pytest.mark.parametrize("extra, words", [(["--optimizer", "lbfgs"], "lbfgs"),
                                          (["--head", "knn-cls"], "kNN"),
                                          ([], None)])
def test_online_refusals_and_cli(data, cli, extra, words):
    folder, train, test = data
    args = ["probe", train, test, "--online", folder, "--no-online-augment", "--epochs", "1", "--min-steps", "0",
            "--batch-size", "8", "--lr", "1e-3", "--wd", "0", "--quiet"]
    if not extra:
        args += ["--head", "linear-mean"]
    code, out, err = cli(*args, *extra)
    if words:
        assert code != 0 and words in err
    else:
        assert code == 0, err
        assert "online: backbone in the loop, center crop" in out and "adamw" in out


def test_views_store_is_refused(data, tiny_ckpt, tmp_path):
    folder, _, test = data
    views = _extract(tiny_ckpt, folder, str(tmp_path / "v.zarr"), views=1)
    with pytest.raises(UserError, match="--views"):
        make_plan(views, test, _opts(online=folder))


def test_moved_checkpoint_is_refused(data, tmp_path):
    folder, _, test = data
    ckpt = shutil.copy(TokenStore.open(data[1]).attrs["model"]["checkpoint"], tmp_path / "moved.pth")
    train = _extract(ckpt, folder, str(tmp_path / "t.zarr"))
    os.remove(ckpt)
    with pytest.raises(UserError, match="no longer there"):
        make_plan(train, test, _opts(online=folder))


def test_online_run_from_a_coded_store_checks_tokens_through_its_codec(data, tmp_path):
    """A store coded with int4r (relative error ~0.1) still passes the token check: the recomputed tokens are coded
    the same way before they are compared."""
    from mimprobe.cache_store.compress import compress

    folder, train, test = data
    coded = str(tmp_path / "train_int4r.zarr")
    compress(train, coded, "int4r", quiet=True)
    coded_test = str(tmp_path / "test_int4r.zarr")
    compress(test, coded_test, "int4r", codebook_from=coded, quiet=True)
    (rec,) = run_probe(coded, coded_test, _opts(heads=["linear-mean"], online=folder, online_augment=False))
    assert rec["protocol"]["online"]["token_check"]["max_rel_l2_error"] < 0.01
