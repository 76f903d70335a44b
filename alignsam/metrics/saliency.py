"""Saliency-style map metrics: MAE, F-measure (max, mean, adaptive), E-measure, S-measure.

Protocols follow pysodmetrics (the reference the tests compare with), per image, then averaged:

* **threshold curve** (F and E): a map is quantised to levels ``floor(255 * pred)`` in ``0..255``;
  threshold ``t`` makes the mask ``level >= t``; the per-image curve over the 256 thresholds is
  averaged over images, then its max and mean are taken (max *after* averaging).
* **adaptive threshold**: mask ``pred >= min(scale * mean(pred), 1)`` with ``scale = 2``; the
  blur-detection papers use ``scale = 1.5`` (``fbeta_blur``).
* **F-measure**: ``(1 + b2) P R / (b2 P + R)`` with ``b2 = beta^2 = 0.3``; a ratio whose
  denominator is zero counts as 0.

Every ``update(pred, target)`` takes probability maps and boolean GT at GT resolution (see
:mod:`alignsam.metrics._inputs`).
"""
from __future__ import annotations

import torch

from alignsam.metrics._inputs import FLOAT64_EPS, PerImageMetric

NUM_THRESHOLDS = 256
F_BETA_SQUARED = 0.3
ADAPTIVE_THRESHOLD_SCALE = 2.0
BLUR_ADAPTIVE_THRESHOLD_SCALE = 1.5
S_MEASURE_ALPHA = 0.5


