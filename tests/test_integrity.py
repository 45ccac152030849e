"""Stores that survive damage: checksums recorded with every chunk, `mimprobe verify` names each damage, readers
refuse damaged data in one line (in memory, streamed, from DataLoader workers), `extract --repair` restores a
store bitwise equal to the undamaged one, and stores written before checksums still open."""

from __future__ import annotations

import filecmp
import json
import os
import shutil

import numpy as np
import pytest
import torch

from conftest import S3_BUCKET, TINY, synthetic_store
from mimprobe.cache_store import TokenStore
from mimprobe.cache_store.integrity import StoreDamaged, crc

PROBE = ["--epochs", "1", "--min-steps", "0", "--head", "linear-mean", "--optimizer", "adamw", "--quiet"]


# --- damage, done to files the way a disk, a copy or a person would ----------------------------------------------
def delete(path):
    os.remove(path)


def truncate(path, size=100):
    with open(path, "r+b") as f:
        f.truncate(size)


def flip(path, offset=30, n=2):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(n)
        f.seek(offset)
        f.write(bytes(x ^ 0xFF for x in b))


def chunk_file(store, array, c):
    ndim = len(TokenStore.open(store).backend.array(array).shape)
    return os.path.join(store, array, "c", str(c), *["0"] * (ndim - 1))


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """A train store (60 rows, 3 classes, chunks of 8) in fp16 and int8, and an eval store: no model needed."""
    root = tmp_path_factory.mktemp("integrity")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 5, 32, generator=g)
    y = np.arange(60) % 3
    x[torch.from_numpy(y == 1)] += 1.0
    return {
        "fp16": synthetic_store(root / "train.zarr", x, y, chunk_rows=8),
        "int8": synthetic_store(root / "train8.zarr", x, y, chunk_rows=8, dtype="int8"),
        "h5": synthetic_store(root / "train.h5", x, y, chunk_rows=8),
        "eval": synthetic_store(root / "eval.zarr", x[:30], y[:30], chunk_rows=8),
        "x": x,
    }


def damaged_copy(src, tmp_path, name="d"):
    dst = str(tmp_path / (name + (".h5" if src.endswith(".h5") else ".zarr")))
    (shutil.copy if src.endswith(".h5") else shutil.copytree)(src, dst)
    return dst


# --- checksums ----------------------------------------------------------------------------------------------------
def test_every_chunk_has_its_checksum_recorded(stores):
    for key in ("fp16", "int8", "h5"):
        s = TokenStore.open(stores[key])
        cols = s.checksum_columns
        assert cols == (["tokens", "scales", "valid"] if key == "int8" else ["tokens", "valid"])
        table = s.checksums_table()
        assert table.shape == (s.num_chunks, len(cols)) and (table != 0).all()
        for c in range(s.num_chunks):
            a, b = s.chunk_bounds(c)
            for j, name in enumerate(cols):
                assert crc(np.asarray(s.backend.array(name)[a:b])) == table[c, j], (key, name, c)
        assert s.attrs["index_checksums"]["labels"] == crc(s.labels)


# --- verify ---------------------------------------------------------------------------------------------------
def test_verify_intact_stores(stores, cli):
    for key in ("fp16", "int8", "h5"):
        code, out, err = cli("verify", stores[key], "--quiet")
        assert code == 0 and ": OK: 8/8 chunks done" in out and "crc32 checksums" in out, out


