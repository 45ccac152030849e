"""Shared fixtures: tiny image folders written by the tests, tiny timm ViTs saved as local checkpoints."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download; fail fast instead of retrying

import numpy as np
import pytest
import timm
import torch
from PIL import Image

TINY = "vit_tiny_patch16_224"

# The tests' tensors are tiny: one intra-op thread is faster than two fighting over cores (measured 10x on a
# loaded 2-core VM), and subprocesses inherit it through the environment.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


def write_image_folder(root, classes=("a", "b", "c"), per_class=8, seed=0, sizes=((40, 52), (64, 64), (33, 70))):
    rng = np.random.default_rng(seed)
    for ci, c in enumerate(classes):
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i in range(per_class):
            h, w = sizes[(ci + i) % len(sizes)]
            a = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            ext = "png" if i % 2 else "jpg"
            Image.fromarray(a).save(os.path.join(root, c, f"img{i:03d}.{ext}"))
    return str(root)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("images"))


def save_checkpoint(model, path):
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    else:
        torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 3}, str(path))
    return str(path)


def make_model(name=TINY, img_size=32, seed=0, **kw):
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, num_classes=0, img_size=img_size, **kw).eval()


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A random-init vit_tiny at 32 px saved the way training code saves (wrapped, module. prefix)."""
    return save_checkpoint(make_model(), tmp_path_factory.mktemp("ckpt") / "tiny.pth")


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run the command line in-process: returns (exit code, stdout, stderr)."""
    from mimprobe.cli import main

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["mimprobe", *map(str, args)])
        code = 0
        try:
            main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        out, err = capsys.readouterr()
        return code, out, err

    return run


def synthetic_store(path, tokens, labels, *, chunk_rows=16, dtype="float16", num_prefix_tokens=1, class_names=None,
                    model_name="synthetic", ids=None, valid=None, views=None, blocks=None, num_blocks=12,
                    final_norm=None, dataset_hash="synthetic", attention=None):
    """A complete store holding the given float tokens (N, T, D) without running any model (``attention``
    (N, H, T − prefix): a stored [cls] attention, as ``extract --store-attention`` writes it)."""
    from mimprobe.cache_store import TokenStore

    tokens = torch.as_tensor(tokens, dtype=torch.float32)
    n, t, d = tokens.shape
    labels = np.asarray(labels, dtype=np.int64)
    n_cls = int(labels.max()) + 1
    blocks = blocks or {}
    attrs = {
        "model": {"name": model_name, "architecture": model_name, "weights": "random", "embed_dim": d,
                  "num_blocks": num_blocks, "num_prefix_tokens": num_prefix_tokens, "num_patches": t - num_prefix_tokens,
                  "patch_size": [16, 16], "img_size": [64, 64], "grid_size": [8, 8], "num_reg_tokens": 0,
                  "has_class_token": num_prefix_tokens > 0, "checkpoint_sha256": None,
                  "final_norm": None if final_norm is None else {"module": "norm", "kind": "layernorm", "eps": 1e-6}},
        "preprocessing": {"input_size": [3, 64, 64]},
        "dataset": {"source": "synthetic", "root": str(path), "class_names": class_names or [str(i) for i in range(n_cls)],
                    "num_classes": n_cls, "content_hash": dataset_hash, "num_samples": n},
        "layers": sorted(set(list(blocks) + [num_blocks - 1])),
        "permutation_seed": 0,
    }
    if attention is not None:
        attention = torch.as_tensor(attention, dtype=torch.float32)
        attrs["attention"] = {"block": num_blocks - 1, "heads": attention.shape[1], "patches": attention.shape[2],
                              "query": "cls", "dtype": "float16", "of": "synthetic"}
    s = TokenStore.create(path, attrs=attrs, num_tokens=t, dim=d, labels=labels,
                          sample_ids=ids or [f"s{i:05d}" for i in range(n)], dtype=dtype, chunk_rows=chunk_rows,
                          blocks=tuple(blocks), views=0 if views is None else len(views), final_norm=final_norm)
    valid = np.ones(n, bool) if valid is None else np.asarray(valid, bool)
    for c in range(s.num_chunks):
        a, b = s.chunk_bounds(c)
        arrays = {"tokens": tokens[a:b]}
        if attention is not None:
            arrays["attention"] = attention[a:b]
        for k, v in blocks.items():
            arrays[f"blocks/{k}"] = torch.as_tensor(v, dtype=torch.float32)[a:b]
        for j, v in enumerate(views or []):
            arrays[f"views/{j}"] = torch.as_tensor(v, dtype=torch.float32)[a:b]
        s.write_chunk(c, arrays, valid[a:b])
        s.mark_done(c)
    s.update_attrs(complete=True)
    s.close()
    return str(path)


def write_digits(root, test_size=0.25):
    """scikit-learn's digits (real 8x8 scans of handwritten digits) as an ImageFolder of 32 px PNGs."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    tr, te = train_test_split(np.arange(len(d.target)), test_size=test_size, stratify=d.target, random_state=0)
    for split, idx in (("train", tr), ("test", te)):
        for i in idx:
            folder = os.path.join(root, split, str(d.target[i]))
            os.makedirs(folder, exist_ok=True)
            img = (d.images[i] * (255 / 16)).astype(np.uint8)
            Image.fromarray(img, "L").resize((32, 32), Image.NEAREST).save(os.path.join(folder, f"{i:04d}.png"))
    return os.path.join(root, "train"), os.path.join(root, "test")


