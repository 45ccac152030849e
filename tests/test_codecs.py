"""Token codecs (cache_store/codecs.py) and `mimprobe compress`: round trips within each codec's stated error,
resume after a crash bitwise, probes on a coded pair equal probes on its decoded tokens, refusal of pairs coded
with different parameters, and verify / --repair on a coded store."""

import json
import os

import numpy as np
import pytest
import torch

from conftest import one_line_error, synthetic_store
from mimprobe.cache_store import TokenStore, quant
from mimprobe.cache_store.codecs import make_codec, reconstruction_error
from mimprobe.cache_store.compress import compress
from mimprobe.cache_store.verify import verify_store
from test_integrity import chunk_file, flip


def vit_like(n=64, t=9, d=64, seed=0):
    """Tokens with a few 'massive activation' channels, like a ViT's residual stream."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, t, d, generator=g)
    x[..., 3] *= 30
    x[..., 17] *= 12
    return x


def roundtrip(codec, x):
    enc = codec.encode(x)
    side = torch.from_numpy(enc["scales"]) if "scales" in enc else None
    return codec.decode(codec.to_torch(enc["values"]), side), enc


def group_bound(x, qmax):
    """Per element: half a quantization step of its 32-channel group plus the float16 rounding of the scale."""
    amax = x.reshape(*x.shape[:-1], -1, quant.GROUP).abs().amax(-1, keepdim=True)
    return (amax * (1 / (2 * qmax) + 2**-11)).expand(*x.shape[:-1], -1, quant.GROUP).reshape(x.shape)


@pytest.mark.parametrize("spec", ["int8", "int4", "int4r", "int4r+prefix", "int4+prefix"])
def test_grouped_integer_codecs_stay_within_half_a_step(spec):
    x = vit_like()
    codec = make_codec(spec, num_prefix=1)
    if codec.param_names:
        codec.fit(None, x.shape[-1], seed=0)
    xh, enc = roundtrip(codec, x)
    qmax = 127 if spec == "int8" else 7
    rot = torch.from_numpy(codec.params["rotation"]) if "rotation" in codec.params else torch.eye(x.shape[-1])
    p = codec.num_prefix
    coded, coded_hat = (x[:, p:] @ rot), (xh[:, p:] @ rot)  # the rotation is orthogonal: R^T R = I
    assert ((coded_hat - coded).abs() <= group_bound(coded, qmax) + 1e-5).all()
    if p:  # prefix tokens exactly as float16
        assert torch.equal(xh[:, :p], x[:, :p].half().float())
    row_bytes = codec.bytes_per_row(x.shape[1], x.shape[2])
    assert sum(v[0].nbytes for v in enc.values()) == row_bytes
    if spec.startswith("int4") and not p:
        assert row_bytes == x.shape[1] * (x.shape[2] // 2 + 2 * x.shape[2] // 32)  # two codes per byte


def test_rotation_spreads_outlier_channels_and_cuts_int4_error():
    x = vit_like(n=128)
    plain = reconstruction_error(make_codec("int4"), x)["rel_l2_mean"]
    rot = make_codec("int4r")
    rot.fit(None, x.shape[-1], seed=0)
    assert np.allclose(rot.params["rotation"] @ rot.params["rotation"].T, np.eye(x.shape[-1]), atol=1e-5)
    assert reconstruction_error(rot, x)["rel_l2_mean"] < 0.8 * plain


def test_float_codecs_round_trip_exactly():
    x = vit_like()
    for spec, want in (("float32", x), ("float16", x.half().float()), ("bfloat16", x.bfloat16().float())):
        assert torch.equal(roundtrip(make_codec(spec), x)[0], want), spec


def test_pq_decodes_as_faiss_does_and_pca_full_rank_is_exact():
    faiss = pytest.importorskip("faiss")
    x = vit_like(n=300, d=32)
    pq = make_codec("pq:8")
    pq.fit(x.reshape(-1, 32), 32, seed=0)
    xh, enc = roundtrip(pq, x)
    ref = faiss.ProductQuantizer(32, 8, 8)
    faiss.copy_array_to_vector(pq.params["centroids"].reshape(-1), ref.centroids)
    want = ref.decode(enc["values"].reshape(-1, 8)).reshape(x.shape)
    assert np.allclose(xh.numpy(), want, atol=1e-6)
    err = reconstruction_error(pq, x)
    assert err["rel_l2_mean"] < 0.5 and err["cosine_mean"] > 0.85  # 256 centroids per 4 channels: far from noise
    full = make_codec("pca:32")
    full.fit(x.reshape(-1, 32), 32, seed=0)
    assert reconstruction_error(full, x)["rel_l2_max"] < 2e-3  # only float16 rounding of the coordinates
    low = make_codec("pca:4")
    low.fit(x.reshape(-1, 32), 32, seed=0)
    assert reconstruction_error(low, x)["rel_l2_mean"] > reconstruction_error(full, x)["rel_l2_mean"]


def test_opq_and_rq_decode_as_faiss_does():
    faiss = pytest.importorskip("faiss")
    x = vit_like(n=300, d=32)
    flat = x.reshape(-1, 32)
    opq = make_codec("opq:4")
    opq.fit(flat, 32, seed=0)
    r = torch.from_numpy(opq.params["rotation"])
    assert torch.allclose(r @ r.T, torch.eye(32), atol=1e-4)
    xh, enc = roundtrip(opq, x)  # faiss's PQ decoding of the codes, rotated back
    ref = faiss.ProductQuantizer(32, 4, 8)
    faiss.copy_array_to_vector(opq.params["centroids"].reshape(-1), ref.centroids)
    want = ref.decode(enc["values"].reshape(-1, 4)) @ opq.params["rotation"].T
    assert np.allclose(xh.numpy().reshape(-1, 32), want, atol=1e-5)
    assert reconstruction_error(opq, x)["rel_l2_mean"] < 0.5
    rq = make_codec("rq:4")
    rq.fit(flat, 32, seed=0)
    xh, enc = roundtrip(rq, x)
    ref = faiss.ResidualQuantizer(32, 4, 8)
    faiss.copy_array_to_vector(rq.params["codebooks"].reshape(-1), ref.codebooks)
    ref.is_trained = True
    want = ref.decode(enc["values"].reshape(-1, 4)).reshape(x.shape)
    assert np.allclose(xh.numpy(), want, atol=1e-5)
    assert reconstruction_error(rq, x)["rel_l2_mean"] < 0.5


@pytest.mark.parametrize("spec", ["int4r+mean", "int4r+prefix+mean", "pq:8+prefix+mean", "rq:4+mean", "pca:4+mean"])
def test_plus_mean_gives_back_each_rows_patch_mean_by_one_shift(spec):
    pytest.importorskip("faiss")
    x = vit_like(n=300, d=32)
    base_spec = spec.removesuffix("+mean")
    codec, base = make_codec(spec, num_prefix=1), make_codec(base_spec, num_prefix=1)
    sample = x[:, codec.num_prefix:].reshape(-1, 32)
    for c in (codec, base):
        c.fit(sample if c.needs_data else None, 32, seed=0)
    xh, enc = roundtrip(codec, x)
    plain, _ = roundtrip(base, x)
    mean = x[:, 1:].mean(1).half().float()  # what the side array holds: the patch mean in float16
    assert torch.allclose(xh[:, 1:].mean(1), mean, atol=1e-5)
    # the codes are the base codec's; decoding adds one vector per row to every patch token, nothing else
    assert torch.allclose(xh[:, 1:], plain[:, 1:] + (mean - plain[:, 1:].mean(1))[:, None], atol=1e-5)
    assert torch.equal(xh[:, :1], plain[:, :1])
    assert codec.bytes_per_row(9, 32) == base.bytes_per_row(9, 32) + 2 * 32
    assert sum(v[0].nbytes for v in enc.values()) == codec.bytes_per_row(9, 32)
    # the shift takes each row's mean error out of every token: the squared error over a row's patch tokens can
    # only fall, up to the float16 rounding of the stored mean (sum |e_i - mean e|^2 <= sum |e_i|^2)
    sq = lambda y: ((y[:, 1:] - x[:, 1:]) ** 2).sum((1, 2))  # noqa: E731
    rounding = 8 * ((mean - x[:, 1:].mean(1)) ** 2).sum(-1)
    assert (sq(xh) <= sq(plain) + rounding + 1e-4).all()


def test_bad_specs_are_one_line(tmp_path, cli):
    src = synthetic_store(tmp_path / "s.zarr", vit_like(n=20, d=31), np.arange(20) % 2)
    for spec, needle in (("int3", "choose one of"), ("pq:7", "must divide"), ("float16+prefix", "choose one of"),
                         ("float16+mean", "choose one of"), ("int4r+mean+prefix", "choose one of"),
                         ("int4", "odd width")):
        code, _, err = cli("compress", src, tmp_path / "o.zarr", "--codec", spec, "--quiet")
        one_line_error(code, err, needle)


def store_arrays(path):
    s = TokenStore.open(path)
    b = s.backend
    names = list(s.attrs["arrays"]) + [n for n in s.checksum_columns if n != "valid"] + \
        list((s.attrs.get("codec") or {}).get("parameters", [])) + ["checksums", "done", "valid", "labels"]
    out = {n: np.asarray(b.read_all(n)) for n in dict.fromkeys(names)}
    s.close()
    return out


@pytest.mark.parametrize("spec", ["pq:8+prefix", "int4r", "opq:8+prefix", "rq:4", "pq:8+prefix+mean"])
def test_compress_interrupted_and_resumed_is_bitwise_equal(tmp_path, spec, monkeypatch):
    pytest.importorskip("faiss")
    src = synthetic_store(tmp_path / "src.zarr", vit_like(n=70, d=32), np.arange(70) % 3, chunk_rows=16)
    whole = tmp_path / "whole.zarr"
    compress(src, str(whole), spec, chunk_rows=8, quiet=True)
    crashed = tmp_path / "crashed.zarr"
    real = TokenStore.mark_done
    calls = []

    def crash_after_three(self, c):
        calls.append(c)
        if len(calls) == 4:
            raise KeyboardInterrupt  # a chunk written but not flagged, like a kill between the two
        real(self, c)

    monkeypatch.setattr(TokenStore, "mark_done", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        compress(src, str(crashed), spec, chunk_rows=8, quiet=True)
    monkeypatch.setattr(TokenStore, "mark_done", real)
    with TokenStore.open(crashed) as s:
        assert s.done().sum() == 3 and not s.complete
    res = compress(src, str(crashed), spec, chunk_rows=8, quiet=True)
    assert res.status == "resumed" and res.chunks_written == 6
    a, b = store_arrays(whole), store_arrays(crashed)
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    assert verify_store(str(crashed), quiet=True).ok


def decoded_copy(path, out):
    """The tokens of a coded store, decoded, as a float32 store with the same rows, labels and model."""
    s = TokenStore.open(path)
    x = s.read_tokens(0, s.num_samples)
    labels, ids = s.labels, s.sample_ids
    s.close()
    return synthetic_store(out, x, labels, ids=ids, dtype="float32", chunk_rows=16)


def test_probe_on_a_coded_pair_equals_the_probe_on_its_decoded_tokens(tmp_path, cli):
    pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(1)
    protos = torch.randn(3, 32, generator=g) * 2
    y = np.arange(120) % 3
    x = torch.randn(120, 9, 32, generator=g) + protos[torch.from_numpy(y)][:, None]
    raw_tr = synthetic_store(tmp_path / "rtr.zarr", x[:80], y[:80], chunk_rows=16)
    raw_te = synthetic_store(tmp_path / "rte.zarr", x[80:], y[80:], chunk_rows=16, dataset_hash="test")
    tr, te = str(tmp_path / "tr.zarr"), str(tmp_path / "te.zarr")
    code, out, err = cli("compress", raw_tr, tr, "--codec", "pq:8", "--quiet")
    assert code == 0 and "created" in out, err
    code, _, err = cli("compress", raw_te, te, "--codec", "pq:8", "--codebook-from", tr, "--quiet")
    assert code == 0, err
    dtr, dte = decoded_copy(tr, tmp_path / "dtr.zarr"), decoded_copy(te, tmp_path / "dte.zarr")
    recs = []
    for a, b, name in ((tr, te, "coded"), (dtr, dte, "decoded")):
        out = tmp_path / f"{name}.jsonl"
        code, _, err = cli("probe", a, b, "--head", "linear-cls,linear-mean,knn-mean", "--out", out, "--quiet")
        assert code == 0, err
        recs.append({r["head"]: r for r in map(json.loads, open(out))})
    assert recs[0].keys() == recs[1].keys() == {"linear-cls", "linear-mean", "knn-mean"}
    for head in recs[0]:
        m0, m1 = recs[0][head]["metrics"], recs[1][head]["metrics"]
        for k in m0:
            if isinstance(m0[k], float):
                assert m0[k] == pytest.approx(m1[k], abs=1e-6), (head, k)


@pytest.mark.parametrize("spec", ["pq:4", "opq:4", "rq:2"])
def test_a_pair_coded_with_different_parameters_is_refused(tmp_path, cli, spec):
    pytest.importorskip("faiss")
    x, y = vit_like(n=48, d=32), np.arange(48) % 2
    raw = synthetic_store(tmp_path / "raw.zarr", x, y)
    a, b = str(tmp_path / "a.zarr"), str(tmp_path / "b.zarr")
    assert cli("compress", raw, a, "--codec", spec, "--quiet")[0] == 0
    assert cli("compress", raw, b, "--codec", spec, "--seed", "1", "--quiet")[0] == 0
    for other in (b, raw):  # another codebook; float16 tokens against a codebook
        code, _, err = cli("probe", a, other, "--head", "linear-mean", "--quiet")
        one_line_error(code, err, "coded differently", "--codebook-from")
    code, _, err = cli("compress", raw, b, "--codec", spec, "--codebook-from", a, "--quiet")
    one_line_error(code, err, "exists and was made otherwise", "codebook")


def test_verify_finds_a_flipped_byte_in_the_codebook_and_in_a_code_chunk_and_repair_fixes_both(tmp_path, cli):
    pytest.importorskip("faiss")
    raw = synthetic_store(tmp_path / "raw.zarr", vit_like(n=48, d=32), np.arange(48) % 2)
    dst = str(tmp_path / "pq.zarr")
    assert cli("compress", raw, dst, "--codec", "pq:8+prefix", "--chunk-rows", "16", "--quiet")[0] == 0
    before = store_arrays(dst)
    flip(chunk_file(dst, "codec/centroids", 0), offset=100)
    flip(chunk_file(dst, "tokens", 1), offset=10)
    code, out, _ = cli("verify", dst, "--quiet")
    assert code == 1
    damaged = [ln for ln in out.splitlines() if "codec/centroids" in ln or "tokens" in ln]
    assert any("codec/centroids" in ln and "checksum" in ln for ln in damaged), out
    assert any("tokens" in ln and "chunk 1" in ln for ln in damaged), out
    with pytest.raises(Exception, match="codec/centroids"):  # a reader refuses the damaged codebook
        with TokenStore.open(dst) as s:
            s.codec
    code, out, err = cli("compress", raw, dst, "--codec", "pq:8+prefix", "--chunk-rows", "16", "--repair", "--quiet")
    assert code == 0 and "repaired" in out, err
    assert cli("verify", dst, "--quiet")[0] == 0
    code, out, _ = cli("compress", raw, dst, "--codec", "pq:8+prefix", "--chunk-rows", "16", "--repair", "--quiet")
    assert code == 0 and "intact, codec pq:8+prefix, 0 of 3 chunks" in out
    after = store_arrays(dst)
    for k in before:
        assert np.array_equal(before[k], after[k]), k


@pytest.mark.parametrize("spec", ["int4r+prefix", "int4r+prefix+mean"])
def test_info_shows_codec_size_and_error(tmp_path, cli, spec):
    raw = synthetic_store(tmp_path / "raw.zarr", vit_like(n=40), np.arange(40) % 2)
    dst = tmp_path / "i4.zarr"
    assert cli("compress", raw, dst, "--codec", spec, "--quiet")[0] == 0
    code, out, err = cli("info", dst)
    assert code == 0, err
    lines = {ln.split("  ")[0]: ln for ln in out.splitlines()}
    t, d = 9, 64
    per_row = (t - 1) * (d // 2 + 2 * d // 32) + 2 * d + (2 * d if spec.endswith("+mean") else 0)
    assert f"{per_row / t:.1f} ({per_row / (2 * t * d):.4f}x of float16)" in lines["bytes / token"]
    assert spec in lines["codec"] and "relative L2" in lines["coding error"]
    assert ("patch-token mean kept" in lines["codec"]) == spec.endswith("+mean")
    assert os.path.isdir(dst / "codec" / "rotation")


@pytest.mark.parametrize("spec", ["int4+prefix", "pq:8", "int4+mean"])
def test_streamed_and_in_memory_readers_decode_like_read_tokens(tmp_path, spec):
    pytest.importorskip("faiss")
    from mimprobe.cache_store.stream import ChunkShuffleReader
    from mimprobe.probe.feed import Feeder

    raw = synthetic_store(tmp_path / "raw.zarr", vit_like(n=50, d=32), np.arange(50) % 2, chunk_rows=16)
    dst = str(tmp_path / "c.zarr")
    compress(raw, dst, spec, chunk_rows=8, quiet=True)
    with TokenStore.open(dst) as s:
        want = s.read_tokens(0, s.num_samples)
        rows = np.arange(s.num_samples)
        got = torch.zeros_like(want)
        for b in ChunkShuffleReader(dst, rows, 7, shuffle=True, seed=0):
            got[b.rows] = b.decode(s.codec)[:, 0]
        assert torch.equal(got, want)
        f = Feeder(s, rows, 16, device=torch.device("cpu"), arrays=["tokens"], shuffle=False, seed=0, in_memory=True)
        mem = torch.cat([b.decode(f.codec)[:, 0] for b in f.reader])
        assert torch.equal(mem, want)


def test_predict_with_a_head_saved_from_a_coded_pair_reads_the_coded_store(tmp_path, cli):
    """`predict` decodes a coded store as the probe did: the saved head's top-1 and each row's prediction are the
    probe's own on the coded eval store."""
    from mimprobe.probe.predictions import Predictions, record_path

    g = torch.Generator().manual_seed(2)
    protos = torch.randn(3, 32, generator=g) * 2
    y = np.arange(150) % 3
    x = torch.randn(150, 9, 32, generator=g) + protos[torch.from_numpy(y)][:, None]
    x[..., 5] *= 20  # an outlier channel, as in a ViT
    raw_tr = synthetic_store(tmp_path / "rtr.zarr", x[:100], y[:100], chunk_rows=16)
    raw_te = synthetic_store(tmp_path / "rte.zarr", x[100:], y[100:], chunk_rows=16, dataset_hash="test")
    tr, te = str(tmp_path / "tr.zarr"), str(tmp_path / "te.zarr")
    assert cli("compress", raw_tr, tr, "--codec", "int4r+prefix", "--quiet")[0] == 0
    assert cli("compress", raw_te, te, "--codec", "int4r+prefix", "--codebook-from", tr, "--quiet")[0] == 0
    out, heads = tmp_path / "r.jsonl", tmp_path / "heads"
    code, _, err = cli("probe", tr, te, "--head", "abmilp", "--lr", "3e-3", "--wd", "0", "--epochs", "3",
                       "--min-steps", "0", "--save-heads", heads, "--out", out, "--quiet", "--device", "cpu")
    assert code == 0, err
    rec = json.loads(out.read_text())
    csv = tmp_path / "p.csv"
    code, stdout, err = cli("predict", heads / "abmilp" / "seed0", te, "--out", csv, "--device", "cpu")
    assert code == 0, err
    assert f"top-1 {100 * rec['metrics']['eval_top1']:.2f}%" in stdout
    kept = Predictions.load(record_path(rec, str(out)))
    rows = [ln.split(",") for ln in csv.read_text().splitlines()[1:]]
    by_id = {r[0]: int(r[2]) for r in rows}
    assert len(by_id) == 50 and all(by_id[i] == p for i, p in zip(kept.ids, kept.top[:, 0].tolist()))


