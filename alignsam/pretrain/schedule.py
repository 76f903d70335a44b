"""The learning-rate schedule of the pretraining runs: linear warm-up, then cosine decay to a floor."""
from __future__ import annotations

import math

import torch


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, floor: float = 0.05) -> dict:
    """Lightning ``lr_scheduler`` entry: factor ``(step + 1) / warmup_steps`` during warm-up, then a
    cosine from 1 down to ``floor`` at ``total_steps`` (stepped every optimizer step)."""
    total = max(total_steps, 1)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total - warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return {"scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, factor), "interval": "step"}