@pytest.mark.parametrize("damage,expect", [
    (lambda p: delete(chunk_file(p, "tokens", 3)), "tokens chunk 3 (rows 24-31): missing"),
    (lambda p: truncate(chunk_file(p, "tokens", 2)), "tokens chunk 2 (rows 16-23): short: 100 of 2560 bytes"),
    (lambda p: flip(chunk_file(p, "tokens", 7)), "tokens chunk 7 (rows 56-59): checksum mismatch"),
    (lambda p: flip(chunk_file(p, "valid", 1), 0, 1), "valid chunk 1 (rows 8-15): checksum mismatch"),
    (lambda p: delete(chunk_file(p, "checksums", 4)), "checksums chunk 4 (rows 32-39): record missing"),
    (lambda p: flip(os.path.join(p, "labels", "c", "0"), 8, 1), "labels: checksum mismatch"),
    (lambda p: delete(os.path.join(p, "sample_ids", "c", "0")), "sample_ids: checksum mismatch"),
    (lambda p: truncate(os.path.join(p, "tokens", "zarr.json"), 20), "tokens: JSONDecodeError"),
    (lambda p: delete(os.path.join(p, "done", "c", "5")), "done chunk 5 (rows 40-47): not marked done, but the store"),
])
def test_verify_names_each_damage_and_probe_refuses_it(stores, tmp_path, cli, damage, expect):
    p = damaged_copy(stores["fp16"], tmp_path)
    damage(p)
    code, out, err = cli("verify", p, "--quiet")
    assert code == 1 and ": DAMAGED:" in out and expect in out and "--repair" in out, out
    if "done chunk" in expect:  # a lost done flag: the store is incomplete, readers say so and name the fix
        code, out, err = cli("probe", p, stores["eval"], *PROBE)
        assert code == 2 and "incomplete" in one_error_line(err)
        return
    for mode in (["--in-memory"], ["--stream"]):
        code, out, err = cli("probe", p, stores["eval"], *PROBE, *mode)
        line = one_error_line(err)
        assert code == 2 and "damaged" in line and "--repair" in line, (mode, err)


def test_verify_root_metadata_damage(stores, tmp_path, cli):
    p = damaged_copy(stores["fp16"], tmp_path)
    truncate(os.path.join(p, "zarr.json"), 20)
    code, out, err = cli("verify", p, "--quiet")
    assert code == 1 and "DAMAGED: its metadata (zarr.json) is damaged" in out and "--repair" in out
    code, out, err = cli("probe", p, stores["eval"], *PROBE)
    assert code == 2 and "zarr.json" in one_error_line(err)
    os.remove(os.path.join(p, "zarr.json"))
    code, out, err = cli("verify", p, "--quiet")
    assert code == 1 and "zarr.json) is missing" in out


def test_int8_scales_and_hdf5_chunks(stores, tmp_path, cli):
    p = damaged_copy(stores["int8"], tmp_path)
    flip(chunk_file(p, "scales", 2), 10)
    code, out, err = cli("verify", p, "--quiet")
    assert code == 1 and "scales chunk 2 (rows 16-23): checksum mismatch" in out
    code, out, err = cli("probe", p, stores["eval"], *PROBE)
    assert code == 2 and "chunk 2 of scales" in one_error_line(err)

    h = damaged_copy(stores["h5"], tmp_path)
    s = TokenStore.open(h)
    off, nbytes = s.backend._chunk_span("tokens", 4)
    s.close()
    flip(h, off + 100)  # bytes inside chunk 4 of tokens (HDF5 allocates every chunk: none can be "missing")
    code, out, err = cli("verify", h, "--quiet")
    assert code == 1 and "tokens chunk 4 (rows 32-39): checksum mismatch" in out
    for mode in (["--in-memory"], ["--stream"]):
        code, out, err = cli("probe", h, stores["eval"], *PROBE, *mode)
        assert code == 2 and "chunk 4 of tokens" in one_error_line(err)
    truncate(h, off + 10)  # the file cut inside chunk 4
    code, out, err = cli("verify", h, "--quiet")
    assert code == 1 and "truncated" in out and "--overwrite" in out
    code, out, err = cli("probe", h, stores["eval"], *PROBE)
    assert code == 2 and "truncated" in one_error_line(err)


# --- readers ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_streamed_errors_from_dataloader_workers_are_one_line(stores, tmp_path, cli):
    p = damaged_copy(stores["fp16"], tmp_path)
    delete(chunk_file(p, "tokens", 6))
    code, out, err = cli("probe", p, stores["eval"], *PROBE, "--stream", "--workers", "1")
    line = one_error_line(err)
    assert code == 2 and line.startswith(f"error: {p}: chunk 6 of tokens (rows 48-55) is damaged (missing)")
    q = damaged_copy(stores["fp16"], tmp_path, "f")
    flip(chunk_file(q, "tokens", 1))
    code, out, err = cli("probe", q, stores["eval"], "--epochs", "1", "--min-steps", "0", "--head", "abmilp",
                         "--optimizer", "adamw", "--quiet", "--stream", "--workers", "1")
    assert code == 2 and "chunk 1 of tokens" in one_error_line(err) and "checksum mismatch" in err


