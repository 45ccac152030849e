"""Saved heads: ``head.safetensors`` (weights, norm statistics, the final-norm parameters when used) plus
``config.json`` (head config, which blocks it reads, the class names, the model and preprocessing it expects)."""

from __future__ import annotations

import json
import os

from safetensors.torch import load_file, save_file

from mimprobe.errors import UserError
from mimprobe.probe.heads import create_head
from mimprobe.probe.trainer import HeadSet, TokenNorm

CONFIG = "config.json"
WEIGHTS = "head.safetensors"


def save_head(directory: str, headset: HeadSet, key: str, meta: dict) -> str:
    os.makedirs(directory, exist_ok=True)
    head = headset.heads[key]
    tensors = {f"head.{k}": v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    norm = None
    if headset.norm is not None:
        tensors["norm.weight"] = headset.norm.weight.cpu().contiguous()
        if headset.norm.bias is not None:
            tensors["norm.bias"] = headset.norm.bias.cpu().contiguous()
        norm = {"kind": headset.norm.kind, "eps": headset.norm.eps}
    save_file(tensors, os.path.join(directory, WEIGHTS))
    config = {"key": key, "head": head.config(), "inputs": headset.inputs[key], "final_norm": norm,
              "num_prefix": headset.num_prefix, **meta}
    with open(os.path.join(directory, CONFIG), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    return directory


def head_blocks(config: dict) -> list[int]:
    """Absolute indices of the blocks a saved head reads (its ``inputs`` are positions in the run's ``blocks``)."""
    blocks = config["blocks"]
    return [blocks[p] for p in config.get("inputs", range(len(blocks)))]


def _is_head(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, CONFIG)) and os.path.isfile(os.path.join(directory, WEIGHTS))


def head_dir(directory: str, what: str = "") -> str:
    """The saved head in ``directory``: the directory itself, or its one ``seedK/`` head (``--save-heads`` writes
    one folder per seed); several seeds, or none, is one UserError line that says which to pass."""
    if _is_head(directory):
        return directory
    seeds = sorted(e.path for e in os.scandir(directory) if e.is_dir() and _is_head(e.path)) \
        if os.path.isdir(directory) else []
    if len(seeds) == 1:
        return seeds[0]
    where = f"{what} {directory}" if what else directory
    if seeds:
        raise UserError(f"{where}: holds a head per seed; pass one of {', '.join(seeds)}")
    raise UserError(f"{where}: not a saved head (needs {CONFIG} and {WEIGHTS}; see probe --save-heads)")


def load_head(directory: str) -> tuple[HeadSet, dict]:
    directory = head_dir(directory)
    cfg_path = os.path.join(directory, CONFIG)
    with open(cfg_path, encoding="utf-8") as f:
        config = json.load(f)
    tensors = load_file(os.path.join(directory, WEIGHTS))
    hc = dict(config["head"])
    head = create_head(hc.pop("kind"), members=1, **hc)
    head.load_state_dict({k[len("head."):]: v for k, v in tensors.items() if k.startswith("head.")})
    norm = None
    if config.get("final_norm"):
        norm = TokenNorm({**config["final_norm"], "weight": tensors["norm.weight"], "bias": tensors.get("norm.bias")})
    key = config["key"]  # batches for a loaded head carry exactly its own blocks (see head_blocks)
    return HeadSet({key: head}, {key: list(range(len(config["inputs"])))}, norm,
                   config.get("num_prefix", hc.get("num_prefix", 1))).eval(), config
