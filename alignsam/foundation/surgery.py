"""CLIP Surgery's image side on open_clip modules: dual-path v-v attention and feature surgery.

Pure functions over an open_clip ``VisionTransformer`` and tensors; the method is described in
:mod:`alignsam.foundation.clip_surgery`, whose :class:`~alignsam.foundation.clip_surgery.TextMatcher`
combines them with the text side.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


# -- the surgery forward, on open_clip modules -------------------------------------------------
def check_surgery_compatible(visual: nn.Module) -> None:
    """Raise a clear error unless ``visual`` is an open_clip ViT this module can operate on."""
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    if not isinstance(visual, VisionTransformer):
        raise TypeError(
            f"CLIP Surgery needs an open_clip VisionTransformer image tower, got {type(visual).__name__} "
            "(ResNet and timm towers are not supported)"
        )
    if visual.attn_pool is not None:
        raise TypeError("CLIP Surgery does not support vision towers with an attentional pooler (CoCa-style)")
    for i, block in enumerate(visual.transformer.resblocks):
        if not isinstance(block, ResidualAttentionBlock) or hasattr(block, "ln_1_kv"):
            raise TypeError(
                f"vision block {i} is a {type(block).__name__}; CLIP Surgery supports open_clip's default "
                "ResidualAttentionBlock only (no qk_norm / scaled-cosine / custom block types)"
            )
        if not block.attn._qkv_same_embed_dim or block.attn.in_proj_bias is None:
            raise TypeError(f"vision block {i}: expected a packed q/k/v projection with bias")


def dual_path_attention(block: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Both attentions of one open_clip ``ResidualAttentionBlock`` on the same normalised tokens.

    Args:
        block: the block (its ``attn`` is an ``nn.MultiheadAttention`` with packed q/k/v weights).
        x: ``(B, N, C)`` tokens already passed through ``block.ln_1``.
    Returns:
        ``(qk, vv)``, each ``(B, N, C)``, after the output projection and layer scale ``ls_1``:
        ``qk`` is the block's own attention ``softmax(q k^T / sqrt(d)) v``; ``vv`` is the v-v
        attention ``softmax(v v^T / sqrt(d)) v`` of CLIP Surgery (per head, d = head width).
    """
    attn = block.attn
    batch, tokens, width = x.shape
    heads = attn.num_heads
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = (t.reshape(batch, tokens, heads, width // heads).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    scale = (width // heads) ** -0.5
    qk = torch.softmax((q @ k.transpose(-2, -1)) * scale, dim=-1) @ v
    vv = torch.softmax((v @ v.transpose(-2, -1)) * scale, dim=-1) @ v

    def project(out: torch.Tensor) -> torch.Tensor:
        out = out.transpose(1, 2).reshape(batch, tokens, width)
        return block.ls_1(attn.out_proj(out))

    return project(qk), project(vv)


def surgery_tokens(visual: nn.Module, pixels: torch.Tensor, vv_start_block: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Run an open_clip ``VisionTransformer`` with CLIP Surgery's dual paths.

    Args:
        visual: the image tower (checked by :func:`check_surgery_compatible`).
        pixels: ``(B, 3, S, S)`` normalised images at the tower's input size.
        vv_start_block: index of the first block with the v-v path (0 <= index < layers).
    Returns:
        ``(new, original)`` transformer outputs, each ``(B, 1 + gh * gw, width)`` (class token
        first), before ``ln_post``. ``original`` is exactly the unmodified network's output.
    """
    blocks = visual.transformer.resblocks
    batch_first = getattr(visual.transformer, "batch_first", True)
    x = visual._embeds(pixels)  # (B, 1 + N, width)
    for block in blocks[:vv_start_block]:
        x = block(x) if batch_first else block(x.transpose(0, 1)).transpose(0, 1)
    new, original = x, x
    for block in blocks[vv_start_block:]:
        qk, vv = dual_path_attention(block, block.ln_1(original))
        new = new + vv  # the new path skips the MLP
        original = original + qk
        original = original + block.ls_2(block.mlp(block.ln_2(original)))
    return new, original


def surgery_image_features(
    visual: nn.Module, pixels: torch.Tensor, vv_start_block: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dense and global image embeddings in CLIP's joint space (not normalised).

    Returns:
        patches ``(B, gh, gw, D)`` from the new path; global ``(B, D)`` pooled from the original
        path exactly as open_clip pools it (equal to ``model.encode_image``).
    """
    new, original = surgery_tokens(visual, pixels, vv_start_block)
    pooled, _ = visual._pool(original)
    patches = visual.ln_post(new[:, 1:])
    if visual.proj is not None:
        pooled, patches = pooled @ visual.proj, patches @ visual.proj
    gh, gw = visual.grid_size
    return patches.reshape(patches.shape[0], gh, gw, -1), pooled


# -- scoring -----------------------------------------------------------------------------------
def feature_surgery_scores(
    patches: torch.Tensor, global_: torch.Tensor, texts: torch.Tensor, weight_scale: float = 2.0
) -> torch.Tensor:
    """CLIP Surgery's feature surgery over K >= 2 texts scored together.

    Args:
        patches: ``(P, D)`` normalised patch embeddings of one image.
        global_: ``(D,)`` normalised global embedding of that image.
        texts: ``(K, D)`` normalised text embeddings.
        weight_scale: multiplier of ``g . t_k`` in the softmax that weights the texts (paper: 2).
    Returns:
        ``(P, K)``: ``w_k (f_i . t_k) - mean_k' w_k' (f_i . t_k')`` with ``w = K softmax(scale g . t)``.
    """
    prob = torch.softmax(weight_scale * (texts @ global_), dim=0)  # (K,)
    weighted = (patches @ texts.T) * (prob / prob.mean())[None, :]  # (P, K)
    return weighted - weighted.mean(dim=1, keepdim=True)


def minmax_normalize(maps: torch.Tensor) -> torch.Tensor:
    """Map each ``(..., h, w)`` map linearly onto [0, 1] (a constant map becomes all zeros)."""
    flat = maps.flatten(-2)
    low = flat.min(dim=-1, keepdim=True).values
    span = (flat.max(dim=-1, keepdim=True).values - low).clamp_min(1e-12)
    return ((flat - low) / span).reshape(maps.shape)
