"""A suite's stores before anything runs: the status, chunks, shape and fingerprint of those that exist (their
attributes only), the size on disk of those still to extract (from the model's config on the meta device and
the data source's length: no weights, no download), and whether they fit the free disk.
"""

from __future__ import annotations

import os
import shutil
from typing import TYPE_CHECKING

from mimprobe.errors import UserError, first_line
from mimprobe.suite.spec import ModelSpec
from mimprobe.units import human_bytes

if TYPE_CHECKING:
    from mimprobe.suite.plan import StorePlan, SuitePlan


FINGERPRINT = ("dataset.content_hash", "model.weights", "model.checkpoint_sha256")


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def read_store(sp: StorePlan) -> None:
    """Status, chunks, shape and fingerprint of an existing store (its attributes only)."""
    from mimprobe.cache_store import TokenStore

    if not TokenStore.exists(sp.path):
        sp.status = "missing"
        return
    try:
        with TokenStore.open(sp.path) as s:
            done = s.done()
            sp.chunks = (int(done.sum()), s.num_chunks)
            sp.shape = (s.num_samples, s.num_tokens, s.dim)
            sp.arrays = len(s.attrs.get("arrays", ["tokens"]))
            sp.est_bytes = s.num_samples * s.codec.bytes_per_row(s.num_tokens, s.dim) * sp.arrays
            sp.status = "complete" if s.complete else "incomplete"
            sp.left_bytes = 0 if s.complete else sp.est_bytes * (sp.chunks[1] - sp.chunks[0]) // sp.chunks[1]
            sp.fingerprint = {k: _get(s.attrs, k) for k in FINGERPRINT}
    except UserError as e:  # creation interrupted before the attributes: extract starts it again
        sp.status, sp.note = "unreadable", first_line(e)


def model_layout(m: ModelSpec) -> dict:
    """The model's token layout (num_patches, num_prefix_tokens, embed_dim, num_blocks) from its timm config,
    built on the meta device: no weights, no memory, no download."""
    import timm
    import torch

    from mimprobe.extract.families import family_of

    kwargs = {"num_classes": 0} | ({"img_size": m.img_size} if m.img_size else {})
    with torch.device("meta"):
        try:
            model = timm.create_model(m.timm, pretrained=False, **kwargs)
        except TypeError:  # convolutional models take no img_size
            kwargs.pop("img_size", None)
            model = timm.create_model(m.timm, pretrained=False, **kwargs)
    return family_of(model, m.timm).layout(model, [m.img_size] * 2 if m.img_size else None)


def inspect_stores(plan: SuitePlan, estimate: bool = True) -> None:
    """Read every existing store; with ``estimate``, the size on disk of the others (N · T · D · bytes per value
    · token arrays): N from the data source (each DATA opened once), T and D from the model's config."""
    from mimprobe.cache_store.codecs import make_codec
    from mimprobe.cache_store.schema import resolve_layers
    from mimprobe.data import open_source

    layouts: dict[str, dict | str] = {}
    sizes: dict[tuple, int | str] = {}
    for sp in plan.stores:
        read_store(sp)
        if sp.status == "complete" or not estimate or sp.shape is not None:
            continue
        m = sp.model
        if m.name not in layouts:
            try:
                layouts[m.name] = model_layout(m)
            except Exception as e:  # the estimate is advisory: extraction reports the real problem
                layouts[m.name] = first_line(e)
        key = (sp.data, sp.dataset.image_column, sp.dataset.label_column)
        if key not in sizes:
            try:
                sizes[key] = len(open_source(sp.data, image_column=sp.dataset.image_column,
                                             label_column=sp.dataset.label_column))
            except Exception as e:
                sizes[key] = first_line(e)
        lay, n = layouts[m.name], sizes[key]
        if isinstance(lay, str) or isinstance(n, str):
            sp.note = f"no estimate: {lay if isinstance(lay, str) else n}"
            continue
        n = min(n, sp.limit) if sp.limit else n
        t, d = lay["num_prefix_tokens"] + lay["num_patches"], lay["embed_dim"]
        try:
            blocks = len(resolve_layers(list(m.layers), lay["num_blocks"]))
        except UserError as e:
            sp.note = first_line(e)
            blocks = 1
        sp.shape, sp.arrays = (n, t, d), blocks + m.views
        sp.est_bytes = n * make_codec(m.dtype).bytes_per_row(t, d) * sp.arrays
        sp.left_bytes = sp.est_bytes


def free_disk(path: str) -> tuple[str, int] | None:
    """(the existing folder checked, its free bytes) for a local path; None for a URL."""
    if "://" in path and not path.startswith("file://"):
        return None
    p = os.path.abspath(path.removeprefix("file://"))
    while not os.path.exists(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)
    return p, shutil.disk_usage(p).free


def check_disk(plan: SuitePlan) -> str | None:
    """Why the stores still to write do not fit the free disk (one line), or None."""
    need = sum(sp.left_bytes or 0 for sp in plan.stores)
    free = free_disk(plan.suite.stores)
    if free is None or need <= free[1]:
        return None
    return (f"the plan needs ~{human_bytes(need)} for its stores but {free[0]} has {human_bytes(free[1])} free; "
            "free some space, point `stores` at a larger disk, or use dtype = \"int8\" (0.53x of float16)")