@pytest.fixture(scope="session")
def digits_folders(tmp_path_factory):
    return write_digits(str(tmp_path_factory.mktemp("digits")))


@pytest.fixture(scope="session")
def digits_stores(digits_folders, tmp_path_factory):
    """Train (1,347) and test (450) stores of the digits through a random-init vit_tiny at 32 px."""
    from mimprobe.extract.options import ExtractOptions
    from mimprobe.extract.runner import extract

    root = tmp_path_factory.mktemp("digits_stores")
    out = []
    for folder, name in zip(digits_folders, ("train.zarr", "test.zarr")):
        p = str(root / name)
        extract(TINY, folder, p, ExtractOptions(pretrained=False, img_size=32, crop_pct=1.0, workers=0, quiet=True,
                                                batch_size=128))
        out.append(p)
    return out


def one_token_task(n, seed, T=33, D=32, C=4):
    """The label is carried by one token (a marked prototype) at a random position; the other tokens are
    distractor prototypes + noise: only a selective pooling can find it."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(C, D, generator=torch.Generator().manual_seed(123)) * 2
    y = torch.randint(0, C, (n,), generator=g)
    x = torch.randn(n, T, D, generator=g) * 0.5
    distract = torch.randint(0, C, (n, T - 1), generator=g)
    x[:, 1:] += protos[distract]
    pos = torch.randint(1, T, (n,), generator=g)
    x[torch.arange(n), pos] = protos[y] + torch.randn(n, D, generator=g) * 0.5
    x[torch.arange(n), pos, -1] = 6.0  # the marker that a selective pooling can find
    return x, y.numpy()


def one_line_error(code, err, *needles) -> str:
    """A user error as the command line reports it: exit code 2, no traceback, one ``error:`` line holding every
    needle. Returns that line."""
    assert code == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


S3_BUCKET = "mimprobe-test"


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 (a free port), its bucket, and the environment that points s3fs at it (one per
    session: moto keeps its buckets in process-wide state, so a second server would see the first one's)."""
    s3fs = pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    mp = pytest.MonkeyPatch()
    for k, v in env.items():
        mp.setenv(k, v)
    mp.delenv("AWS_PROFILE", raising=False)
    mp.setenv("MIMPROBE_CACHE", str(tmp_path_factory.mktemp("cache")))
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir(S3_BUCKET)
    yield {"fs": fs, "env": dict(os.environ)}
    mp.undo()
    close_s3_sessions(fs)
    server.stop()


def close_s3_sessions(*extra):
    """Close the HTTP sessions of the s3fs instances this process made (else aiohttp complains about them at
    exit, after pytest's summary line)."""
    import s3fs

    for fs in [*extra, *s3fs.S3FileSystem._cache.values()]:
        if getattr(fs, "_s3", None) is not None:
            s3fs.S3FileSystem.close_session(fs.loop, fs._s3)
    s3fs.S3FileSystem.clear_instance_cache()
    import gc

    import aiohttp

    gc.collect()
    for obj in gc.get_objects():  # sessions of clients s3fs replaced while retrying
        if type(obj) is aiohttp.ClientSession and obj._connector is not None and not obj._connector.closed:
            obj._connector._close()


class Float64Codec:
    """A store's codec, decoding to float64: tests that compare two trainings run them in float64, where a
    gradient of pure rounding noise (a parameter that cannot change the loss) stays far below AdamW's eps instead
    of becoming ±lr steps whose sign depends on the CPU's summation order (tests/test_heads.py::grid_mismatches)."""

    def __init__(self, codec):
        self.codec = codec

    def __getattr__(self, name):
        return getattr(self.codec, name)

    def decode(self, *args, **kwargs):
        return self.codec.decode(*args, **kwargs).double()