@pytest.mark.slow
def test_predict_refuses_a_damaged_store(stores, tmp_path, cli):
    heads = tmp_path / "heads"
    code, out, err = cli("probe", stores["fp16"], stores["eval"], *PROBE, "--save-heads", heads)
    assert code == 0, err
    head = os.path.join(heads, "linear-mean", "seed0")
    assert cli("predict", head, stores["eval"])[0] == 0
    p = damaged_copy(stores["eval"], tmp_path)
    flip(chunk_file(p, "tokens", 2))
    code, out, err = cli("predict", head, p)
    assert code == 2 and "chunk 2 of tokens" in one_error_line(err) and "checksum mismatch" in err


def test_user_error_from_a_worker_keeps_its_one_line():
    from torch._utils import ExceptionWrapper

    try:
        raise StoreDamaged("s.zarr: chunk 3 of tokens is damaged (missing); do this")
    except StoreDamaged:
        w = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(StoreDamaged) as e:
        w.reraise()
    assert str(e.value) == "s.zarr: chunk 3 of tokens is damaged (missing); do this"


def test_checksum_checks_on_first_read_and_every_read_when_asked(stores, tmp_path, monkeypatch):
    """Without --verify-reads a chunk's checksum is checked on its first read in a process (then presence and
    size only); MIMPROBE_VERIFY_READS=1 checks every read."""
    from mimprobe.cache_store.chunk_io import VERIFY_READS_ENV

    p = damaged_copy(stores["fp16"], tmp_path)
    f = chunk_file(p, "tokens", 0)
    s = TokenStore.open(p)
    s.chunk("tokens", 0)  # first read: checked, fine
    st = os.stat(f)
    flip(f)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # same file, same mtime: this process checked it already
    s.chunk("tokens", 0)  # not checked again (the cost of a CRC pass on every epoch's read)
    monkeypatch.setenv(VERIFY_READS_ENV, "1")
    with pytest.raises(StoreDamaged, match="chunk 0 of tokens.*checksum mismatch"):
        TokenStore.open(p).chunk("tokens", 0)
    with pytest.raises(StoreDamaged):
        s.chunk("tokens", 0, verify=True)  # in-memory loads always check


def test_info_does_not_say_complete_when_chunks_are_missing(stores, tmp_path, cli):
    p = damaged_copy(stores["fp16"], tmp_path)
    code, out, _ = cli("info", p)
    assert "complete       yes" in out
    delete(chunk_file(p, "tokens", 2))
    code, out, _ = cli("info", p)
    assert code == 0 and "complete       NO: DAMAGED (tokens chunk 2: missing)" in out and "mimprobe verify" in out


def test_store_without_checksums_opens_probes_and_is_checked_for_presence(stores, tmp_path, cli):
    """A store as written before checksums existed (no `checksums` array, no checksum attributes)."""
    p = damaged_copy(stores["fp16"], tmp_path, "old")
    shutil.rmtree(os.path.join(p, "checksums"))
    with open(os.path.join(p, "zarr.json")) as f:
        meta = json.load(f)
    for key in ("checksums", "index_checksums"):
        meta["attributes"].pop(key)
    with open(os.path.join(p, "zarr.json"), "w") as f:
        json.dump(meta, f)
    s = TokenStore.open(p)
    assert not s.has_checksums and torch.equal(s.read_tokens(0, 60), TokenStore.open(stores["fp16"]).read_tokens(0, 60))
    code, out, err = cli("verify", p, "--quiet")
    assert code == 0 and "presence and size only: no checksums" in out
    for mode in (["--in-memory"], ["--stream"]):
        code, out, err = cli("probe", p, stores["eval"], *PROBE, *mode)
        assert code == 0, err
    delete(chunk_file(p, "tokens", 5))
    code, out, err = cli("verify", p, "--quiet")
    assert code == 1 and "tokens chunk 5 (rows 40-47): missing" in out
    code, out, err = cli("probe", p, stores["eval"], *PROBE, "--stream")
    assert code == 2 and "chunk 5 of tokens" in one_error_line(err)


