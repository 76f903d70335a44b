"""Per-class binary predictions -> one label map per image (the VOC protocol of ``docs/method.md``, "VOC as an open-context task").

An image with K classes present is K episodes; each gives logits at original size. A pixel takes
the class whose mask covers it with the highest SAM logit, and background (0) where no mask covers
it. Episodes of one image may arrive in different batches, so maps are kept until :meth:`label_maps`.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np
import torch

from alignsam.geometry import MASK_LOGIT_THRESHOLD


class LabelMapAssembler:
    """Collects ``(image_id, class_id, logits (H, W))`` and yields assembled label maps."""

    def __init__(self) -> None:
        self._best: Dict[str, torch.Tensor] = {}  # image_id -> highest logit so far (H, W)
        self._label: Dict[str, torch.Tensor] = {}  # image_id -> class of that logit (H, W)
        self._target: Dict[str, np.ndarray] = {}

    def add(self, image_id: str, class_id: int, logits: torch.Tensor, target_label_map: np.ndarray) -> None:
        """One episode's logits ``(H, W)`` for class ``class_id`` of image ``image_id`` (GT ``(H, W)`` ids)."""
        logits = logits.detach().float().cpu()
        if image_id not in self._best:
            self._best[image_id] = torch.full_like(logits, float("-inf"))
            self._label[image_id] = torch.zeros(logits.shape, dtype=torch.long)
            self._target[image_id] = np.asarray(target_label_map)
        better = logits > self._best[image_id]
        self._best[image_id] = torch.where(better, logits, self._best[image_id])
        self._label[image_id] = torch.where(better, torch.full_like(self._label[image_id], int(class_id)), self._label[image_id])

    def label_maps(self) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """Predicted and ground-truth label maps ``(H, W)`` long, one per image, in arrival order."""
        preds, targets = [], []
        for image_id, best in self._best.items():
            preds.append(torch.where(best > MASK_LOGIT_THRESHOLD, self._label[image_id], torch.zeros_like(self._label[image_id])))
            targets.append(torch.from_numpy(self._target[image_id].astype(np.int64)))
        return preds, targets

    def image_ids(self) -> List[str]:
        """Image ids in arrival order (the order of :meth:`label_maps`)."""
        return list(self._best)

    def __len__(self) -> int:
        return len(self._best)
