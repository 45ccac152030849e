"""What ``mimprobe extract`` (and :func:`mimprobe.extract`, and a suite's models) can be asked and what it reports:
:class:`ExtractOptions` (every option, declared once: :mod:`mimprobe.options`), :func:`validate` (the checks of the
options alone, before anything is loaded) and :class:`ExtractResult` (what one run did, and its one-line summary).
Imports nothing heavy: the command line is built from it.
"""

from __future__ import annotations

from dataclasses import dataclass

from mimprobe.checks import Bad, a_bool, a_float, a_list, a_str, an_int, one_of
from mimprobe.errors import UserError
from mimprobe.options import check_fields, option
from mimprobe.units import human_bytes

a_device = one_of("auto", "cpu", "cuda", prefix="cuda:")


def a_format(name):
    """A registered store format (cache_store/formats.py): zarr, hdf5."""
    from mimprobe.cache_store.formats import BACKENDS

    return one_of(*BACKENDS)(name)


def a_decode(mode):
    """A decode mode of data/transforms.py (pil, draft, gpu)."""
    from mimprobe.data.transforms import DECODE_MODES

    return one_of(*DECODE_MODES)(mode)


def a_codec(spec):
    """A codec ``extract`` can write (cache_store/codecs.py): a dtype, int4, int4r, ... (+prefix)."""
    from mimprobe.cache_store.codecs import extractable

    spec = a_str(spec)
    try:
        extractable(spec)
    except UserError as e:  # the codec's own line, without its "--codec SPEC" (the caller names the option)
        msg = str(e)
        for prefix in (f"--codec {spec!r}", f"--codec {spec}"):
            msg = msg[len(prefix):] if msg.startswith(prefix) else msg
        raise Bad(f"{spec!r}{msg}") from None
    return spec


@dataclass
class ExtractOptions:
    checkpoint: str | None = option(None, "local weights (.safetensors, or .pth/.pt state_dict)", check=a_str,
                                    suite="models.checkpoint")
    checkpoint_key: str | None = option(None, "the checkpoint's sub-dict (a.b for nested) or key prefix holding the "
                                        "encoder, e.g. teacher (default: detected)", check=a_str,
                                        suite="models.checkpoint_key")
    pretrained: bool = option(True, "hub weights for MODEL (ignored with --checkpoint)", check=a_bool,
                              suite="models.pretrained")
    img_size: int | None = option(None, "create the model for this input size", check=an_int(1), suite="models.img_size")
    crop_pct: float | None = option(None, "override the model's eval crop_pct", check=a_float(0, 1, lo_open=True),
                                    suite="models.crop_pct")
    dtype: str = option("float16", "float16 | bfloat16 | float32 | int8 | int4 | int4r[+prefix][+mean] (pq:M / pca:K: "
                        "extract float16, then `mimprobe compress`)", flags=("--codec", "--dtype"), check=a_codec,
                        suite="models.codec")
    format: str | None = option(None, "zarr | hdf5 (default: from the suffix)", flags=("--format",),
                                check=a_format)
    batch_size: int = option(64, "images per forward pass", check=an_int(1), suite=("extract.batch_size", "models.batch_size"), run_option=True)
    workers: int | None = option(None, "DataLoader decode workers (default: min(8, cores))", check=an_int(0),
                                 suite="extract.workers", run_option=True)
    device: str = option("auto", "auto | cpu | cuda (bf16 autocast on CUDA)", check=a_device, run_option=True)
    limit: int | None = option(None, "only a seeded random subset of N samples", check=an_int(1))
    decode: str = option("pil", "pil: timm's own preprocessing (exact) | draft: large JPEGs decoded at reduced size "
                         "(faster, inexact) | gpu: JPEGs decoded on the device (inexact); inexact choices are "
                         "recorded in the store", check=a_decode)
    seed: int = option(0, "seed of the row permutation (and of --views crops)", check=an_int(), suite="extract.seed",
                       run_option=True)
    chunk_rows: int | None = option(None, "samples per chunk (default: ~16 MB chunks)", check=an_int(1),
                                    suite="extract.chunk_rows", run_option=True)
    layers: list[int] = option([], "more blocks to store, Python-style, e.g. -4,-8", kind="list", item=int,
                               check=a_list(an_int(), allow_empty=True), suite="models.layers")
    views: int = option(0, "K augmented training views per image (RandomResizedCrop + flip)", check=an_int(0),
                        suite="models.views")
    store_attention: bool = option(False, "also store the last block's [cls]→patch attention (N × heads × patches, "
                                   "float16), for lf-attn (extract/cls_attention.py)", check=a_bool,
                                   suite="extract.store_attention")
    skip_bad: bool = option(False, "mark undecodable images invalid and go on", check=a_bool, suite="extract.skip_bad",
                            run_option=True)
    overwrite: bool = option(False, "replace a store made with other settings", check=a_bool, run_option=True)
    repair: bool = option(False, "verify the store, then re-extract only its damaged chunks (and rewrite damaged "
                          "index arrays / metadata); the same command as the original", check=a_bool,
                          run_option=True)
    quiet: bool = option(False, "no progress bar or notes", check=a_bool, run_option=True)
    image_column: str | None = option(None, "hf: the image column / wds: the image key, e.g. jpg (default: the Image "
                                      "feature / jpg, jpeg, png, webp)", check=a_str,
                                      suite="datasets.image_column")
    label_column: str | None = option(None, "hf: the label column / wds: the label key (default: the ClassLabel "
                                      "feature or 'label' / cls)", check=a_str,
                                      suite="datasets.label_column")


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
    """Every check of the options alone: one UserError line for the first problem."""
    check_fields(opts)
    if opts.decode == "gpu" and opts.views:
        raise UserError("--decode gpu does not make --views (training views are drawn on the CPU); use "
                        "--decode pil with --views")
    if opts.repair and opts.overwrite:
        raise UserError("--repair keeps a store and fixes it, --overwrite replaces it: choose one")
