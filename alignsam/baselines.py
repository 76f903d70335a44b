"""Training-free prompting strategies the agent is compared with, as SAM prompts.

Each returns ``points (B, N, 2)`` in SAM's input frame and ``labels (B, N)`` long, for
:meth:`~alignsam.foundation.segmenter.Segmenter.decode`. Clicks are placed on the same action grid
as the agent's (patch centres), so "T random clicks" means T random distinct patches.
"""
from __future__ import annotations

from typing import Tuple

import torch

from alignsam.geometry import actions_to_sam_points, original_to_sam_points

BASELINES = ("centre", "random")


def centre_click(grid: int, original_hw: torch.Tensor, img_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """One positive click at the exact centre of each image (not snapped to the action grid)."""
    b = len(original_hw)
    centre = (original_hw.to(torch.float32).flip(-1) / 2)[:, None, :]  # (B, 1, 2) original frame
    return original_to_sam_points(centre, original_hw, img_size), torch.ones(b, 1, dtype=torch.long, device=original_hw.device)


def random_clicks(
    clicks: int, grid: int, original_hw: torch.Tensor, img_size: int, generator: torch.Generator
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``clicks`` positive clicks at distinct random patches of the ``grid x grid`` action grid."""
    b = len(original_hw)
    order = torch.stack([torch.randperm(grid * grid, generator=generator) for _ in range(b)])
    actions = order[:, :clicks].to(original_hw.device)
    points = actions_to_sam_points(actions, grid, original_hw, img_size)
    return points, torch.ones(b, clicks, dtype=torch.long, device=original_hw.device)
