"""kNN heads: DINO's weighted k-nearest-neighbour vote (probe/knn.py) over parameter-free pooled features, or over
the pooled vector of a saved head (``--pool-from``). Registered with the trained heads, so that a spec, a suite
file and the head table treat them alike; they have no parameters, and k and the temperature T are chosen on the
validation rows as (lr, wd) are for the trained heads."""

from __future__ import annotations

from mimprobe.probe.heads.base import Head, register

DINO = "Caron et al. 2021 (DINO), weighted kNN"


class KnnHead(Head):
    knn = True
    from_saved = False
    paper = DINO


@register("knn-cls")
class KnnCls(KnnHead):
    features = ("cls",)
    needs_cls = True
    summary = "kNN vote over the [cls] token (L2-normalised, cosine similarity)"


@register("knn-mean")
class KnnMean(KnnHead):
    features = ("mean",)
    summary = "kNN vote over the mean of the patch tokens"


@register("knn-clsmean")
class KnnClsMean(KnnHead):
    features = ("cls", "mean")
    needs_cls = True
    summary = "kNN vote over [cls] ‖ mean of the patch tokens"


@register("knn-head")
class KnnSavedHead(KnnHead):
    from_saved = True  # pools with the saved head in options["from"] (probe/run.py), not with pooled features
    internal = True
    summary = "kNN vote over a saved head's pooled vector: ask for it with --pool-from HEAD_DIR"
