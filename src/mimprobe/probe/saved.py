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


def load_head(directory: str) -> tuple[HeadSet, dict]:
    cfg_path = os.path.join(directory, CONFIG)
    if not os.path.isfile(cfg_path) or not os.path.isfile(os.path.join(directory, WEIGHTS)):
        raise UserError(f"{directory}: not a saved head (needs {CONFIG} and {WEIGHTS}; see probe --save-heads)")
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
