"""Token codecs: how a store holds its float tokens and how they come back as float32. A registry, one class per
codec (like the backends in :mod:`.formats`).

A codec is named by a spec string, recorded in the store's ``dtype`` attribute:

==================  ==========================================================================  ===============
spec                what a token array holds                                                    bytes / token
==================  ==========================================================================  ===============
``float16``         the tokens in float16                                                       2 D
``bfloat16``        the tokens' bfloat16 bits as uint16                                         2 D
``float32``         the tokens in float32                                                       4 D
``int8``            int8, one float16 absmax scale per 32 channels (the side array)             D + D/16
``int4``            int4 packed two per byte, one float16 scale per 32 channels                 D/2 + D/16
``int4r``           ``int4`` of the tokens times a seeded random orthogonal D x D matrix        D/2 + D/16
``pq:M``            product quantization: M bytes, codes of M sub-vectors in 256 centroids      M
``opq:M``           ``pq:M`` after a rotation learned by faiss's OPQ (stored)                   M
``rq:M``            residual quantization: M stages of 256 centroids over the whole token       M
``pca:K``           float16 coordinates on the top-K principal directions                       2 K
==================  ==========================================================================  ===============

``+prefix`` after a lossy spec (``int4r+prefix``, ``pq:48+prefix``) keeps the prefix tokens ([cls], registers)
exact in float16 in the side array and codes the patch tokens only. ``+mean`` (alone or after ``+prefix``:
``rq:24+prefix+mean``) also keeps each row's mean of the patch tokens in float16 (D values per row) and decoding
shifts the decoded patch tokens by one vector so that their mean is that one: the mean-pooled features (linear-mean,
knn-mean, the mean half of clsmean) come back as from float16, and every token's coding error loses its
per-row average, the part that pooled heads cannot average away (docs/design.md, codecs).

Per row a codec writes its ``values`` array under the token array's own name and, where it has one, a float16
``side`` array under :func:`~.schema.scales_name` (the int8 scales' name, so int8 stores keep their layout).
Codecs with parameters (the rotation, the PQ centroids, the PCA mean and basis) store them once per store as
float32 arrays ``codec/<name>``, checksummed like the index arrays; :attr:`Codec.fingerprint` identifies them, and
two stores probed together must agree on it (:func:`mimprobe.cache_store.store.check_compatible`). Decoding runs
with torch on the batch's device; fitting uses numpy/scipy and faiss (the optional extra ``mimprobe[pq]``).
"""

from __future__ import annotations

import hashlib
import re

import numpy as np
import torch

from mimprobe.cache_store import quant
from mimprobe.errors import UserError

CODECS: dict[str, type["Codec"]] = {}
PREFIX_SUFFIX = "+prefix"
MEAN_SUFFIX = "+mean"
PARAMS_GROUP = "codec/"


def register(cls: type["Codec"]) -> type["Codec"]:
    CODECS[cls.kind] = cls
    return cls


