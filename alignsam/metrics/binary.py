"""Thresholded binary-mask metrics: two IoU definitions and the balanced error rate.

All take ``update(pred, target)`` with probability maps and boolean ground truth at GT resolution
(see :mod:`alignsam.metrics._inputs`). Predictions are binarised as ``pred > PROB_THRESHOLD``
(0.5, i.e. SAM's ``logits > 0``). States are sums and counts, reduced with ``sum`` across
processes, so a DDP run gives the same numbers as one process on all data.
"""
from __future__ import annotations

import torch
from torchmetrics import Metric

from alignsam.geometry import PROB_THRESHOLD
from alignsam.metrics._inputs import MapOrMaps, iter_binary_pairs


class ForegroundIoU(Metric):
    """``iou_fg``: foreground IoU of each image, averaged over images.

    ``IoU = |pred & gt| / |pred | gt|`` with ``pred = prob > threshold``. An image whose prediction
    and ground truth are both empty has no union: it counts as ``empty_union_value``. The default 1.0
    says "nothing to find, nothing found" is perfect; GDNet's glass-detection evaluation counts it
    as 0.0 (pass ``empty_union_value=0.0`` for numbers comparable with GDNet's tables).

    Args:
        empty_union_value: IoU of an image with empty union (1.0 here, 0.0 in GDNet).
        threshold: probability threshold for the binary mask.
        validate_args: check input dtypes and ranges.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self,
        empty_union_value: float = 1.0,
        threshold: float = PROB_THRESHOLD,
        validate_args: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.empty_union_value = float(empty_union_value)
        self.threshold = float(threshold)
        self.validate_args = validate_args
        self.add_state("iou_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("num_images", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred: MapOrMaps, target: MapOrMaps) -> None:
        for p, t in iter_binary_pairs(pred, target, self.validate_args):
            binary = p > self.threshold
            union = (binary | t).sum()
            inter = (binary & t).sum()
            empty = torch.full((), self.empty_union_value, dtype=torch.float64, device=union.device)
            iou = torch.where(union > 0, inter.to(torch.float64) / union.clamp(min=1), empty)
            self.iou_sum += iou
            self.num_images += 1

    def compute(self) -> torch.Tensor:
        return self.iou_sum / self.num_images


class FgBgMeanIoU(Metric):
    """``miou_fgbg``: mean of foreground and background IoU from pixel counts over the whole set.

    ``IoU_fg = TP / (TP + FP + FN)``, ``IoU_bg = TN / (TN + FN + FP)``, result ``(IoU_fg + IoU_bg) / 2``,
    with TP, FP, FN, TN summed over every pixel of every image (the semantic-segmentation
    convention with two classes). A class with zero union over the whole set counts as
    ``empty_union_value``.

    Args:
        empty_union_value: IoU of a class that is absent from both prediction and GT everywhere.
        threshold: probability threshold for the binary mask.
        validate_args: check input dtypes and ranges.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self,
        empty_union_value: float = 1.0,
        threshold: float = PROB_THRESHOLD,
        validate_args: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.empty_union_value = float(empty_union_value)
        self.threshold = float(threshold)
        self.validate_args = validate_args
        for name in ("tp", "fp", "fn", "tn"):
            self.add_state(name, torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred: MapOrMaps, target: MapOrMaps) -> None:
        for p, t in iter_binary_pairs(pred, target, self.validate_args):
            binary = p > self.threshold
            self.tp += (binary & t).sum()
            self.fp += (binary & ~t).sum()
            self.fn += (~binary & t).sum()
            self.tn += (~binary & ~t).sum()

    def _iou(self, inter: torch.Tensor, union: torch.Tensor) -> torch.Tensor:
        if union == 0:
            return torch.tensor(self.empty_union_value, dtype=torch.float64, device=union.device)
        return inter.to(torch.float64) / union

    def compute(self) -> torch.Tensor:
        iou_fg = self._iou(self.tp, self.tp + self.fp + self.fn)
        iou_bg = self._iou(self.tn, self.tn + self.fn + self.fp)
        return (iou_fg + iou_bg) / 2


class BalancedErrorRate(Metric):
    """``ber``, ``ber_shadow``, ``ber_nonshadow``: the shadow-detection error rates, in percent.

    Both maps are thresholded (pred ``> threshold``; the target is already boolean), and TP, TN,
    P (GT positives) and N (GT negatives) are summed over every pixel of the whole set at GT
    resolution. ``ber = 100 * (1 - (TP/P + TN/N) / 2)``, ``ber_shadow = 100 * (1 - TP/P)``,
    ``ber_nonshadow = 100 * (1 - TN/N)``. As in pysodmetrics' ``BERHandler``, an accuracy whose
    denominator is zero (a set without any shadow pixel, or without any non-shadow pixel) counts
    as 0.

    Returns:
        ``dict(ber=..., ber_shadow=..., ber_nonshadow=...)`` float64 scalars (lower is better).
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, threshold: float = PROB_THRESHOLD, validate_args: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.threshold = float(threshold)
        self.validate_args = validate_args
        for name in ("tp", "tn", "positives", "negatives"):
            self.add_state(name, torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred: MapOrMaps, target: MapOrMaps) -> None:
        for p, t in iter_binary_pairs(pred, target, self.validate_args):
            binary = p > self.threshold
            self.tp += (binary & t).sum()
            self.tn += (~binary & ~t).sum()
            positives = t.sum()
            self.positives += positives
            self.negatives += t.numel() - positives

    @staticmethod
    def _accuracy(correct: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
        if total == 0:
            return torch.zeros((), dtype=torch.float64, device=total.device)
        return correct.to(torch.float64) / total

    def compute(self) -> dict:
        shadow_acc = self._accuracy(self.tp, self.positives)
        nonshadow_acc = self._accuracy(self.tn, self.negatives)
        return {
            "ber": 100 * (1 - (shadow_acc + nonshadow_acc) / 2),
            "ber_shadow": 100 * (1 - shadow_acc),
            "ber_nonshadow": 100 * (1 - nonshadow_acc),
        }
