"""``extract --store-attention``: the last block's [cls]→patch attention, stored beside the tokens.

For each image and head h, ``attention[h, j] = softmax_j(q_cls · k_j · scale)`` of the last block's own attention
over all T tokens, kept at the patch columns j ≥ P (P prefix tokens: [cls], registers); the prefix columns are
left out, so a row sums to 1 minus the [cls] query's share on the prefix tokens. It is recomputed from the
block's input by a forward hook on the block's ``attn`` module (timm's ``Attention``: ``qkv``, ``q_norm``,
``k_norm``, ``scale``), for the [cls] query only (O(heads·T·D) per image), in float32; the model's own forward
is not changed (fused attention stays on), so the stored tokens are the same with or without the option.

Covered: timm ``VisionTransformer`` models (and subclasses: DeiT distilled) whose last block's attention is
timm's plain ``Attention``, with a [cls] token (registers and a distillation token are prefix tokens). Refused in one line: models without a [cls] (I-JEPA gap ViTs, SigLIP), Eva / Beit (rotary or relative
position terms inside the attention) and the hierarchical families.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from mimprobe.errors import UserError



def describe(bb, name: str) -> dict:
    """The store's ``attention`` attribute for backbone ``bb``, or a UserError when it has no [cls] attention to
    store."""
    from timm.models.vision_transformer import Attention, VisionTransformer

    m = bb.model
    attn = getattr(m.blocks[-1], "attn", None) if hasattr(m, "blocks") else None
    if not isinstance(m, VisionTransformer) or type(attn) is not Attention:
        raise UserError(f"--store-attention: MODEL {name} ({type(m).__name__}, attention "
                        f"{type(attn).__name__ if attn is not None else 'none'}) is not a timm VisionTransformer with "
                        "timm's plain Attention (Eva / Beit add rotary or relative-position terms inside the attention, "
                        "hierarchical models have no [cls]); extract without --store-attention")
    if not bb.info.get("has_class_token"):
        raise UserError(f"--store-attention: MODEL {name} has no [cls] token (prefix tokens: "
                        f"{bb.info.get('prefix_tokens') or 'none'}), so no [cls]→patch attention; extract without "
                        "--store-attention")
    return {"block": len(m.blocks) - 1, "heads": int(attn.num_heads), "patches": int(bb.info["num_patches"]),
            "query": "cls", "dtype": "float16",
            "of": "softmax over all tokens of the [cls] query's logits q·k·scale, kept at the patch columns"}


def cls_attention(attn: nn.Module, x: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """timm ``Attention`` module ``attn`` on its input ``x`` (B, T, D) → (B, heads, T − num_prefix): the [cls]
    query's softmax attention over all tokens, at the patch columns (module doc), in float32."""
    B, T, _ = x.shape
    qkv = attn.qkv(x).reshape(B, T, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    logits = (q[:, :, :1].float() * attn.scale) @ k.float().transpose(-2, -1)  # (B, H, 1, T)
    return logits.softmax(-1)[:, :, 0, num_prefix:]


@contextlib.contextmanager
def capture(model: nn.Module, num_prefix: int, out: list):
    """Within the context, each forward through the last block appends its (B, heads, patches) [cls] attention
    to ``out``."""
    attn = model.blocks[-1].attn
    h = attn.register_forward_hook(lambda m, args, _y: out.append(cls_attention(m, args[0], num_prefix)))
    try:
        yield out
    finally:
        h.remove()
