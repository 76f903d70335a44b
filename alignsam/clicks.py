"""Click simulators shared by the tiny-SAM pretraining and the evaluation baselines.

All clicks are ``(x, y)`` in the frame of the masks they are computed from (pixel centres at
integer + 0.5 are *not* added here: SAM's prompt encoder adds the half-pixel shift itself).
"""
from __future__ import annotations

from typing import Optional, Tuple

import cv2
import numpy as np
import torch


def interior_point(mask: np.ndarray) -> Optional[Tuple[float, float]]:
    """The point of a bool ``(H, W)`` mask farthest from its border (``None`` if empty)."""
    if not mask.any():
        return None
    padded = np.pad(mask.astype(np.uint8), 1)
    dist = cv2.distanceTransform(padded, cv2.DIST_L2, 5)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return float(x), float(y)


def oracle_next_click(pred: np.ndarray, gt: np.ndarray) -> Optional[Tuple[float, float, int]]:
    """The standard interactive-segmentation click: interior of the largest error region.

    Args:
        pred, gt: bool ``(H, W)``.
    Returns:
        ``(x, y, label)`` with label 1 for a missed foreground region, 0 for a false positive;
        ``None`` when the prediction is already perfect.
    """
    best = None
    for region, label in ((gt & ~pred, 1), (pred & ~gt, 0)):
        if not region.any():
            continue
        padded = np.pad(region.astype(np.uint8), 1)
        dist = cv2.distanceTransform(padded, cv2.DIST_L2, 5)[1:-1, 1:-1]
        peak = float(dist.max())
        if best is None or peak > best[0]:
            y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
            best = (peak, float(x), float(y), label)
    return None if best is None else best[1:]


def random_clicks_in(masks: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One uniform random pixel inside each mask (SAM's training-time click sampler).

    One uniform draw per mask picks the k-th of its pixels (cumulative count + binary search), on
    the masks' device; ``torch.multinomial`` over the pixels costs an exponential draw per pixel
    (0.23 s for 128 masks of 256 x 256 on one CPU thread, against 0.07 s here).

    Args:
        masks: bool ``(N, H, W)``; an empty mask gets a uniform random pixel anywhere.
        generator: CPU generator of the draws.
    Returns:
        ``(N, 2)`` float ``(x, y)`` on the masks' device.
    """
    n, h, w = masks.shape
    flat = masks.reshape(n, -1)
    empty = ~flat.any(1)
    if empty.any():
        flat = flat.clone()
        flat[empty] = True
    counts = flat.cumsum(1)  # (N, H*W) pixels inside up to and including each index
    u = torch.rand(n, 1, generator=generator).to(masks.device)
    k = (u * counts[:, -1:]).long().clamp(max=counts[:, -1:] - 1)  # 0-based rank of the drawn pixel
    index = torch.searchsorted(counts, k, right=True)[:, 0]  # first index whose count exceeds k
    return torch.stack([(index % w).float(), (index // w).float()], dim=1)


def random_error_clicks(
    pred: torch.Tensor, gt: torch.Tensor, generator: Optional[torch.Generator] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """SAM's corrective click: uniform in the error region, labelled by the kind of error.

    Args:
        pred, gt: bool ``(N, H, W)``.
    Returns:
        points ``(N, 2)`` float ``(x, y)`` and labels ``(N,)`` long (1 = missed foreground,
        0 = false positive). Where there is no error the click is a positive one inside ``gt``.
    """
    error = pred ^ gt
    no_error = ~error.flatten(1).any(1)
    error[no_error] = gt[no_error]
    points = random_clicks_in(error, generator)
    x, y = points[:, 0].long(), points[:, 1].long()
    labels = gt[torch.arange(gt.shape[0]), y, x].long()
    return points, labels


def largest_error_clicks(pred: torch.Tensor, gt: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`oracle_next_click` for a batch: the interior of each sample's largest error region.

    Args:
        pred, gt: bool ``(N, H, W)``.
    Returns:
        points ``(N, 2)`` float ``(x, y)`` and labels ``(N,)`` long; where there is no error the
        click is a positive one at the interior point of ``gt`` (or the centre if ``gt`` is empty).
    """
    n, h, w = gt.shape
    points = torch.empty(n, 2)
    labels = torch.ones(n, dtype=torch.long)
    pred_np, gt_np = pred.cpu().numpy(), gt.cpu().numpy()
    for i in range(n):
        click = oracle_next_click(pred_np[i], gt_np[i])
        if click is None:
            inside = interior_point(gt_np[i])
            click = (inside if inside is not None else ((w - 1) / 2, (h - 1) / 2)) + (1,)
        points[i] = torch.tensor(click[:2])
        labels[i] = click[2]
    return points, labels