# --- repair -----------------------------------------------------------------------------------------------------
def _extract_args(folder, store, ckpt):
    return ["extract", TINY, folder, store, "--checkpoint", ckpt, "--img-size", "32", "--chunk-rows", "4",
            "--batch-size", "8", "--workers", "0", "--quiet"]


def _same_tree(a: str, b: str) -> None:
    cmp = filecmp.dircmp(a, b)
    stack = [cmp]
    while stack:
        d = stack.pop()
        assert not (d.left_only or d.right_only or d.funny_files), (d.left, d.left_only, d.right_only)
        _, mismatch, errors = filecmp.cmpfiles(d.left, d.right, d.common_files, shallow=False)
        assert not mismatch and not errors, (d.left, mismatch, errors)
        stack += d.subdirs.values()


@pytest.fixture(scope="module")
def ref_store(tmp_path_factory, image_folder, tiny_ckpt):
    from mimprobe.extract.options import ExtractOptions
    from mimprobe.extract.runner import extract

    root = tmp_path_factory.mktemp("ref")
    out = {}
    for suffix in (".zarr", ".h5"):
        p = str(root / f"ref{suffix}")
        extract(TINY, image_folder, p, ExtractOptions(checkpoint=tiny_ckpt, img_size=32, chunk_rows=4, batch_size=8,
                                                      workers=0, quiet=True))
        out[suffix] = p
    return out


@pytest.mark.parametrize("what", ["chunks", "index", "array-metadata", "root-metadata"])
def test_repair_restores_a_bitwise_equal_zarr_store(ref_store, tmp_path, image_folder, tiny_ckpt, cli, what):
    p = damaged_copy(ref_store[".zarr"], tmp_path)
    if what == "chunks":
        delete(chunk_file(p, "tokens", 1))
        truncate(chunk_file(p, "tokens", 2))
        flip(chunk_file(p, "tokens", 4))
        flip(chunk_file(p, "valid", 5), 0, 1)
        delete(os.path.join(p, "done", "c", "3"))
    elif what == "index":
        flip(os.path.join(p, "labels", "c", "0"), 8, 1)
        delete(os.path.join(p, "sample_ids", "c", "0"))
    elif what == "array-metadata":
        flip(chunk_file(p, "tokens", 0))  # checked once the metadata is back
        truncate(os.path.join(p, "tokens", "zarr.json"), 20)
    else:
        truncate(os.path.join(p, "zarr.json"), 20)
    assert cli("verify", p, "--quiet")[0] == 1
    code, out, err = cli(*_extract_args(image_folder, p, tiny_ckpt), "--repair")
    assert code == 0 and "repaired (" in out, (out, err)
    if what == "chunks":  # only the damaged chunks were extracted again (chunks 1-5: batches of 2 chunks)
        assert "5 damaged chunk(s) re-extracted: 1, 2, 3, 4, 5" in out
    _same_tree(ref_store[".zarr"], p)
    assert cli("verify", p, "--quiet")[0] == 0
    code, out, err = cli(*_extract_args(image_folder, p, tiny_ckpt), "--repair")
    assert code == 0 and "verified intact" in out


def test_repair_hdf5_and_refusals(ref_store, tmp_path, image_folder, tiny_ckpt, cli):
    h = damaged_copy(ref_store[".h5"], tmp_path)
    s = TokenStore.open(h)
    off, _ = s.backend._chunk_span("tokens", 2)
    s.close()
    flip(h, off + 50)
    code, out, err = cli(*_extract_args(image_folder, h, tiny_ckpt), "--repair")
    assert code == 0 and "1 damaged chunk(s) re-extracted: 2" in out, (out, err)
    a, b = TokenStore.open(ref_store[".h5"]), TokenStore.open(h)
    for name in ("tokens", "valid", "done", "labels", "checksums"):  # HDF5 may re-allocate the rewritten attributes:
        assert np.asarray(a.backend.array(name)[:]).tobytes() == np.asarray(b.backend.array(name)[:]).tobytes()
    assert a.attrs == b.attrs and a.sample_ids == b.sample_ids  # so equal content, not equal file bytes
    # another command than the one that made the store, or no store at all: refused in one line
    p = damaged_copy(ref_store[".zarr"], tmp_path)
    code, out, err = cli(*_extract_args(image_folder, p, tiny_ckpt), "--repair", "--dtype", "int8")
    assert code == 2 and "--repair needs the command that made the store" in one_error_line(err)
    code, out, err = cli(*_extract_args(image_folder, str(tmp_path / "none.zarr"), tiny_ckpt), "--repair")
    assert code == 2 and "nothing to repair" in one_error_line(err)


