"""Label-free poolers: the pooling is fitted without labels on the train store's tokens, the classifier is the
linear probe (BatchNorm1d(affine=False) → Linear) fitted by L-BFGS on the (few-shot) subset.

A label-free head holds its fitted pooler as buffers (saved with the head, so ``predict`` pools from tokens);
:mod:`mimprobe.probe.label_free` fits it once per seed on a seeded sample of *all* usable train rows (labelled or
not; labels are never read), then its features are computed once per sample, as the linear heads' are. Tokens
are standardized per dimension by the sample's mean and standard deviation before any distance is taken, so the
options do not depend on a model's token scale. All fits are scikit-learn's, seeded.

``features = ()``: no parameter-free feature of :mod:`mimprobe.probe.pooling` is read; a batch holds either the
tokens (``fitted_features`` pools them) or this head's own pooled features (B, L, 1, F).
"""

from __future__ import annotations

import numpy as np
import torch

from mimprobe.errors import UserError
from mimprobe.probe.heads.base import GridHead, register

CONTENT = ("patch", ("patch", "all"))
IMAGES = (2000, int)  # images whose tokens the pooler is fitted on (a seeded sample of all usable train rows)


class LabelFreeHead(GridHead):
    features: tuple[str, ...] = ()
    label_free = True
    fits = True  # has a state fitted on train tokens (else :func:`label_free.fit` reads none)

    def build(self) -> None:
        L, D = self.num_blocks, self.dim
        self.register_buffer("center", torch.zeros(L, D))  # per-dimension mean of the fitting sample's tokens
        self.register_buffer("scale", torch.ones(L, D))  # and standard deviation
        self.build_pooler()

    def build_pooler(self) -> None:
        """The fitted state's buffers, shaped from the options alone (a saved head is re-created, then loaded)."""

    def width(self) -> int:
        """Pooled features per block."""
        raise NotImplementedError

    def feature_dim(self) -> int:
        return self.width() * self.num_blocks

    def standardize(self, t: torch.Tensor) -> torch.Tensor:
        """Tokens (B, L, N, D) → z = (t − center) / scale, per block and dimension."""
        return (t - self.center[:, None]) / self.scale[:, None]

    @torch.no_grad()
    def fit_pooler(self, x: torch.Tensor, seed: int) -> None:
        """Fit on tokens (n, L, T, D) of the sampled images (no label is passed, none is read)."""
        t = self.tokens(x.float())
        flat = t.transpose(0, 1).reshape(self.num_blocks, -1, self.dim).double()
        self.center.copy_(flat.mean(1).float())
        self.scale.copy_(flat.std(1).clamp_min(1e-6).float())
        z = self.standardize(t)
        for b in range(self.num_blocks):
            self.fit_block(b, z[:, b].reshape(-1, self.dim).numpy().astype(np.float64), z[:, b], seed)

    def fit_block(self, b: int, z: np.ndarray, zb: torch.Tensor, seed: int) -> None:
        """Fit block ``b``'s state on its standardized tokens: (n·N, D) float64, and (n, N, D)."""

    def embed(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Tokens t and their standardized z (B, L, N, D) → pooled (B, L, width)."""
        raise NotImplementedError

    def fitted_features(self, x: torch.Tensor, attention: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens (B, L, T, D) (and, for a head that ``needs_attention``, the store's [cls] attention (B, H, N) of
        the same rows) → this head's pooled features (B, L, 1, F)."""
        t = self.tokens(x)
        return self.embed(t, self.standardize(t)).unsqueeze(2)


@register("lf-rare")
class RareTokens(LabelFreeHead):
    paper = ("label-free; token weights from how unusual a token is (distance to the dataset's mean token or its "
             "nearest k-means prototype, scikit-learn KMeans), cf. feature-rarity saliency (Hou & Zhang 2007)")
    summary = ("softmax over the tokens of s/(t·s̄), s = squared standardized distance of a token to the dataset's "
               "mean token (ref=mean) or to its nearest of k prototypes (ref=proto), s̄ its mean over the fitting "
               "sample; weighted mean of the tokens")
    OPTIONS = {"ref": ("mean", ("mean", "proto")), "t": (1.0, float), "k": (16, int), "images": IMAGES,
               "content": CONTENT}

    def build_pooler(self) -> None:
        L, D, k = self.num_blocks, self.dim, self.options["k"]
        if self.options["t"] <= 0 or k < 1:
            raise UserError(f"--head {self.kind}: t must be positive and k at least 1 (t={self.options['t']}, k={k})")
        if self.options["ref"] == "proto":
            self.register_buffer("protos", torch.zeros(L, k, D))
        self.register_buffer("unit", torch.ones(L))  # mean score on the fitting sample

    def width(self) -> int:
        return self.dim

    def fit_block(self, b, z, zb, seed):
        if self.options["ref"] == "proto":
            from sklearn.cluster import KMeans

            km = KMeans(n_clusters=self.options["k"], n_init=1, random_state=seed).fit(z)
            self.protos[b] = torch.from_numpy(km.cluster_centers_).float()
        self.unit[b] = self.scores(zb, b).double().mean().float()

    def scores(self, z: torch.Tensor, b: int) -> torch.Tensor:
        """Mean squared standardized distance (B, N) of block b's tokens to the reference."""
        if self.options["ref"] == "mean":
            return z.pow(2).mean(-1)
        return torch.cdist(z, self.protos[b][None].expand(len(z), -1, -1)).pow(2).min(-1).values / self.dim

    def weights(self, z: torch.Tensor) -> torch.Tensor:
        """(B, L, N, D) → token weights (B, L, N)."""
        s = torch.stack([self.scores(z[:, b], b) for b in range(self.num_blocks)], 1)
        return (s / (self.unit[:, None] * self.options["t"])).softmax(-1)

    def embed(self, t, z):
        return torch.einsum("bln,blnd->bld", self.weights(z), t)

    def attention(self, x):
        """The token weights (1, B, L, 1, N): one query, shared by the members (heatmaps)."""
        return self.weights(self.standardize(self.tokens(x)))[None, :, :, None]


@register("lf-proto")
class Prototypes(LabelFreeHead):
    paper = ("label-free; a diagonal GMM over train tokens (scikit-learn GaussianMixture); soft-assignment "
             "residuals as VLAD (Jégou et al. 2010; NetVLAD's soft assignment, Arandjelović et al. 2016) and "
             "mixture weights, as PANTHER (Song et al. 2024) summarizes a slide; power normalization of improved Fisher "
             "vectors (Perronnin, Sánchez, Mensink 2010)")
    summary = ("k-component diagonal GMM over standardized tokens; per image and component the mean posterior "
               "a_k and the posterior-weighted residual mean (z − μ_k), concatenated (k·(D+1) features); "
               "norm=power: signed square root, then L2 per block")
    OPTIONS = {"k": (4, int), "norm": ("power", ("power", "none")), "images": IMAGES, "content": CONTENT}

    def build_pooler(self) -> None:
        L, D, k = self.num_blocks, self.dim, self.options["k"]
        if k < 1:
            raise UserError(f"--head {self.kind}: k must be at least 1 (k={k})")
        self.register_buffer("means", torch.zeros(L, k, D))
        self.register_buffer("variances", torch.ones(L, k, D))
        self.register_buffer("log_weights", torch.full((L, k), -float(np.log(k))))

    def width(self) -> int:
        return self.options["k"] * (self.dim + 1)

    def fit_block(self, b, z, zb, seed):
        from sklearn.mixture import GaussianMixture

        gm = GaussianMixture(self.options["k"], covariance_type="diag", reg_covar=1e-3, random_state=seed).fit(z)
        self.means[b] = torch.from_numpy(gm.means_).float()
        self.variances[b] = torch.from_numpy(gm.covariances_).float()
        self.log_weights[b] = torch.from_numpy(np.log(gm.weights_)).float()

    def posteriors(self, z: torch.Tensor) -> torch.Tensor:
        """(B, L, N, D) → component posteriors (B, L, N, k), as GaussianMixture.predict_proba."""
        mu, var = self.means[None, :, None], self.variances[None, :, None]  # (1, L, 1, k, D)
        d = z.unsqueeze(3) - mu
        ll = -0.5 * (torch.log(2 * torch.pi * var) + d * d / var).sum(-1)
        return (ll + self.log_weights[None, :, None]).softmax(-1)

    def embed(self, t, z):
        a = self.posteriors(z)  # (B, L, N, k)
        n = z.shape[2]
        resid = (torch.einsum("blnk,blnd->blkd", a, z) - a.sum(2).unsqueeze(-1) * self.means[None]) / n
        f = torch.cat([resid.flatten(2), a.mean(2)], -1)
        if self.options["norm"] == "power":  # improved Fisher vectors / VLAD (Perronnin et al. 2010)
            f = torch.nn.functional.normalize(f.sign() * f.abs().sqrt(), dim=-1)
        return f


@register("lf-attn")
class ClsAttention(LabelFreeHead):
    paper = ("label-free; the backbone's own last-block [cls]→patch attention as the token weights (stored by "
             "`extract --store-attention`), as DINO's attention maps segment objects (Caron et al. 2021) and "
             "attention-based token selection reads them (e.g. EViT, Liang et al. 2022)")
    summary = ("the stored [cls]→patch attention of the last block, averaged (heads=mean) or maxed (heads=max) "
               "over the attention heads, raised to 1/t and renormalized over the patches, weights the patch "
               "tokens of every block read; weighted sum")
    OPTIONS = {"heads": ("mean", ("mean", "max")), "t": (1.0, float)}
    fits = False
    needs_attention = True

    def build_pooler(self) -> None:
        if self.options["t"] <= 0:
            raise UserError(f"--head {self.kind}: t must be positive (t={self.options['t']})")

    def width(self) -> int:
        return self.dim

    def weights(self, attention: torch.Tensor) -> torch.Tensor:
        """The store's attention (B, H, N) → token weights (B, N)."""
        a = attention.float().clamp_min(0)
        a = a.mean(1) if self.options["heads"] == "mean" else a.amax(1)
        a = a.pow(1.0 / self.options["t"])
        return a / a.sum(-1, keepdim=True).clamp_min(1e-12)

    def fitted_features(self, x, attention=None):
        if attention is None:
            raise UserError(f"--head {self.kind}: pools with the store's [cls] attention, which was not given; "
                            "extract the store with --store-attention")
        t = self.tokens(x)
        if attention.shape[-1] != t.shape[2]:
            raise UserError(f"--head {self.kind}: the stored attention covers {attention.shape[-1]} patches, the "
                            f"tokens {t.shape[2]}")
        return torch.einsum("bn,blnd->bld", self.weights(attention.to(t.device)), t).unsqueeze(2)
