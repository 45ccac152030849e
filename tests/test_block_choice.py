"""One head per block (``HEAD@B``), and the label-free scores recorded to choose among blocks with (RankMe,
α-ReQ): a head on block B alone is that head on a store whose tokens are block B."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import synthetic_store
from mimprobe.errors import UserError
from mimprobe.probe.options import ProbeOptions
from mimprobe.probe.run import run_probe
from mimprobe.probe.metrics import alpha_req

N, T, D, C = 90, 5, 16, 3


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    d = tmp_path_factory.mktemp("blocks")
    g = torch.Generator().manual_seed(0)
    y = np.arange(N) % C
    last, b8 = torch.randn(N, T, D, generator=g), torch.randn(N, T, D, generator=g)
    b8[:, :, :C] += torch.nn.functional.one_hot(torch.from_numpy(y), C).float()[:, None] * 1.5  # block 8 knows more
    last[:, :, :C] += torch.nn.functional.one_hot(torch.from_numpy(y), C).float()[:, None] * 0.3
    ev = slice(0, 45)
    return {"multi": synthetic_store(d / "multi.zarr", last, y, blocks={8: b8}, chunk_rows=32),
            "multi_eval": synthetic_store(d / "multi_eval.zarr", last[ev], y[ev], blocks={8: b8[ev]}, chunk_rows=32),
            "b8": synthetic_store(d / "b8.zarr", b8, y, chunk_rows=32),
            "b8_eval": synthetic_store(d / "b8_eval.zarr", b8[ev], y[ev], chunk_rows=32)}


def _strip(r):
    return {k: r[k] for k in ("metrics", "rankme", "alpha_req", "params", "chosen", "grid")}


def test_head_at_block_equals_the_head_on_that_blocks_store(stores):
    kw = dict(seeds=[0], quiet=True, device="cpu", shots=5)
    got = run_probe(stores["multi"], stores["multi_eval"],
                    ProbeOptions(heads=["linear-mean", "linear-mean@-4", "lf-rare@8"], **kw))
    want = run_probe(stores["b8"], stores["b8_eval"], ProbeOptions(heads=["linear-mean", "lf-rare"], **kw))
    by = {r["head"]: r for r in got}
    assert set(by) == {"linear-mean", "linear-mean@-4", "lf-rare@-4"}
    assert by["linear-mean@-4"]["head_blocks"] == [8] and by["linear-mean"]["head_blocks"] == [11]
    for mine, theirs in (("linear-mean@-4", "linear-mean"), ("lf-rare@-4", "lf-rare")):
        ref = next(r for r in want if r["head"] == theirs)
        assert _strip(by[mine]) == _strip(ref), mine
    assert by["linear-mean@-4"]["metrics"]["eval_top1"] > by["linear-mean"]["metrics"]["eval_top1"]
    # with --layers, the multi-block head keeps reading the --layers blocks only
    recs = run_probe(stores["multi"], stores["multi_eval"], ProbeOptions(heads=["linear-mean", "linear-cls@-4"],
                                                                         layers=[-1], **kw))
    assert {r["head"]: r["head_blocks"] for r in recs} == {"linear-mean": [11], "linear-mean@-1": [11],
                                                           "linear-cls@-4": [8]}
    recs = run_probe(stores["multi"], stores["multi_eval"], ProbeOptions(heads=["linear-mean", "linear-mean@-1"],
                                                                         layers=[-1], **kw))
    assert [r["head"] for r in recs] == ["linear-mean", "linear-mean@-1"]  # the same head, once


@pytest.mark.parametrize("spec,needle", [("linear-mean@-3", "block -3 is not stored (blocks here: 8, 11)"),
                                         ("linear-mean@x", "after @ give one block index"),
                                         ("linear-mean@12", "the model has 12 blocks"),
                                         ("knn-mean@-4", "kNN reads the last block")])
def test_head_at_block_errors(stores, spec, needle):
    with pytest.raises(UserError, match=needle.replace("(", "\\(").replace(")", "\\)")):
        run_probe(stores["multi"], stores["multi_eval"], ProbeOptions(heads=[spec], device="cpu", quiet=True))


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_alpha_req_recovers_a_power_law(alpha):
    """Features whose centered covariance has eigenvalues exactly i^(−α): α-ReQ returns α."""
    g = torch.Generator().manual_seed(1)
    n, f = 400, 32
    a = torch.randn(n, f, generator=g, dtype=torch.float64)
    u, _ = torch.linalg.qr(a - a.mean(0))  # orthonormal columns, each of mean 0
    v, _ = torch.linalg.qr(torch.randn(f, f, generator=g, dtype=torch.float64))
    s = torch.arange(1, f + 1, dtype=torch.float64) ** (-alpha / 2)
    z = u @ torch.diag(s) @ v.T + 3.0  # an offset the centering removes
    assert alpha_req(z) == pytest.approx(alpha, abs=1e-6)
    assert alpha_req(z[:, :1]) == float("inf")  # one dimension: no decay to fit