def test_rerun_without_repair_finishes_a_store_that_lost_done_flags(ref_store, tmp_path, image_folder, tiny_ckpt, cli):
    """A store that says complete but lost a done flag is not 'already complete': the chunk is extracted again."""
    p = damaged_copy(ref_store[".zarr"], tmp_path)
    delete(os.path.join(p, "done", "c", "0"))
    code, out, err = cli(*_extract_args(image_folder, p, tiny_ckpt))
    assert code == 0 and "6/6 chunks" in out and "this run 8 images" in out, out
    _same_tree(ref_store[".zarr"], p)


# --- object storage -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_s3_store_verify_and_refusal(stores, tmp_path, cli, s3):
    """A store in S3 (moto's server): verify reads every object, names a deleted and a corrupted one; a streamed
    probe refuses each in one line."""
    fs = s3["fs"]
    url = f"s3://{S3_BUCKET}/integrity.zarr"
    fs.put(stores["fp16"], url[len("s3://"):], recursive=True)
    code, out, err = cli("verify", url, "--quiet")
    assert code == 0 and ": OK: 8/8 chunks done" in out, (out, err)
    fs.rm(f"{S3_BUCKET}/integrity.zarr/tokens/c/3/0/0")
    key = f"{S3_BUCKET}/integrity.zarr/tokens/c/5/0/0"
    data = bytearray(fs.cat_file(key))
    data[40] ^= 0xFF
    fs.pipe_file(key, bytes(data))
    fs.invalidate_cache()
    code, out, err = cli("verify", url, "--quiet")
    assert code == 1 and "tokens chunk 3 (rows 24-31): missing" in out
    assert "tokens chunk 5 (rows 40-47): checksum mismatch" in out
    code, out, err = cli("info", url)
    assert "NO: DAMAGED (tokens chunk 3: missing)" in out
    code, out, err = cli("probe", url, stores["eval"], *PROBE, "--stream")
    assert code == 2 and "damaged" in one_error_line(err)


def test_all_zero_chunks_are_written(tmp_path, cli):
    """zarr skips all-zero chunks unless each writing handle says otherwise: a chunk of zero tokens (or of invalid
    rows) must still be a file, or the store reads as damaged."""
    p = synthetic_store(tmp_path / "zero.zarr", torch.zeros(16, 3, 4), np.arange(16) % 2, chunk_rows=8)
    code, out, err = cli("verify", p, "--quiet")
    assert code == 0 and ": OK: 2/2 chunks done" in out, (out, err)


def test_verify_reads_is_a_probe_option_from_python_too(stores, monkeypatch):
    """``verify_reads`` is declared with the other probe options (flag, suite key, Python keyword): every store a
    run with it opens checks every read, and the setting ends with the run."""
    import mimprobe
    from mimprobe.cache_store import store as store_mod
    from mimprobe.cache_store.chunk_io import VERIFY_READS_ENV

    monkeypatch.delenv(VERIFY_READS_ENV, raising=False)
    seen = []
    real = store_mod.verify_reads_default
    monkeypatch.setattr(store_mod, "verify_reads_default", lambda: seen.append(real()) or seen[-1])
    kw = dict(heads=["abmilp"], in_memory=False, lrs=[1e-3], wds=[0.0], epochs=1, min_steps=1, device="cpu",
              quiet=True)
    mimprobe.probe(stores["fp16"], stores["eval"], **kw)
    assert seen and not any(seen)
    seen.clear()
    mimprobe.probe(stores["fp16"], stores["eval"], verify_reads=True, **kw)
    assert seen and all(seen)
    assert VERIFY_READS_ENV not in os.environ