# ----------------------------------------------------------------------------- per-image functions
def threshold_counts(
    pred: torch.Tensor, target: torch.Tensor, num_thresholds: int = NUM_THRESHOLDS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels predicted foreground at each of the quantised thresholds.

    Args:
        pred: ``(H, W)`` float64 in [0, 1]; target: ``(H, W)`` bool.
    Returns:
        ``tp (T,)`` and ``pred_fg (T,)`` float64, entry ``t`` counting pixels with
        ``floor((T - 1) * pred) >= t`` inside the GT foreground (tp) and overall (pred_fg).
    """
    levels = torch.floor(pred * (num_thresholds - 1)).long()
    hist_fg = torch.bincount(levels[target], minlength=num_thresholds)
    hist_all = torch.bincount(levels.flatten(), minlength=num_thresholds)
    return _count_at_or_above(hist_fg), _count_at_or_above(hist_all)


def _count_at_or_above(hist: torch.Tensor) -> torch.Tensor:
    """``(T,)`` histogram over levels -> ``(T,)`` float64 count of values at level ``>= t``."""
    return hist.flip(0).cumsum(0).flip(0).to(torch.float64)


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` with 0 where ``den == 0``."""
    return torch.where(den != 0, num / torch.where(den != 0, den, torch.ones_like(den)), torch.zeros_like(num))


def fmeasure_from_counts(
    tp: torch.Tensor, pred_fg: torch.Tensor, gt_fg: torch.Tensor, beta_sq: float = F_BETA_SQUARED
) -> torch.Tensor:
    """F-measure for any shape of count tensors (float64); zero denominators give 0."""
    precision = _safe_div(tp, pred_fg)
    recall = _safe_div(tp, gt_fg.expand_as(tp))
    return _safe_div((1 + beta_sq) * precision * recall, beta_sq * precision + recall)


def adaptive_mask(pred: torch.Tensor, scale: float, max_threshold: float = 1.0) -> torch.Tensor:
    """``pred >= min(scale * mean(pred), max_threshold)``, ``(H, W)`` bool."""
    return pred >= torch.clamp(scale * pred.mean(), max=max_threshold)


def adaptive_fmeasure(
    pred: torch.Tensor, target: torch.Tensor, scale: float, beta_sq: float = F_BETA_SQUARED
) -> torch.Tensor:
    """F-measure of one image at the adaptive threshold ``min(scale * mean(pred), 1)``."""
    mask = adaptive_mask(pred, scale)
    tp = (mask & target).sum().to(torch.float64)
    return fmeasure_from_counts(tp, mask.sum().to(torch.float64), target.sum().to(torch.float64), beta_sq)


def emeasure_from_counts(
    tp: torch.Tensor, pred_fg: torch.Tensor, gt_fg: int, numel: int
) -> torch.Tensor:
    """Enhanced-alignment measure E_phi of binary masks given by counts (any shape, float64).

    The enhanced alignment of a pixel depends only on whether it is predicted / GT foreground,
    so the sum over the image is four counts times four values. An empty GT scores the predicted
    background fraction, a full GT the predicted foreground fraction.
    """
    if gt_fg == 0:
        total = numel - pred_fg
    elif gt_fg == numel:
        total = pred_fg
    else:
        fp = pred_fg - tp
        fn = gt_fg - tp
        tn = numel - pred_fg - fn
        mean_pred, mean_gt = pred_fg / numel, gt_fg / numel

        def enhanced(pred_value, gt_value):  # demeaned values of a pixel
            align = 2 * (pred_value * gt_value) / (pred_value**2 + gt_value**2 + FLOAT64_EPS)
            return (align + 1) ** 2 / 4

        total = (
            tp * enhanced(1 - mean_pred, 1 - mean_gt)
            + fp * enhanced(1 - mean_pred, -mean_gt)
            + fn * enhanced(-mean_pred, 1 - mean_gt)
            + tn * enhanced(-mean_pred, -mean_gt)
        )
    return total / (numel - 1 + FLOAT64_EPS)


def _ssim(pred: torch.Tensor, gt: torch.Tensor) -> float:
    """The S-measure's region similarity of one quadrant (float64 pred, float64 0/1 gt)."""
    n = pred.numel()
    x, y = pred.mean(), gt.mean()
    sigma_x = ((pred - x) ** 2).sum() / (n - 1 + FLOAT64_EPS)
    sigma_y = ((gt - y) ** 2).sum() / (n - 1 + FLOAT64_EPS)
    sigma_xy = ((pred - x) * (gt - y)).sum() / (n - 1 + FLOAT64_EPS)
    alpha = 4 * x * y * sigma_xy
    beta = (x**2 + y**2) * (sigma_x + sigma_y)
    if alpha != 0:
        return (alpha / (beta + FLOAT64_EPS)).item()
    return 1.0 if beta == 0 else 0.0


def _object_similarity(values: torch.Tensor) -> torch.Tensor:
    mean = values.mean()
    std = values.std(correction=1) if values.numel() > 1 else torch.zeros_like(mean)
    return 2 * mean / (mean**2 + 1 + std + FLOAT64_EPS)


def smeasure(pred: torch.Tensor, target: torch.Tensor, alpha: float = S_MEASURE_ALPHA) -> torch.Tensor:
    """Structure measure S_alpha of one map: ``alpha * object + (1 - alpha) * region``, clipped at 0.

    Args:
        pred: ``(H, W)`` float64 in [0, 1]; target: ``(H, W)`` bool.
    Returns:
        scalar float64. An empty GT scores ``1 - mean(pred)``, a full GT ``mean(pred)``. The region
        term splits the image at the GT centroid (rounded, +1 as in the MATLAB original) into four
        quadrants weighted by area; an empty quadrant has weight 0 and contributes 0
        (pysodmetrics returns NaN there).
    """
    gt = target.to(torch.float64)
    gt_mean = gt.mean()
    if gt_mean == 0:
        return 1 - pred.mean()
    if gt_mean == 1:
        return pred.mean()

    object_score = _object_similarity(pred[target]) * gt_mean + _object_similarity(
        (1 - pred)[~target]
    ) * (1 - gt_mean)

    h, w = target.shape
    area = h * w
    cy, cx = (int(v) + 1 for v in torch.nonzero(target).to(torch.float64).mean(0).round().tolist())
    w_lt, w_rt, w_lb = cx * cy / area, cy * (w - cx) / area, (h - cy) * cx / area
    weights = (w_lt, w_rt, w_lb, 1 - w_lt - w_rt - w_lb)
    quadrants = ((slice(0, cy), slice(0, cx)), (slice(0, cy), slice(cx, w)),
                 (slice(cy, h), slice(0, cx)), (slice(cy, h), slice(cx, w)))
    region_score = 0.0
    for weight, (rows, cols) in zip(weights, quadrants):
        if pred[rows, cols].numel() > 0:
            region_score += _ssim(pred[rows, cols], gt[rows, cols]) * weight

    return torch.clamp(object_score * alpha + region_score * (1 - alpha), min=0)


# ----------------------------------------------------------------------------- metrics
class MeanAbsoluteError(PerImageMetric):
    """``mae``: mean ``|pred - gt|`` of each image, averaged over images.

    Differs from torchmetrics' ``MeanAbsoluteError``, which pools pixels over the set and so weights
    large images more.
    """

    higher_is_better = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_sum_state("mae_sum")

    def update_image(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        self.mae_sum += (pred - target.to(torch.float64)).abs().mean()

    def compute(self) -> torch.Tensor:
        return self.mae_sum / self.num_images


class FMeasure(PerImageMetric):
    """``fbeta_max``, ``fbeta_mean``, ``fbeta_adaptive``: F-measure with ``beta^2`` (default 0.3).

    Args:
        beta_sq: beta squared (torchmetrics' ``beta`` would be its square root).
        num_thresholds: points of the threshold curve (256: every uint8 level).
        adaptive_scale: the adaptive threshold is ``min(adaptive_scale * mean(pred), 1)``.
    Returns:
        dict of float64 scalars.
    """

    higher_is_better = True

    def __init__(
        self,
        beta_sq: float = F_BETA_SQUARED,
        num_thresholds: int = NUM_THRESHOLDS,
        adaptive_scale: float = ADAPTIVE_THRESHOLD_SCALE,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.beta_sq, self.num_thresholds, self.adaptive_scale = beta_sq, num_thresholds, adaptive_scale
        self.add_sum_state("curve_sum", (num_thresholds,))
        self.add_sum_state("adaptive_sum")

    def update_image(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        gt_fg = target.sum().to(torch.float64)
        tp, pred_fg = threshold_counts(pred, target, self.num_thresholds)
        self.curve_sum += fmeasure_from_counts(tp, pred_fg, gt_fg, self.beta_sq)
        self.adaptive_sum += adaptive_fmeasure(pred, target, self.adaptive_scale, self.beta_sq)

    def compute(self) -> dict:
        curve = self.curve_sum / self.num_images
        return {
            "fbeta_max": curve.max(),
            "fbeta_mean": curve.mean(),
            "fbeta_adaptive": self.adaptive_sum / self.num_images,
        }


class AdaptiveFMeasure(PerImageMetric):
    """F-measure at an adaptive threshold, per image, averaged; ``fbeta_blur`` uses ``scale=1.5``.

    Args:
        scale: threshold ``min(scale * mean(pred), 1)``; 1.5 in the defocus-blur papers.
        beta_sq: beta squared.
    """

    higher_is_better = True

    def __init__(
        self, scale: float = BLUR_ADAPTIVE_THRESHOLD_SCALE, beta_sq: float = F_BETA_SQUARED, **kwargs
    ) -> None:
        super().__init__(**kwargs)
        self.scale, self.beta_sq = scale, beta_sq
        self.add_sum_state("fbeta_sum")

    def update_image(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        self.fbeta_sum += adaptive_fmeasure(pred, target, self.scale, self.beta_sq)

    def compute(self) -> torch.Tensor:
        return self.fbeta_sum / self.num_images


class EMeasure(PerImageMetric):
    """``emeasure_mean``, ``emeasure_max``, ``emeasure_adaptive``: enhanced-alignment measure E_phi.

    Mean and max are taken over the image-averaged threshold curve; the adaptive value uses the
    ``min(2 * mean(pred), 1)`` threshold.

    Args:
        num_thresholds: points of the threshold curve.
        adaptive_scale: factor of the adaptive threshold.
    """

    higher_is_better = True

    def __init__(
        self, num_thresholds: int = NUM_THRESHOLDS, adaptive_scale: float = ADAPTIVE_THRESHOLD_SCALE, **kwargs
    ) -> None:
        super().__init__(**kwargs)
        self.num_thresholds, self.adaptive_scale = num_thresholds, adaptive_scale
        self.add_sum_state("curve_sum", (num_thresholds,))
        self.add_sum_state("adaptive_sum")

    def update_image(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        gt_fg, numel = int(target.sum()), target.numel()
        tp, pred_fg = threshold_counts(pred, target, self.num_thresholds)
        self.curve_sum += emeasure_from_counts(tp, pred_fg, gt_fg, numel)
        mask = adaptive_mask(pred, self.adaptive_scale)
        tp_adaptive = (mask & target).sum().to(torch.float64)
        self.adaptive_sum += emeasure_from_counts(tp_adaptive, mask.sum().to(torch.float64), gt_fg, numel)

    def compute(self) -> dict:
        curve = self.curve_sum / self.num_images
        return {
            "emeasure_mean": curve.mean(),
            "emeasure_max": curve.max(),
            "emeasure_adaptive": self.adaptive_sum / self.num_images,
        }


class SMeasure(PerImageMetric):
    """``smeasure``: structure measure S_alpha per image, averaged (alpha 0.5)."""

    higher_is_better = True

    def __init__(self, alpha: float = S_MEASURE_ALPHA, **kwargs) -> None:
        super().__init__(**kwargs)
        self.alpha = alpha
        self.add_sum_state("smeasure_sum")

    def update_image(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        self.smeasure_sum += smeasure(pred, target, self.alpha)

    def compute(self) -> torch.Tensor:
        return self.smeasure_sum / self.num_images
