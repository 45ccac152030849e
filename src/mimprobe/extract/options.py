"""What ``mimprobe extract`` is asked to do and what it reports: :class:`ExtractOptions` (every option of the
command, with its default), :func:`validate` (refusing contradictory or out-of-range options before anything
is loaded), :func:`settings_diff` (how an existing store differs from what the options would make), and
:class:`ExtractResult` (what one run did, and its one-line summary).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mimprobe.cache_store.codecs import extractable, seeded_params
from mimprobe.cache_store.schema import DTYPES, identity_diff
from mimprobe.data.transforms import DECODE_MODES
from mimprobe.errors import UserError
from mimprobe.units import human_bytes


@dataclass
class ExtractOptions:
    checkpoint: str | None = None
    checkpoint_key: str | None = None  # sub-dict or key prefix of the checkpoint that holds the encoder
    pretrained: bool = True
    img_size: int | None = None
    crop_pct: float | None = None
    dtype: str = "float16"
    format: str | None = None
    batch_size: int = 64
    workers: int | None = None
    device: str = "auto"
    limit: int | None = None
    decode: str = "pil"  # pil (exact, timm's preprocessing) | draft | gpu (see mimprobe.data.transforms)
    seed: int = 0
    chunk_rows: int | None = None
    layers: list[int] = field(default_factory=list)
    views: int = 0
    store_attention: bool = False  # also store the last block's [cls]→patch attention (extract/cls_attention.py)
    skip_bad: bool = False
    overwrite: bool = False
    repair: bool = False  # verify, un-mark damaged chunks, rewrite damaged index arrays / metadata, then resume
    quiet: bool = False
    image_column: str | None = None  # hf: column / wds: key of the image (default: detected)
    label_column: str | None = None  # hf: column / wds: key of the label (default: ClassLabel / cls)


@dataclass
class ExtractResult:
    path: str
    status: str  # "complete", "incomplete" (chunks left), "already complete", "intact" (--repair found nothing),
    # or "rank done" (a non-zero rank)
    num_samples: int
    rows_this_run: int
    seconds: float
    size_on_disk: int
    chunks_done: int
    num_chunks: int
    skipped: int
    repaired: str = ""  # what --repair found and fixed

    @property
    def images_per_second(self) -> float:
        return self.rows_this_run / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        if self.status == "already complete":
            return f"{self.path}: already complete ({self.num_samples} samples); nothing to do"
        if self.status == "intact":
            return f"{self.path}: verified intact ({self.num_samples} samples); nothing to repair"
        fixed = f"repaired ({self.repaired}): " if self.repaired else ""
        return (f"{self.path}: {fixed}{self.status}, {self.num_samples} samples, {self.chunks_done}/{self.num_chunks} "
                f"chunks, {human_bytes(self.size_on_disk)} on disk; this run {self.rows_this_run} images in {self.seconds:.1f} s "
                f"({self.images_per_second:.1f} img/s), {self.skipped} skipped")


def validate(opts: ExtractOptions) -> None:
    if opts.dtype not in DTYPES:
        extractable(opts.dtype, option="--codec/--dtype")  # one line naming every codec, or how to make this one
    if opts.batch_size <= 0:
        raise UserError("--batch-size must be positive")
    if opts.views < 0:
        raise UserError("--views must be >= 0")
    if opts.decode not in DECODE_MODES:
        raise UserError(f"--decode {opts.decode}: choose one of {', '.join(DECODE_MODES)}")
    if opts.decode == "gpu" and opts.views:
        raise UserError("--decode gpu does not make --views (training views are drawn on the CPU); use "
                        "--decode pil with --views")
    if opts.chunk_rows is not None and opts.chunk_rows <= 0:
        raise UserError("--chunk-rows must be positive")
    if opts.repair and opts.overwrite:
        raise UserError("--repair keeps a store and fixes it, --overwrite replaces it: choose one")


def extract_codec_params(bb, opts: ExtractOptions) -> dict | None:
    """The parameters of ``--codec`` when it has seeded ones (``int4r``'s rotation, from ``--seed``)."""
    return seeded_params(opts.dtype, num_prefix=int(bb.info["num_prefix_tokens"]), dim=bb.embed_dim, seed=opts.seed)


def settings_diff(store, attrs: dict, opts: ExtractOptions) -> list[str]:
    """How ``store``'s identity differs from a store made with ``attrs`` and ``opts`` (its chunk rows are
    compared only when ``--chunk-rows`` was given)."""
    auto_rows = opts.chunk_rows is None
    want = dict(attrs, dtype=opts.dtype, chunk_rows=store.chunk_rows if auto_rows else opts.chunk_rows)
    return identity_diff(store.attrs, want)
