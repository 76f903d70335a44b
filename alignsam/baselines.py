"""Prompt generators of the training-free strategies the agent is compared with.

Each function turns scores or geometry into SAM prompts: ``points (B, N, 2)`` in SAM's input
frame and ``labels (B, N)`` long (1 positive, 0 negative), for
:meth:`~alignsam.foundation.segmenter.Segmenter.decode`. Clicks on the action grid are at patch
centres (:func:`alignsam.geometry.actions_to_sam_points`), so "T random clicks" means T random
distinct patches, exactly the choices the agent has. :mod:`alignsam.evaluation.strategies` wires
these into the evaluation's named strategies.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F

from alignsam.geometry import actions_to_sam_points, grid_cell_centres, original_to_sam_points, sample_at_sam_points
from alignsam.srm import SRMConfig, srm_click_labels

Prompts = Tuple[torch.Tensor, torch.Tensor]


def centre_click(grid: int, original_hw: torch.Tensor, img_size: int) -> Prompts:
    """One positive click at the exact centre of each image (not snapped to the action grid)."""
    b = len(original_hw)
    centre = (original_hw.to(torch.float32).flip(-1) / 2)[:, None, :]  # (B, 1, 2) original frame
    return original_to_sam_points(centre, original_hw, img_size), torch.ones(b, 1, dtype=torch.long, device=original_hw.device)


def random_clicks(
    clicks: int, grid: int, original_hw: torch.Tensor, img_size: int, generator: torch.Generator
) -> Prompts:
    """``clicks`` positive clicks at distinct random patches of the ``grid x grid`` action grid."""
    b = len(original_hw)
    order = torch.stack([torch.randperm(grid * grid, generator=generator) for _ in range(b)])
    actions = order[:, :clicks].to(original_hw.device)
    points = actions_to_sam_points(actions, grid, original_hw, img_size)
    return points, torch.ones(b, clicks, dtype=torch.long, device=original_hw.device)


def spread_patches(grid: int, count: int) -> torch.Tensor:
    """``count`` action indices spread evenly over the ``grid x grid`` grid: farthest-point order
    starting at the central patch (ties broken by the lower index), so any prefix is also spread.

    Returns ``(count,)`` long; the same for every image (the action grid tiles each image).
    """
    if not 1 <= count <= grid * grid:
        raise ValueError(f"count must be in [1, {grid * grid}], got {count}")
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    cells = torch.stack([rows.flatten(), cols.flatten()], 1).float()  # (A, 2)
    centre = torch.tensor([(grid - 1) / 2, (grid - 1) / 2])
    chosen = [int(((cells - centre) ** 2).sum(1).argmin())]
    nearest = ((cells - cells[chosen[0]]) ** 2).sum(1)
    for _ in range(count - 1):
        nxt = int(nearest.argmax())
        chosen.append(nxt)
        nearest = torch.minimum(nearest, ((cells - cells[nxt]) ** 2).sum(1))
    return torch.tensor(chosen, dtype=torch.long)


def ranked_patch_prompts(scores: torch.Tensor, action_points: torch.Tensor, clicks: int) -> Prompts:
    """The ``ceil(clicks / 2)`` highest-scoring patches as positive clicks and the
    ``floor(clicks / 2)`` lowest-scoring as negative ones (distinct patches).

    Args:
        scores: ``(B, A)`` a foreground score per action patch (higher = more foreground).
        action_points: ``(B, A, 2)`` every patch's click in SAM's frame.
    Returns:
        points ``(B, clicks, 2)``, labels ``(B, clicks)`` (positives first).
    """
    if not 1 <= clicks <= scores.shape[1]:
        raise ValueError(f"clicks must be in [1, {scores.shape[1]}], got {clicks}")
    positives, negatives = math.ceil(clicks / 2), clicks // 2
    order = scores.argsort(dim=1, descending=True, stable=True)
    picked = torch.cat([order[:, :positives], order[:, order.shape[1] - negatives:]], 1)
    points = torch.gather(action_points, 1, picked[..., None].expand(-1, -1, 2))
    labels = torch.zeros(picked.shape, dtype=torch.long, device=scores.device)
    labels[:, :positives] = 1
    return points, labels


def best_and_worst_cells(scores: torch.Tensor, region: torch.Tensor, img_size: int) -> Prompts:
    """The highest-scoring embedding cell as a positive click and the lowest as a negative one,
    among cells inside the image (the SRM's seed prompts P_0, PerSAM's location prior).

    Args:
        scores: ``(B, 1, h, w)`` over SAM's padded square.
        region: ``(B, 1, h, w)`` image fraction of each cell (:func:`alignsam.geometry.image_region_on_grid`).
    Returns:
        points ``(B, 2, 2)`` at cell centres in SAM's frame, labels ``(B, 2)`` = [1, 0].
    """
    inside = region.flatten(1) > 0.5
    flat = scores.flatten(1).float()
    best = flat.masked_fill(~inside, float("-inf")).argmax(1)
    worst = flat.masked_fill(~inside, float("inf")).argmin(1)
    centres = grid_cell_centres(scores.shape[-2:], img_size, scores.device)
    points = torch.stack([centres[best], centres[worst]], dim=1)
    labels = torch.tensor([1, 0], device=scores.device).expand(len(flat), -1)
    return points, labels


def srm_point_labels(srm_probs: torch.Tensor, points: torch.Tensor, img_size: int, config: SRMConfig) -> torch.Tensor:
    """The SRM's labels of clicks, by ``config.label_rule`` (:func:`alignsam.srm.label_clicks`):
    the one place the agent's rollout and the strategies that label clicks by the SRM read them.

    Args:
        srm_probs: ``(B, 1, h, w)`` the SRM's foreground probabilities on the embedding grid.
        points: ``(B, N, 2)`` clicks in SAM's frame.
        config: the agent's :class:`~alignsam.srm.SRMConfig` (threshold, label rule).
    Returns:
        ``(B, N)`` long: 1 positive, 0 negative, -1 dropped (SAM's padding; ``label_rule: drop`` only).
    """
    return srm_click_labels(sample_at_sam_points(srm_probs.float(), points, img_size), config)


def masked_mean_feature(embeddings: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean embedding under soft masks: ``(B, C, h, w)``, ``(B, 1, h, w)`` -> ``(B, C)``
    (zeros where a mask is empty)."""
    total = weights.flatten(1).sum(1, keepdim=True)
    summed = (embeddings * weights).flatten(2).sum(2)
    return summed / total.clamp(min=1e-6)


def cosine_location_prior(embeddings: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """PerSAM's location confidence: cosine similarity of every embedding cell to the target
    feature: ``(B, C, h, w)``, ``(B, C)`` -> ``(B, 1, h, w)``."""
    return F.cosine_similarity(embeddings, prototypes[:, :, None, None], dim=1)[:, None]
