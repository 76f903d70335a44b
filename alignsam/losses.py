"""Segmentation losses on logits (shared by the tiny-SAM pretraining and the SRM)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft Dice loss per mask. logits, target: ``(N, ..., H, W)`` -> ``(N, ...)``."""
    prob = logits.sigmoid().flatten(-2)
    target = target.float().flatten(-2)
    inter = (prob * target).sum(-1)
    return 1 - (2 * inter + eps) / (prob.sum(-1) + target.sum(-1) + eps)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Sigmoid focal loss averaged over pixels. ``(N, ..., H, W)`` -> ``(N, ...)``."""
    target = target.float()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    prob = logits.sigmoid()
    p_t = prob * target + (1 - prob) * (1 - target)
    loss = ce * (1 - p_t) ** gamma
    loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
    return loss.flatten(-2).mean(-1)


def bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy averaged over pixels. ``(N, ..., H, W)`` -> ``(N, ...)``."""
    return F.binary_cross_entropy_with_logits(logits, target.float(), reduction="none").flatten(-2).mean(-1)


def mask_iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of bool masks ``(N, ..., H, W)`` -> ``(N, ...)``; an empty union counts as 1."""
    inter = (pred & target).flatten(-2).sum(-1).float()
    union = (pred | target).flatten(-2).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