class Codec:
    """One way of storing tokens. Subclasses set :attr:`kind` and implement the core ``_encode`` / ``_decode`` on
    the coded tokens; this class adds the exact prefix tokens (``+prefix``), the exact patch mean (``+mean``) and
    the parameter bookkeeping."""

    kind: str = ""
    lossy: bool = False
    takes_arg: bool = False
    storage_dtype: np.dtype = np.dtype("f2")  # dtype of the values array
    param_names: tuple[str, ...] = ()
    needs_data: bool = False  # parameters fitted on a sample of tokens (else none, or from a seed)

    def __init__(self, arg: int | None = None, keep_prefix: bool = False, num_prefix: int = 0,
                 params: dict[str, np.ndarray] | None = None, keep_mean: bool = False):
        self.arg, self.keep_prefix, self.num_prefix = arg, keep_prefix, (num_prefix if keep_prefix else 0)
        self.keep_mean, self.patch_start = keep_mean, num_prefix  # the model's prefix tokens, kept or coded
        self.params = {k: np.asarray(v, dtype=np.float32) for k, v in (params or {}).items()}
        self._on: dict[str, dict[str, torch.Tensor]] = {}

    # --- naming --------------------------------------------------------------------------------------
    @property
    def spec(self) -> str:
        return (self.kind + (f":{self.arg}" if self.takes_arg else "") + (PREFIX_SUFFIX if self.keep_prefix else "")
                + (MEAN_SUFFIX if self.keep_mean else ""))

    # kept for the int8-era callers and the docs' word for it
    @property
    def dtype(self) -> str:
        return self.spec

    @property
    def quantized(self) -> bool:
        """Whether a float16 side array accompanies the values (int8 scales, or whatever the codec keeps)."""
        return self.keep_prefix or self.keep_mean or self._side_width(2 * quant.GROUP) is not None

    def describe(self) -> str:
        return self.kind

    @property
    def fingerprint(self) -> str | None:
        """sha256 (16 hex digits) of the spec and the parameters, for codecs with parameters; None otherwise."""
        if not self.param_names:
            return None
        h = hashlib.sha256(self.spec.encode())
        for k in sorted(self.params):
            h.update(k.encode())
            h.update(np.ascontiguousarray(self.params[k], dtype="<f4").tobytes())
        return h.hexdigest()[:16]

    # --- shapes --------------------------------------------------------------------------------------
    def coded_tokens(self, num_tokens: int) -> int:
        return num_tokens - self.num_prefix

    def values_row_shape(self, num_tokens: int, dim: int) -> tuple[int, ...]:
        return (self.coded_tokens(num_tokens), self._values_width(dim))

    def side_width(self, num_tokens: int, dim: int) -> tuple[int, ...] | None:
        """Row shape of the float16 side array, or None when there is none."""
        core = self._side_width(dim)
        t = self.coded_tokens(num_tokens)
        if not (self.keep_prefix or self.keep_mean):
            return None if core is None else (t, core)
        return (t * (core or 0) + self.num_prefix * dim + (dim if self.keep_mean else 0),)

    def bytes_per_row(self, num_tokens: int, dim: int) -> int:
        n = int(np.prod(self.values_row_shape(num_tokens, dim))) * self.storage_dtype.itemsize
        side = self.side_width(num_tokens, dim)
        return n + (int(np.prod(side)) * 2 if side is not None else 0)

    def _values_width(self, dim: int) -> int:
        return dim

    def _side_width(self, dim: int) -> int | None:
        return None

    def check_shape(self, num_tokens: int, dim: int, what: str = "the store") -> None:
        """Refuse a token shape this codec cannot code (one line)."""
        if self.keep_prefix and self.num_prefix == 0:
            raise UserError(f"--codec {self.spec}: {what} has no prefix tokens to keep; drop {PREFIX_SUFFIX}")
        if self.keep_mean and num_tokens <= self.patch_start:
            raise UserError(f"--codec {self.spec}: {what} has no patch tokens to average; drop {MEAN_SUFFIX}")

    # --- parameters ----------------------------------------------------------------------------------
    def fit(self, sample: torch.Tensor, dim: int, seed: int) -> None:
        """Set :attr:`params` from ``sample`` ((n, D) float32 tokens of the kind this codec codes), or from the
        seed alone. Codecs without parameters do nothing."""

    def _param(self, name: str, device) -> torch.Tensor:
        key = str(device)
        cache = self._on.setdefault(key, {})
        if name not in cache:
            cache[name] = torch.from_numpy(self.params[name]).to(device)
        return cache[name]

    # --- coding --------------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> dict[str, np.ndarray]:
        """float (B, T, D) → ``{"values": ..., ["scales": float16 side]}`` as stored."""
        x = x.detach()
        p = self.num_prefix
        vals, side = self._encode(x[:, p:] if p else x)
        out = {"values": vals}
        if self.keep_prefix or self.keep_mean:
            b = x.shape[0]
            parts = ([side.reshape(b, -1)] if side is not None else []) + \
                ([x[:, :p].to(torch.float16).cpu().numpy().reshape(b, -1)] if self.keep_prefix else []) + \
                ([x[:, self.patch_start:].float().mean(1).to(torch.float16).cpu().numpy()] if self.keep_mean else [])
            out["scales"] = np.concatenate(parts, axis=1)
        elif side is not None:
            out["scales"] = side
        return out

    def to_torch(self, values: np.ndarray) -> torch.Tensor:
        """Stored array → tensor in its compact dtype (zero copy where possible)."""
        return torch.from_numpy(np.ascontiguousarray(values))

    def decode(self, values: torch.Tensor, scales: torch.Tensor | None = None) -> torch.Tensor:
        """Compact tensor from :meth:`to_torch` (..., T', W) and its side (on any device) → float32 (..., T, D)."""
        if not (self.keep_prefix or self.keep_mean):
            return self._decode(values, scales)
        lead, t = values.shape[:-2], values.shape[-2]
        core = self._side_width_from(values)
        n_core = t * core
        side_core = scales[..., :n_core].reshape(*lead, t, core) if core else None
        x = self._decode(values, side_core)
        if self.keep_prefix:
            n_pre = self.num_prefix * x.shape[-1]
            prefix = scales[..., n_core:n_core + n_pre].reshape(*lead, self.num_prefix, -1).float()
            x = torch.cat([prefix, x], dim=-2)
        if self.keep_mean:  # one shift per row: the decoded patch tokens get the stored mean
            mean = scales[..., -x.shape[-1]:].float().unsqueeze(-2)
            patches = x[..., self.patch_start:, :]
            # in place: x is a tensor this call made (+mean is refused for the float codecs, whose decode may
            # return the stored values themselves)
            patches += mean - patches.mean(-2, keepdim=True)
        return x

    def roundtrip(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (..., T, D) coded and decoded as a store would hold it: float32 (..., T, D)."""
        flat = x.reshape(-1, *x.shape[-2:])
        enc = self.encode(flat)
        side = torch.from_numpy(enc["scales"]) if "scales" in enc else None
        return self.decode(self.to_torch(enc["values"]), side).reshape(x.shape)

    def _side_width_from(self, values: torch.Tensor) -> int:
        w = self._side_width(self._dim_from(values.shape[-1]))
        return w or 0

    def _dim_from(self, width: int) -> int:
        return width

    def _encode(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        raise NotImplementedError

    def _decode(self, values: torch.Tensor, side: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError


# --- lossless-ish float codecs -------------------------------------------------------------------------
@register
class Float16(Codec):
    kind = "float16"
    torch_dtype = torch.float16

    def _encode(self, x):
        return x.to(self.torch_dtype).cpu().numpy(), None

    def _decode(self, values, side):
        return values.float()


@register
class Float32(Float16):
    kind = "float32"
    storage_dtype = np.dtype("f4")
    torch_dtype = torch.float32


@register
class BFloat16(Float16):
    """bfloat16 has no zarr/HDF5 dtype: its bits are stored as uint16 and the spec says what they are."""

    kind = "bfloat16"
    storage_dtype = np.dtype("u2")

    def _encode(self, x):
        return x.to(torch.bfloat16).view(torch.int16).cpu().numpy().view(np.uint16), None

    def to_torch(self, values):
        return torch.from_numpy(np.ascontiguousarray(values)).view(torch.int16).view(torch.bfloat16)


# --- grouped-scale integer codecs ----------------------------------------------------------------------
@register
class Int8(Codec):
    """Symmetric int8, one float16 absmax scale per 32 channels of each token (:mod:`.quant`)."""

    kind = "int8"
    lossy = True
    storage_dtype = np.dtype("i1")
    qmax = 127.0

    def describe(self) -> str:
        return f"symmetric int{8 if self.qmax > 7 else 4}, one float16 absmax scale per {quant.GROUP} channels per token"

    def _side_width(self, dim):
        return quant.num_groups(dim)

    def _encode(self, x):
        q, s = quant.quantize(self._rotate(x.float()), qmax=self.qmax)
        return self._pack(q).cpu().numpy(), s.cpu().numpy()

    def _decode(self, values, side):
        return self._unrotate(quant.dequantize(self._unpack(values), side))

    def _pack(self, q):
        return q

    def _unpack(self, v):
        return v

    def _rotate(self, x):
        return x

    def _unrotate(self, x):
        return x


@register
class Int4(Int8):
    """Symmetric int4 (-7..7) packed two per byte (low nibble: even channel), one float16 scale per 32 channels."""

    kind = "int4"
    storage_dtype = np.dtype("u1")
    qmax = 7.0

    def _values_width(self, dim):
        return dim // 2

    def _dim_from(self, width):
        return width * 2

    def check_shape(self, num_tokens, dim, what="the store"):
        super().check_shape(num_tokens, dim, what)
        if dim % 2:
            raise UserError(f"--codec {self.spec}: {what} has an odd width D = {dim}; int4 packs channel pairs")

    def _pack(self, q):
        u = (q.to(torch.int16) + 8).to(torch.uint8)
        return u[..., 0::2] | (u[..., 1::2] << 4)

    def _unpack(self, v):
        lo = (v & 15).to(torch.int8) - 8
        hi = (v >> 4).to(torch.int8) - 8
        return torch.stack([lo, hi], dim=-1).flatten(-2)


@register
class Int4Rotated(Int4):
    """``int4`` of ``x @ R``, R a seeded random orthogonal matrix (scipy's Haar-distributed ``ortho_group``)
    stored in the store: the rotation spreads the few outlier channels over all channels, so group scales are
    no longer set by them (QuaRot / SpinQuant's idea for LLM weights). Decoding multiplies by ``R^T``."""

    kind = "int4r"
    param_names = ("rotation",)

    def describe(self) -> str:
        return super().describe() + ", after a seeded random orthogonal rotation (stored)"

    def fit(self, sample, dim, seed):
        from scipy.stats import ortho_group

        self.params = {"rotation": ortho_group.rvs(dim, random_state=seed).astype(np.float32)}
        self._on.clear()

    def _rotate(self, x):
        return x @ self._param("rotation", x.device)

    def _unrotate(self, x):
        return x @ self._param("rotation", x.device).T


# --- learned codecs (faiss / numpy) --------------------------------------------------------------------
class FittedCodec(Codec):
    """A codec fitted on a sample of tokens whose values are ``arg`` numbers per token (``pq:M``, ``pca:K``)."""

    lossy = True
    takes_arg = True
    needs_data = True

    def _values_width(self, dim):
        return self.arg

    def arg_problem(self, dim: int) -> str | None:
        raise NotImplementedError

    def check_shape(self, num_tokens, dim, what="the store"):
        super().check_shape(num_tokens, dim, what)
        problem = self.arg_problem(dim)
        if problem:
            raise UserError(f"--codec {self.spec}: {problem} (the width of {what})")


class FaissQuantizer(FittedCodec):
    """A codec whose codes are M bytes per token from a faiss quantizer (``ProductQuantizer``,
    ``ResidualQuantizer``): trained (seeded) on a sample, its one codebook array stored as ``param_names[-1]``,
    codes computed by faiss on the CPU; subclasses decode on the device."""

    storage_dtype = np.dtype("u1")

    def _quantizer(self, dim):
        """(faiss, an untrained quantizer for D = ``dim``) and the attribute holding its codebook."""
        raise NotImplementedError

    def _shape(self, dim) -> tuple[int, ...]:
        raise NotImplementedError

    def fit(self, sample, dim, seed):
        faiss, q, attr = self._quantizer(dim)
        q.cp.seed = int(seed)
        q.train(np.ascontiguousarray(sample.numpy(), dtype=np.float32))
        self.params = {self.param_names[-1]: faiss.vector_to_array(getattr(q, attr)).reshape(self._shape(dim))}
        self._on.clear()

    def _encode(self, x):
        dim = x.shape[-1]
        faiss, q, attr = self._quantizer(dim)
        faiss.copy_array_to_vector(self.params[self.param_names[-1]].reshape(-1), getattr(q, attr))
        q.is_trained = True
        codes = q.compute_codes(np.ascontiguousarray(x.float().cpu().numpy().reshape(-1, dim)))
        return codes.reshape(*x.shape[:-1], self.arg), None

    def _rows(self, values):
        """(the codebook as one (M·256, width) table on the codes' device, each code's row in it (..., M))."""
        book = self._param(self.param_names[-1], values.device)  # (M, 256, width)
        idx = values.long() + torch.arange(book.shape[0], device=values.device) * 256
        return book.reshape(-1, book.shape[-1]), idx

    def _gather(self, values):
        """One centroid per (token, byte): (..., M, width) from the codebook on the codes' device."""
        table, idx = self._rows(values)
        return table[idx]


@register
class ProductQuantizer(FaissQuantizer):
    """``pq:M``: each token split into M sub-vectors of D/M channels, each replaced by the index of its nearest of
    256 centroids (one byte). Centroids trained with faiss's ``ProductQuantizer`` (k-means, seeded) on a sample
    and stored; decoding gathers centroids on the device."""

    kind = "pq"
    param_names = ("centroids",)

    def describe(self) -> str:
        return f"product quantization, {self.arg} sub-quantizers x 256 centroids (8 bits), trained with faiss"

    def arg_problem(self, dim):
        return f"M must divide D = {dim}" if self.arg < 1 or dim % self.arg else None

    def _quantizer(self, dim):
        faiss = faiss_module(self.spec)
        return faiss, faiss.ProductQuantizer(dim, self.arg, 8), "centroids"

    def _shape(self, dim):
        return self.arg, 256, dim // self.arg

    def _decode(self, values, side):
        return self._gather(values).flatten(-2)


@register
class OptimizedProductQuantizer(ProductQuantizer):
    """``opq:M``: ``pq:M`` of ``x @ R``, R the orthogonal matrix faiss's ``OPQMatrix`` learns on the sample so that
    the M sub-vectors are balanced and decorrelated (Ge et al.'s OPQ); the PQ centroids are then trained on the
    rotated sample. Both stored; decoding gathers centroids and multiplies by ``R^T``. Same size as ``pq:M``."""

    kind = "opq"
    param_names = ("rotation", "centroids")

    def describe(self) -> str:
        return super().describe() + ", after a rotation learned by faiss's OPQMatrix (stored)"

    def fit(self, sample, dim, seed):
        faiss = faiss_module(self.spec)
        opq = faiss.OPQMatrix(dim, self.arg)
        x = np.ascontiguousarray(sample.numpy(), dtype=np.float32)
        opq.train(x)
        rotation = faiss.vector_to_array(opq.A).reshape(dim, dim).T.copy()  # apply(x) = x @ A^T
        super().fit(torch.from_numpy(x @ rotation), dim, seed)
        self.params["rotation"] = rotation

    def _encode(self, x):
        return super()._encode(x.float().cpu() @ torch.from_numpy(self.params["rotation"]))

    def _decode(self, values, side):
        return super()._decode(values, side) @ self._param("rotation", values.device).T


@register
class ResidualQuantizer(FaissQuantizer):
    """``rq:M``: residual quantization with M stages of 256 centroids (M bytes per token, like ``pq:M``, but each
    stage codes the whole D-dimensional residual the earlier stages left). Codebooks trained and codes found
    (beam search) with faiss's ``ResidualQuantizer``; decoding sums one centroid per stage."""

    kind = "rq"
    param_names = ("codebooks",)

    def describe(self) -> str:
        return f"residual quantization, {self.arg} stages x 256 centroids (8 bits), trained with faiss"

    def arg_problem(self, dim):
        return None if self.arg >= 1 else "M must be at least 1"

    def _quantizer(self, dim):
        faiss = faiss_module(self.spec)
        return faiss, faiss.ResidualQuantizer(dim, self.arg, 8), "codebooks"

    def _shape(self, dim):
        return self.arg, 256, dim

    def _decode(self, values, side):
        # one centroid per stage, summed by embedding_bag: no (..., M, D) intermediate, M times the output's size,
        # on the per-batch decode path of every probe epoch
        table, idx = self._rows(values)
        out = torch.nn.functional.embedding_bag(idx.reshape(-1, idx.shape[-1]), table, mode="sum")
        return out.reshape(*values.shape[:-1], table.shape[-1])


@register
class PCA(FittedCodec):
    """``pca:K``: float16 coordinates of ``x - mean`` on the top-K right singular vectors of a centred sample
    (numpy's SVD); mean and basis stored. Decoding is one matmul."""

    kind = "pca"
    param_names = ("mean", "basis")

    def describe(self) -> str:
        return f"projection on the top {self.arg} principal directions of a sample, float16"

    def arg_problem(self, dim):
        return None if 1 <= self.arg <= dim else f"K must be 1..{dim}"

    def fit(self, sample, dim, seed):
        x = sample.double().numpy()
        mean = x.mean(0)
        _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
        self.params = {"mean": mean.astype(np.float32), "basis": vt[: self.arg].astype(np.float32)}
        self._on.clear()

    def _encode(self, x):
        z = (x.float().cpu() - torch.from_numpy(self.params["mean"])) @ torch.from_numpy(self.params["basis"]).T
        return z.to(torch.float16).numpy(), None

    def _decode(self, values, side):
        return values.float() @ self._param("basis", values.device) + self._param("mean", values.device)


def faiss_module(spec: str):
    try:
        import faiss
    except ImportError:
        raise UserError(f"--codec {spec} needs faiss: pip install 'mimprobe[pq]'") from None
    return faiss


_SPEC = re.compile(r"^(?P<kind>[a-z0-9]+)(?::(?P<arg>\d+))?(?P<prefix>\+prefix)?(?P<mean>\+mean)?$")


def parse_spec(spec: str, option: str = "--codec") -> tuple[type[Codec], int | None, dict[str, bool]]:
    """``kind[:N][+prefix][+mean]`` → (class, N, {"keep_prefix", "keep_mean"}); one clear error (naming
    ``option``) for anything else."""
    m = _SPEC.match(str(spec).strip())
    cls = CODECS.get(m["kind"]) if m else None
    if cls is None or (m["arg"] is None) == cls.takes_arg or ((m["prefix"] or m["mean"]) and not cls.lossy):
        raise UserError(f"{option} {spec!r}: choose one of {', '.join(CODEC_SPECS)} (lossy ones may end in "
                        f"{PREFIX_SUFFIX} to keep the prefix tokens in float16, and in {MEAN_SUFFIX} to keep each "
                        f"row's patch mean)")
    return cls, (int(m["arg"]) if m["arg"] else None), {"keep_prefix": bool(m["prefix"]), "keep_mean": bool(m["mean"])}


CODEC_SPECS = ("float16", "bfloat16", "float32", "int8", "int4", "int4r", "pq:M", "opq:M", "rq:M", "pca:K")


def make_codec(spec: str, *, num_prefix: int = 0, params: dict | None = None) -> Codec:
    """The codec of ``spec`` (see the module doc); ``num_prefix``: the model's prefix tokens (used by
    ``+prefix``); ``params``: its stored parameters."""
    cls, arg, keep = parse_spec(spec)
    return cls(arg, num_prefix=num_prefix, params=params, **keep)


def is_valid_spec(spec: str) -> bool:
    try:
        parse_spec(spec)
        return True
    except UserError:
        return False


def extractable(spec: str, num_prefix: int = 0, option: str = "--codec") -> Codec:
    """The codec of ``spec`` if ``extract`` can write it directly (it needs no fit on tokens), else one line."""
    cls, arg, keep = parse_spec(spec, option)
    codec = cls(arg, num_prefix=num_prefix, **keep)
    if codec.needs_data:
        raise UserError(f"--codec {spec} is fitted on tokens: extract with --codec float16, then `mimprobe compress "
                        f"SRC DST --codec {spec}` (and --codebook-from TRAIN_STORE for the eval store)")
    return codec


def seeded_params(spec: str, *, num_prefix: int, dim: int, seed: int) -> dict[str, np.ndarray] | None:
    """The parameters of a codec that needs no data (``int4r``'s rotation) from ``seed``; None for codecs without
    parameters. Codecs fitted on data are refused (one line): they are made by ``mimprobe compress``."""
    codec = extractable(spec, num_prefix)
    if not codec.param_names:
        return None
    codec.fit(None, dim, seed)
    return codec.params


def reconstruction_error(codec: Codec, x: torch.Tensor) -> dict:
    """Per-token error of coding ``x`` (B, T, D): relative L2 ``|x̂ - x| / |x|`` and cosine, mean / median /
    worst, over every token, the prefix tokens and the patch tokens separately."""
    xh = codec.roundtrip(x)
    x = x.float()
    rel = (torch.linalg.vector_norm(xh - x, dim=-1) / torch.linalg.vector_norm(x, dim=-1).clamp_min(1e-12))
    cos = torch.nn.functional.cosine_similarity(xh, x, dim=-1)
    out = {"tokens": int(rel.numel()),
           "rel_l2_mean": float(rel.mean()), "rel_l2_median": float(rel.median()), "rel_l2_max": float(rel.max()),
           "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())}
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in out.items()}
