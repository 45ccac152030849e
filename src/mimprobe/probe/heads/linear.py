"""Linear heads on parameter-free pooled features: the MAE linear probe, BatchNorm1d(affine=False) → Linear."""

from __future__ import annotations

from mimprobe.probe.heads.base import GridHead, register

MAE = "MAE linear probe (He et al. 2022): BatchNorm1d(affine=False, eps=1e-6) → Linear"


@register("linear-cls")
class LinearCls(GridHead):
    features = ("cls",)
    needs_cls = True
    paper = MAE
    summary = "the [cls] token"


@register("linear-mean")
class LinearMean(GridHead):
    features = ("mean",)
    paper = MAE + "; mean of the patch tokens"
    summary = "the mean of the patch tokens"


@register("linear-clsmean")
class LinearClsMean(GridHead):
    features = ("cls", "mean")
    needs_cls = True
    paper = "DINOv2 / CAPI: [cls] ‖ mean of the patch tokens → BN → Linear"
    summary = "[cls] concatenated with the mean of the patch tokens (2D features)"
