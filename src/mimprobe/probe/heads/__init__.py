"""Probe heads, registered by name (see :mod:`.base` for what a head is and declares)."""

from mimprobe.probe.heads.base import HEADS, GridHead, create_head, head_class, parse_spec, register, spec_key
from mimprobe.probe.heads import linear, abmilp, attentive, ep, simpool, latent, gem, labelfree, knn  # noqa: F401,I001  (registers the heads, in this order)

__all__ = ["HEADS", "GridHead", "create_head", "head_class", "parse_spec", "register", "spec_key"]