def test_extract_codec_writes_what_compress_makes_of_a_float32_extraction(image_folder, tiny_ckpt, tmp_path, cli):
    """`extract --codec int4r+prefix` (rotation from --seed) holds exactly the codes `compress` writes from the
    float32 tokens of the same extraction; `extract --repair` of it rewrites a damaged chunk bitwise."""
    from conftest import TINY

    base = [TINY, image_folder, "--checkpoint", tiny_ckpt, "--img-size", "32", "--workers", "0", "--quiet",
            "--chunk-rows", "8"]
    f32, coded, made = tmp_path / "f32.zarr", tmp_path / "x.zarr", tmp_path / "c.zarr"
    assert cli("extract", *base[:2], f32, *base[2:], "--codec", "float32")[0] == 0
    assert cli("extract", *base[:2], coded, *base[2:], "--codec", "int4r+prefix")[0] == 0
    assert cli("compress", f32, made, "--codec", "int4r+prefix", "--chunk-rows", "8", "--quiet")[0] == 0
    a, b = store_arrays(coded), store_arrays(made)
    for k in ("tokens", "scales", "codec/rotation", "labels", "valid"):
        assert np.array_equal(a[k], b[k]), k
    flip(chunk_file(str(coded), "tokens", 1), offset=5)
    assert cli("verify", coded, "--quiet")[0] == 1
    code, _, err = cli("extract", *base[:2], coded, *base[2:], "--codec", "int4r+prefix", "--repair")
    assert code == 0, err
    assert np.array_equal(store_arrays(coded)["tokens"], a["tokens"])
